"""The smallest valid gatewayd configuration, for tests that parse one or write one to a folder.

Every path in it is relative: parse() resolves them against the config file's folder, so a
test's temporary folder holds the whole gateway (tls/, state/, log/, admin.sock).
"""

from __future__ import annotations

MINIMAL = """
[gateway]
listen = "127.0.0.1:8443"
[tls]
cert_file = "tls/server.pem"
key_file = "tls/server.key"
ca_file = "tls/ca.pem"
ca_key_file = "tls/ca.key"
[store]
path = "state/directory.db"
secrets_key_file = "state/secrets.key"
[audit]
path = "log/audit.jsonl"
[admin]
socket = "admin.sock"
"""

#: The ``access`` mode of the tests' gateways: a password and a TOTP code.
ACCESS_MODE = """[modes.access]
factors = ["password", "totp"]
"""
