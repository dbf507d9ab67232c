#!/usr/bin/env python3
"""The cost of the hybrid end-to-end handshake: classic (X25519) against hybrid
(X25519 + ML-KEM-768), in one run.

Run it with the Python of the venv the project is installed in::

    .venv/bin/python bench/pq_bench.py            # ~1 min
    .venv/bin/python bench/pq_bench.py --json     # results as JSON

What is measured, for each handshake:

- the handshake alone, in this process (both ends, no I/O): median wall time;
- bytes on the wire: the two framed handshake messages, and what ``gatewayd`` counted
  for a tunnel carrying 1 byte each way (``tunnel.end`` ``bytes_up``/``bytes_down``,
  TLS excluded, end-to-end framing included);
- a new tunnel in an open session through the real processes (``gatewayd``,
  ``gw connect -L``, ``gw agent``): TCP connect to the -L port until the first
  echoed byte, median of runs;
- the record layer's throughput once open (it does not change with the handshake).

Two agents on one gateway: one enrolled now (hybrid), one made to look enrolled
before the hybrid handshake (its ML-KEM key removed from its state folder and from
the gateway's store), so both paths run side by side on the same machine.
"""

from __future__ import annotations

import argparse
import json
import socket
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gatewayd.demo import EchoServer, Lab, wait_for
from relay import noise, tunnel

PASSWORD = "bench pass phrase"
PROLOGUE = tunnel.prologue("bench-session")


def handshake_once(hybrid: bool, agent: tuple[bytes, bytes], kem: tuple[bytes, bytes]) -> int:
    """One handshake between our two ends in memory; returns the framed bytes sent."""
    client_private, _ = noise.generate_keypair()
    initiator = noise.HandshakeState.initiator(
        client_private, agent[1], PROLOGUE, remote_kem_static=kem[1] if hybrid else None
    )
    responder = noise.HandshakeState.responder(
        agent[0], PROLOGUE, kem_static_seed=kem[0] if hybrid else None
    )
    first = initiator.write_message()
    responder.read_message(first)
    second = responder.write_message()
    initiator.read_message(second)
    return len(noise.frame(first)) + len(noise.frame(second))


def in_memory(rounds: int) -> dict[str, dict[str, float]]:
    agent, kem = noise.generate_keypair(), noise.generate_kem_keypair()
    out: dict[str, dict[str, float]] = {}
    for name, hybrid in (("classic", False), ("hybrid", True)):
        times = []
        wire = 0
        for _ in range(rounds):
            start = time.perf_counter()
            wire = handshake_once(hybrid, agent, kem)
            times.append(time.perf_counter() - start)
        out[name] = {"handshake_ms": statistics.median(times) * 1000, "handshake_bytes": wire}
    return out


def record_throughput(megabytes: int) -> float:
    """MB/s through one Sealer and Opener pair (the record layer both handshakes share)."""
    send, receive = noise.CipherState(bytes(32)), noise.CipherState(bytes(32))
    sealer, opener = tunnel.Sealer(send), tunnel.Opener(receive)
    chunk = bytes(256 * 1024)
    start = time.perf_counter()
    for _ in range(megabytes * 4):
        parts, _ = sealer.feed(chunk)
        opener.feed(b"".join(parts))
    return megabytes / (time.perf_counter() - start)


def _store_path(lab: Lab) -> Path:
    for line in lab.config.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "path" and value.strip().strip('"').endswith(".db"):
            path = Path(value.strip().strip('"'))
            return path if path.is_absolute() else lab.config.parent / path
    raise RuntimeError("no store path in the config")


def echo_once(port: int) -> float:
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(b"x")
        if conn.recv(1) != b"X":
            raise RuntimeError("no echo")
    return time.perf_counter() - start


def through_processes(rounds: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="pq-bench-") as tmp:
        lab = Lab(Path(tmp))
        echo = EchoServer()
        try:
            lab.init(extra_config="[limits]\nauth_per_minute = 5000\n")
            lab.start_gateway()
            lab.admin("org", "add", "clinic", "--name", "Clinic")
            lab.admin("vendor", "add", "acme", "--name", "Acme")
            lab.agreement("acme", "clinic", "access", unattended=True)
            lab.enroll_agent("pc-hybrid", "clinic")
            old = lab.enroll_agent("pc-classic", "clinic")
            (old / "pq.key").unlink()
            info = json.loads((old / "agent.json").read_text())
            info.pop("pq_key", None)
            (old / "agent.json").write_text(json.dumps(info))
            with sqlite3.connect(_store_path(lab)) as db:
                db.execute("UPDATE agents SET pq_key = NULL WHERE id = 'pc-classic'")
            for agent in ("pc-hybrid", "pc-classic"):
                lab.start_agent(agent, {"echo": echo.port})
            lab.vendor_user("bench", "acme", PASSWORD)
            for name, agent in (("classic", "pc-classic"), ("hybrid", "pc-hybrid")):
                known = Path(tmp) / f"known-{name}.json"
                _, port = lab.connect_local(
                    agent, "bench", PASSWORD, "echo", "--known-agents", str(known)
                )
                echo_once(port)  # warm-up
                times = [echo_once(port) for _ in range(rounds)]

                def ended(agent: str = agent) -> list[dict[str, Any]]:
                    return [r for r in lab.events("tunnel.end") if r["agent"] == agent]

                wait_for(lambda: len(ended()) >= rounds + 1, 30, "the tunnels' end records")
                ends = ended()
                starts = [r for r in lab.events("tunnel.start") if r["agent"] == agent]
                out[name] = {
                    "new_tunnel_ms": statistics.median(times) * 1000,
                    "tunnel_bytes_up": ends[-1]["bytes_up"],
                    "tunnel_bytes_down": ends[-1]["bytes_down"],
                    "audited_e2e": starts[-1].get("e2e", "?"),
                }
        finally:
            lab.close()
            echo.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--rounds", type=int, default=50, help="runs per median")
    args = parser.parse_args(argv)
    memory = in_memory(args.rounds * 4)
    processes = through_processes(args.rounds)
    results: dict[str, Any] = {
        name: {**memory[name], **processes[name]} for name in ("classic", "hybrid")
    }
    results["record_layer_mb_s"] = record_throughput(256)
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    rows = [
        ("handshake alone, both ends in one process, ms", "handshake_ms", "{:.2f}"),
        ("handshake bytes on the wire (two framed messages)", "handshake_bytes", "{:.0f}"),
        ("new tunnel in an open session, ms (real processes)", "new_tunnel_ms", "{:.1f}"),
        ("gatewayd's count, 1 byte each way: client to agent", "tunnel_bytes_up", "{:.0f}"),
        ("gatewayd's count, 1 byte each way: agent to client", "tunnel_bytes_down", "{:.0f}"),
        ("tunnel.start e2e", "audited_e2e", "{}"),
    ]
    print("| | classic | hybrid |\n|---|---|---|")
    for label, key, fmt in rows:
        c, h = results["classic"][key], results["hybrid"][key]
        print(f"| {label} | {fmt.format(c)} | {fmt.format(h)} |")
    print(f"\nrecord layer (both handshakes): {results['record_layer_mb_s']:.0f} MB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
