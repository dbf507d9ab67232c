"""``gatewayd init``: a working config, CA, server certificate and state folder."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from . import ca

CONFIG_TEMPLATE = """\
# gatewayd configuration, written by `gatewayd init`. Every key is documented in
# config.example.toml. Relative paths are relative to this file.

[gateway]
listen = "{listen}"
node_id = "{node}"

[tls]
cert_file = "tls/server.pem"
key_file = "tls/server.key"
ca_file = "tls/ca.pem"          # give this file to clients (--ca-file) and agents
ca_key_file = "tls/ca.key"

[store]
path = "state/directory.db"
secrets_key_file = "state/secrets.key"

[audit]
path = "audit/audit.jsonl"

[admin]
socket = "admin.sock"

[modes.access]
factors = ["password", "totp"]

[modes.support]
factors = ["password", "totp"]

[modes.homeoffice]
factors = ["password", "totp"]

[auth.totp]
issuer = "gatewayd"
"""


def init(directory: Path, listen: tuple[str, int], names: list[str]) -> tuple[Path, Path]:
    """Create everything under ``directory``; returns (config path, CA file).

    Refuses to overwrite an existing config, so it cannot destroy a CA in use.
    """
    config_path = directory / "gatewayd.toml"
    if config_path.exists():
        raise FileExistsError(f"{config_path} exists; not overwriting a gateway's CA")
    directory.mkdir(parents=True, exist_ok=True)
    for sub, mode in (("tls", 0o700), ("state", 0o700), ("audit", 0o750)):
        (directory / sub).mkdir(mode=mode, exist_ok=True)
    host, port = listen
    ca_key, ca_cert = ca.make_ca(f"gatewayd CA {socket.gethostname()}")
    sans = [n for n in [*names, host, "localhost", "127.0.0.1", "::1"] if n not in ("0.0.0.0", "::")]
    server_key, server_cert = ca.make_server_cert(ca_key, ca_cert, sans)
    ca.write_private(directory / "tls/ca.key", ca.key_pem(ca_key))
    (directory / "tls/ca.pem").write_bytes(ca.cert_pem(ca_cert))
    ca.write_private(directory / "tls/server.key", ca.key_pem(server_key))
    (directory / "tls/server.pem").write_bytes(ca.cert_pem(server_cert))
    ca.write_private(directory / "state/secrets.key", os.urandom(32))
    shown = f"[{host}]" if ":" in host else host
    config_path.write_text(
        CONFIG_TEMPLATE.format(listen=f"{shown}:{port}", node=socket.gethostname().split(".")[0])
    )
    return config_path, directory / "tls/ca.pem"
