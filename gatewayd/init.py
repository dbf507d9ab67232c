"""``gatewayd init``: a working config, CA, server certificate and state folder."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

from relay.errors import ConfigError

from . import ca
from .audit import load_or_create_key, public_key_text, write_public_key


def audit_public_key(config_path: Path) -> str:
    """``ed25519:...``: the public key of the audit signing key ``init`` made."""
    return public_key_text(load_or_create_key(config_path.parent / "state/audit.key").public_key())


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

# Vendor users: a password, then an authenticator-app code or a security key.
[modes.access]
factors = ["password", ["totp", "fido2"]]

[modes.support]
factors = ["password", ["totp", "fido2"]]

# Employees at home: their PKI smartcard (the card checks the PIN), then their password.
[modes.homeoffice]
factors = ["smartcard", "password"]
# Pulling the card out of the reader ends the session.
end_on_card_removal = true

[auth.totp]
issuer = "gatewayd"

# The national PKI that issues the employees' smartcard certificates. Until its files
# are named here, homeoffice logins fail (check-config warns). Put them in pki/ (paths
# are relative to this file), keep the CRLs fresh (a timer that fetches them, then
# `systemctl reload gatewayd`), and run `gatewayd check-config`.
[auth.smartcard]
trust_anchors = []   # root CA certificates, PEM or DER: ["pki/root-ca.pem"]
intermediates = []   # the CAs that issue person certificates: ["pki/person-ca.pem"]
crl_files = []       # a CRL of every CA, PEM or DER: ["pki/root-ca.crl", "pki/person-ca.crl"]
required_policy = "2.16.578.1.26.1.3.1"   # person certificate, level high, key on a card
subject_field = "serialNumber"            # names the person (gw admin user add --cert-serial)

[auth.fido2]
# The relying-party id security keys are registered to: a DNS name of this gateway
# (keys registered under one rp_id never work under another; the origin follows it).
rp_id = "{rp_id}"
"""


def rp_id_of(names: list[str]) -> str:
    """The FIDO2 relying-party id: the first DNS name of the server certificate, lower case."""
    from auth.fido2 import parse_settings

    for name in names:
        try:
            ipaddress.ip_address(name)
        except ValueError:  # a DNS name: the first one usable as an rp_id wins
            try:
                return parse_settings({"rp_id": name.lower().rstrip(".")}).rp_id
            except ConfigError:
                continue
    return "localhost"


def init(directory: Path, listen: tuple[str, int], names: list[str]) -> tuple[Path, Path]:
    """Create everything under ``directory``; returns (config path, CA file).

    Refuses to overwrite an existing config, so it cannot destroy a CA in use.
    """
    config_path = directory / "gatewayd.toml"
    if config_path.exists():
        raise FileExistsError(f"{config_path} exists; not overwriting a gateway's CA")
    directory.mkdir(parents=True, exist_ok=True)
    for sub, mode in (("tls", 0o700), ("state", 0o700), ("audit", 0o750), ("pki", 0o755)):
        (directory / sub).mkdir(mode=mode, exist_ok=True)
    host, port = listen
    ca_key, ca_cert = ca.make_ca(f"gatewayd CA {socket.gethostname()}")
    sans = [
        n for n in [*names, host, "localhost", "127.0.0.1", "::1"] if n not in ("0.0.0.0", "::")
    ]
    server_key, server_cert = ca.make_server_cert(ca_key, ca_cert, sans)
    ca.write_private(directory / "tls/ca.key", ca.key_pem(ca_key))
    (directory / "tls/ca.pem").write_bytes(ca.cert_pem(ca_cert))
    ca.write_private(directory / "tls/server.key", ca.key_pem(server_key))
    (directory / "tls/server.pem").write_bytes(ca.cert_pem(server_cert))
    ca.write_private(directory / "state/secrets.key", os.urandom(32))
    # Signs the audit trail's checkpoints; its public key verifies them anywhere.
    write_public_key(
        directory / "state/audit.key", load_or_create_key(directory / "state/audit.key")
    )
    shown = f"[{host}]" if ":" in host else host
    config_path.write_text(
        CONFIG_TEMPLATE.format(
            listen=f"{shown}:{port}",
            node=socket.gethostname().split(".")[0],
            rp_id=rp_id_of(sans),
        )
    )
    return config_path, directory / "tls/ca.pem"
