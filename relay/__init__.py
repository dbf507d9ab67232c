"""What gateway, agent and client share: wire protocol, Noise E2E session, byte pipe, TLS."""
