"""The `gw` command: connect, agent, admin, audit."""
