"""Audit trail benchmark: a filtered query and verify over a large trail, beside jq.

    python bench/audit_query.py [--records 1000000] [--dir DIR] [--keep]

Generates a trail of signed, hash-chained records as gatewayd writes them (logins,
decisions, sessions, tunnels, rejected connections; 1,000 users, checkpoints every
1,000 records), then times:

- ``gw audit --user U --event auth. --json`` (the whole command, start-up included)
  against ``jq -c 'select(.user == "U" and (.event | startswith("auth.")))'`` on the
  same file, both written to /dev/null; the two must select the same records;
- ``gw audit --since T --outcome failure --json`` (the last tenth) against jq's
  equivalent;
- ``verify`` (chain, head and every checkpoint signature) in records per second.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from gateway_config import MINIMAL

from gatewayd.audit import (
    CHECKPOINT,
    GENESIS,
    HEAD_SIZE,
    checkpoint_message,
    head_path,
    key_id,
    verify,
)

# The tests' minimal gateway, its trail in audit/ and left uncompressed.
CONFIG = MINIMAL.replace('path = "log/audit.jsonl"', 'path = "audit/audit.jsonl"\ncompress = false')


def generate(path: Path, live: Path, n: int, key: Ed25519PrivateKey) -> None:
    """n records (checkpoints included), one second apart, ending now, in ``path`` (a
    rotated file, as gatewayd leaves it with ``compress = false``), and the head of
    ``live`` (empty, as just after a rotation)."""
    kid = key_id(key.public_key())
    start = time.time() - n
    prev, seq = GENESIS, 0
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    with path.open("wb") as out:
        buf: list[bytes] = []
        for i in range(n):
            seq += 1
            ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start + i)) + ".000000Z"
            if seq % 1000 == 0:
                sig = key.sign(checkpoint_message("gw1", seq - 1, prev, ts, 1000))
                fields = {
                    "signed_seq": seq - 1,
                    "signed_hash": prev,
                    "signed_ts": ts,
                    "every": 1000,
                    "key_id": kid,
                    "reason": "count",
                    "sig": base64.b64encode(sig).decode(),
                }
                event = CHECKPOINT
            else:
                user = f"u{(i // 8) * 7919 % 1000}"
                session = f"s{i // 8}"
                kind = i % 8
                source = f"203.0.{i % 250}.{i % 200}:{40000 + i % 20000}"
                if kind in (0, 1):
                    event = "auth.attempt"
                    fields = {
                        "session": session,
                        "user": user,
                        "factor": "password" if kind == 0 else "totp",
                        "outcome": "failure" if i % 97 == 0 else "success",
                        "reason": "ok",
                        "source": source,
                        "mode": "access",
                        "agent": f"pc{i % 50}",
                    }
                elif kind == 2:
                    event = "policy.decision"
                    fields = {
                        "session": session,
                        "user": user,
                        "agent": f"pc{i % 50}",
                        "target": "ssh",
                        "mode": "access",
                        "source": source,
                        "decision": "allow",
                        "reason": "agreement ag1",
                        "agreement": "ag1",
                    }
                elif kind == 3:
                    event = "session.start"
                    fields = {"session": session, "user": user, "agent": f"pc{i % 50}"}
                    fields |= {"target": "ssh", "mode": "access", "source": source}
                elif kind in (4, 5):
                    event = "tunnel.start" if kind == 4 else "tunnel.end"
                    fields = {"session": session, "tunnel": f"t{i}", "user": user}
                    fields |= {"agent": f"pc{i % 50}", "target": "ssh", "mode": "access"}
                    if kind == 5:
                        fields |= {"bytes_up": i, "bytes_down": 3 * i, "duration": 12.5}
                        fields |= {"reason": "client closed"}
                elif kind == 6:
                    event = "session.end"
                    fields = {"session": session, "user": user, "agent": f"pc{i % 50}"}
                    fields |= {"reason": "client closed", "duration": 61.0}
                    fields |= {"bytes_up": i, "bytes_down": 3 * i, "tunnels": 1}
                else:
                    event = "connection.rejected"
                    fields = {"source": source, "code": "tls", "message": "handshake failed"}
            rec = {"ts": ts, "seq": seq, "prev": prev, "node": "gw1", "event": event, **fields}
            line = dumps(rec).encode()
            prev = hashlib.sha256(line).hexdigest()
            buf.append(line)
            if len(buf) >= 10000:
                out.write(b"\n".join(buf) + b"\n")
                buf.clear()
        if buf:
            out.write(b"\n".join(buf) + b"\n")
    record = json.dumps({"seq": seq, "hash": prev}).encode().ljust(HEAD_SIZE - 1)
    head_path(live).write_bytes(record + b"\n")
    live.touch()


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, bytes]:
    t0 = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, check=True, env=env).stdout
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the generated trail")
    args = parser.parse_args()
    jq = shutil.which("jq")
    root = args.dir or Path(tempfile.mkdtemp(prefix="audit-bench-"))
    (root / "audit").mkdir(parents=True, exist_ok=True)
    (root / "gatewayd.toml").write_text(CONFIG)
    live = root / "audit" / "audit.jsonl"
    path = live.with_name(live.name + "." + time.strftime("%Y%m%dT%H%M%S000000Z", time.gmtime()))
    key = Ed25519PrivateKey.generate()
    t0 = time.perf_counter()
    generate(path, live, args.records, key)
    size = path.stat().st_size
    print(
        f"trail: {args.records:,} records, {size / 1e6:.0f} MB, "
        f"generated in {time.perf_counter() - t0:.1f} s"
    )
    print(
        f"machine: {platform.node()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    gw = [sys.executable, "-m", "cli.main", "audit", "--config", str(root / "gatewayd.toml")]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - args.records / 10))
    queries = [
        (
            "--user u123 --event auth.",
            ["--user", "u123", "--event", "auth."],
            'select(.user == "u123" and (.event | startswith("auth.")))',
        ),
        (
            f"--since {since} --outcome failure",
            ["--since", since, "--outcome", "failure"],
            f'select(.ts >= "{since[:-1]}.000000Z" and '
            '(.outcome == "failure" or .event == "connection.rejected"))',
        ),
    ]
    for name, flags, jq_filter in queries:
        ours, out = timed([*gw, *flags, "--json"], env)
        line = f"query {name}: gw audit {ours:.2f} s ({len(out.splitlines()):,} records)"
        if jq:
            theirs, jq_out = timed([jq, "-c", jq_filter, str(path)])
            same = sorted(json.loads(x)["seq"] for x in out.splitlines()) == sorted(
                json.loads(x)["seq"] for x in jq_out.splitlines()
            )
            line += f", jq {theirs:.2f} s: {theirs / ours:.1f}x faster"
            line += "" if same else " (RESULTS DIFFER)"
        print(line)
    t0 = time.perf_counter()
    result = verify(live, key.public_key())
    took = time.perf_counter() - t0
    print(
        f"verify: {result.records:,} records in {took:.2f} s = {result.records / took:,.0f} "
        f"records/s, {result.checkpoints:,} checkpoints checked, ok={result.ok}"
    )
    if not args.keep and args.dir is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
