"""gatewayd: the relay daemon (config, directory, policy, broker, audit, admin socket)."""
