"""Three gatewayd nodes, an MQTT broker, an agent and a vendor on one machine: the
cluster demo (``make demo-cluster``).

:class:`Cluster` starts a real Mosquitto (the Debian package) on loopback and N
gatewayd nodes joined by it, sharing one directory, each with its own port, admin
socket and audit trail, through the same commands a person would type (it drives
:class:`gatewayd.demo.Lab`). :func:`main` prints each step: a tunnel from a vendor on
one node to an agent held by another, the agent's node killed and the agent back on
another node, a tunnel again, then the nodes' trails merged by ``gw audit`` and each
chain verified. ``bench/cluster_bench.py`` uses the same class.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .demo import EchoServer, Lab, Proc, free_port, wait_for

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


class Broker:
    """A Mosquitto on 127.0.0.1 (anonymous, nothing kept on disk) in a folder of its own."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        if not Path(MOSQUITTO).exists():
            raise RuntimeError("mosquitto is not installed (Debian package mosquitto)")
        self.root.mkdir(parents=True, exist_ok=True)
        conf = self.root / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            # Started as root, mosquitto would switch to a user "mosquitto": stay.
            f"user {getpass.getuser()}\nlog_dest stderr\n"
        )
        with (self.root / "mosquitto.log").open("ab") as out:
            self.proc = subprocess.Popen(  # noqa: S603 - a fixed binary, no shell
                [MOSQUITTO, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT
            )

        def listening() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError("mosquitto exited; see " + str(self.root / "mosquitto.log"))
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return True
            return False

        wait_for(listening, 10, "mosquitto to listen")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def postgres_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` with initdb and postgres."""
    found = []
    for bindir in Path("/usr/lib/postgresql").glob("*/bin"):
        if (bindir / "initdb").exists() and (bindir / "postgres").exists():
            with contextlib.suppress(ValueError):
                found.append((float(bindir.parent.name), bindir))
    return max(found)[1] if found else None


class Postgres:
    """A PostgreSQL server (the Debian package) in a temporary folder of its own (under
    the system's temporary directory, which its user can reach), listening only on a
    unix socket there and trusting local connections: a demo's, never a real one. As
    root it runs as ``nobody`` (``initdb`` refuses root). :meth:`stop` removes it."""

    USER = "gatewayd"

    def __init__(self) -> None:
        bindir = postgres_bin()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (Debian package postgresql)")
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="gw-demo-postgres-"))
        self.run_dir = self.root / "run"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def dsn(self) -> str:
        return f"postgresql:///postgres?host={self.run_dir}&user={self.USER}"

    def _as_user(self, argv: list[str]) -> list[str]:
        if os.geteuid() != 0:
            return argv
        nobody = pwd.getpwnam("nobody")
        ids = [f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]
        return ["setpriv", *ids, "--", *argv]

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            for path in (self.root, self.run_dir):
                os.chown(path, nobody.pw_uid, nobody.pw_gid)
        data = self.root / "data"
        init = [str(self.bindir / "initdb"), "-D", str(data), "-U", self.USER, "--auth=trust"]
        done = subprocess.run(  # noqa: S603 - the Debian package's binary, no shell
            self._as_user([*init, "--no-locale", "--encoding=UTF8", "--no-sync"]),
            check=False,
            capture_output=True,
            text=True,
            cwd=self.root,
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr.strip()[-500:]}")
        server = [str(self.bindir / "postgres"), "-D", str(data), "-k", str(self.run_dir)]
        with (self.root / "postgres.log").open("ab") as log:
            self.proc = subprocess.Popen(  # noqa: S603 - the Debian package's binary
                self._as_user([*server, "-c", "listen_addresses=", "-c", "fsync=off"]),
                stdout=log,
                stderr=log,
                cwd=self.root,
            )

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError("postgres exited; see " + str(self.root / "postgres.log"))
            probe = [str(self.bindir / "pg_isready"), "-q", "-h", str(self.run_dir)]
            return subprocess.run([*probe, "-U", self.USER], check=False).returncode == 0  # noqa: S603

        wait_for(ready, 30, "postgres to accept connections")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


class Cluster:
    """``nodes`` gatewayd nodes (``n1``, ``n2``...) over one broker, in ``root``; their
    directory in one PostgreSQL with ``postgres``, else in one shared SQLite file."""

    def __init__(
        self,
        root: Path,
        nodes: int = 3,
        say: Callable[[str], None] = lambda _: None,
        *,
        postgres: bool = False,
    ) -> None:
        self.root = root
        self.names = [f"n{i}" for i in range(1, nodes + 1)]
        self.lab = Lab(root, say)
        self.broker = Broker(root / "mosquitto")
        self.postgres = Postgres() if postgres else None
        self.ports: dict[str, int] = {}
        self.procs: dict[str, Proc] = {}

    # -- where things are ---------------------------------------------------------------

    def gateway(self, node: str) -> str:
        return f"127.0.0.1:{self.ports[node]}"

    def config(self, node: str) -> Path:
        return self.lab.config.with_name(f"gatewayd-{node}.toml")

    def trail(self, node: str) -> Path:
        return self.lab.config.parent / f"audit-{node}" / "audit.jsonl"

    def trail_args(self) -> list[str]:
        return [a for node in self.names for a in ("--trail", str(self.trail(node).parent))]

    # -- life cycle ---------------------------------------------------------------------

    def start(self, extra_config: str = "") -> None:
        """The broker, ``gatewayd init`` once, one config per node, every node."""
        self.broker.start()
        table = f'[cluster]\nmqtt = "{self.broker.address}"\nreply_timeout = 2\n'
        if self.postgres is not None:
            self.postgres.start()
            table += f'database = "{self.postgres.dsn}"\n'
        self.lab.init(extra_config=table + extra_config)
        base = self.lab.config.read_text()
        for i, node in enumerate(self.names):
            self.ports[node] = self.lab.port if i == 0 else free_port()
            text = re.sub(r'(?m)^node_id = "[^"]*"', f'node_id = "{node}"', base, count=1)
            text = text.replace(
                f'listen = "{self.lab.gateway}"', f'listen = "{self.gateway(node)}"', 1
            )
            text = text.replace('path = "audit/audit.jsonl"', f'path = "audit-{node}/audit.jsonl"')
            text = text.replace('socket = "admin.sock"', f'socket = "admin-{node}.sock"')
            self.config(node).write_text(text)
        # The lab's own helpers (directory, enrollment) talk to the first node.
        self.lab.config.write_text(self.config(self.names[0]).read_text())
        for node in self.names:
            self.start_node(node)

    def start_node(self, node: str) -> Proc:
        proc = self.lab.start(f"gatewayd-{node}", "gatewayd", "--config", str(self.config(node)))
        self.procs[node] = proc
        sock = self.config(node).parent / f"admin-{node}.sock"

        def ready() -> bool:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"gatewayd {node} exited: {proc.output()[-2000:]}")
            return sock.exists() and self.trail(node).exists()

        wait_for(ready, 30, f"gatewayd {node} to start")
        return proc

    def kill(self, node: str) -> None:
        """SIGKILL: the node dies without a word (its last will clears its presence)."""
        self.procs[node].stop(signal.SIGKILL)

    def close(self) -> None:
        self.lab.close()
        self.broker.stop()
        if self.postgres is not None:
            self.postgres.stop()

    # -- asking the nodes ---------------------------------------------------------------

    def admin(self, node: str, *args: str, input: str | None = None) -> str:
        cfg = str(self.config(node))
        return self.lab.run("gw", "admin", "--config", cfg, *args, input=input).stdout

    def holder(self, node: str, agent: str) -> str | None:
        """The node ``node`` says holds the agent's control connection, if its bus is up."""
        try:
            status: dict[str, Any] = json.loads(self.admin(node, "status"))
        except (RuntimeError, ValueError):
            return None
        cluster = status.get("cluster", {})
        held = cluster.get("agents", {}).get(agent) if cluster.get("bus") == "up" else None
        return str(held) if held else None

    def agent_config(
        self,
        agent: str,
        targets: dict[str, int],
        nodes: Sequence[str],
        backoff: tuple[float, float] = (0.5, 5.0),
    ) -> Path:
        """An agent config file naming ``nodes``, for ``gw agent run --config``;
        ``backoff``: its reconnect waits' first ceiling and cap."""
        path = self.root / f"agent-{agent}.toml"
        gateways = ", ".join(f'"{self.gateway(n)}"' for n in nodes)
        lines = [f'state_dir = "agent-{agent}"', f"gateways = [{gateways}]", "prompt = false"]
        lines += ["", "[targets]", *(f'{k} = "127.0.0.1:{v}"' for k, v in targets.items())]
        lines += ["", "[reconnect]", f"first = {backoff[0]}", f"max = {backoff[1]}", ""]
        path.write_text("\n".join(lines))
        return path

    def connect_stdio(
        self, node: str, agent: str, user: str, password: str, target: str, data: str
    ) -> subprocess.CompletedProcess[str]:
        args = self.lab.connect_args(
            agent, user, target, "access", "--stdio", "--password-stdin",
            "--totp", self.lab.totp(user),
        )  # fmt: skip
        args[args.index("--gateway") + 1] = self.gateway(node)
        return self.lab.run(*args, input=f"{password}\n{data}", check=False)


def main(argv: Sequence[str] | None = None) -> int:
    """``make demo-cluster``: the whole path across three nodes, printed step by step."""
    root = Path(argv[0] if argv else "demo-cluster-state").resolve()
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    password = "correct horse battery"  # noqa: S105 - the demo user's, printed anyway

    def say(text: str) -> None:
        print(f"\n==> {text}", flush=True)

    def show(text: str) -> None:
        for line in text.rstrip().splitlines():
            print(f"    {line}", flush=True)

    echo = EchoServer()
    c = Cluster(root, 3, say, postgres=True)
    try:
        say(
            "Mosquitto (the cluster bus), PostgreSQL (the shared directory, on a unix socket)"
            " and three gatewayd nodes n1, n2, n3 on loopback"
        )
        c.start()
        assert c.postgres is not None
        show(f"directory: {c.postgres.dsn}")
        for node in c.names:
            show(f"{node}: {c.gateway(node)}, trail {c.trail(node)}")
        say("directory (every node reads the same): org, vendor, agreement, users alice and bob")
        c.admin("n2", "org", "add", "clinic", "--name", "Demo Clinic")
        c.admin("n2", "vendor", "add", "acme", "--name", "Acme Records AS")
        c.lab.agreement("acme", "clinic", "access", unattended=True)
        c.lab.vendor_user("alice", "acme", password)
        c.lab.vendor_user("bob", "acme", password)
        say("agent 'reception-pc' enrolls, and runs with a config file naming all three nodes")
        c.lab.enroll_agent("reception-pc", "clinic")
        cfg = c.agent_config("reception-pc", {"echo": echo.port}, c.names)
        show(cfg.read_text())
        agent = c.lab.start("agent-reception-pc", "gw", "agent", "run", "--config", str(cfg))
        wait_for(lambda: c.holder("n1", "reception-pc") is not None, 30, "the agent online")
        home = c.holder("n1", "reception-pc")
        assert home is not None
        show(f"the agent is on {home} (a random node of its list); the nodes know it over MQTT")
        client = next(n for n in c.names if n != home)
        say(f"alice logs in to {client}; the agent on {home} dials straight to {client}")
        result = c.connect_stdio(client, "reception-pc", "alice", password, "echo", "hello\n")
        show(f"sent 'hello', got {result.stdout.strip()!r}")
        if result.stdout != "HELLO\n":
            print(f"demo failed: {result.stderr.strip()}", file=sys.stderr)
            return 1
        say(f"{home} is killed (SIGKILL): the agent moves to another node with jittered backoff")
        c.kill(home)
        alive = [n for n in c.names if n != home]
        wait_for(lambda: c.holder(alive[0], "reception-pc") in alive, 60, "the agent back")
        moved = c.holder(alive[0], "reception-pc")
        assert moved is not None
        show("\n".join(x for x in agent.output().splitlines() if "connect" in x or "reconn" in x))
        client = next(n for n in alive if n != moved)
        wait_for(lambda: c.holder(client, "reception-pc") == moved, 30, "presence")
        say(f"bob logs in to {client}: the agent is now on {moved}")
        result = c.connect_stdio(client, "reception-pc", "bob", password, "echo", "again\n")
        show(f"sent 'again', got {result.stdout.strip()!r}")
        if result.stdout != "AGAIN\n":
            print(f"demo failed: {result.stderr.strip()}", file=sys.stderr)
            return 1
        time.sleep(0.5)
        say("the three trails merged by time (gw audit --trail ... --agent reception-pc)")
        show(c.lab.run("gw", "audit", *c.trail_args(), "--agent", "reception-pc").stdout)
        say("gw audit verify: each node's chain on its own")
        verify = c.lab.run("gw", "audit", *c.trail_args(), "verify", check=False)
        show(verify.stdout + verify.stderr)
    finally:
        c.close()
        echo.close()
    print(f"\ndemo done; every process stopped; what it made is in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
