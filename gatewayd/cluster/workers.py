"""``gatewayd --workers N``: N processes on one host, each a node of the cluster.

The workers share the gateway's port (SO_REUSEPORT: the kernel spreads new
connections over them) and the directory; each is a node of its own on the bus,
with what a node cannot share made its own by :func:`worker_config`:

- node id ``NODE-i`` (``i`` from 1 to N), in its audit records and on the bus;
- its audit trail in a folder of its own, ``<audit folder>/NODE-i/<file name>``;
- its own port for data connections, ``[cluster] data_listen`` + ``i - 1`` (an agent's
  data connection must reach the worker that holds the client, which the shared port
  cannot promise), announced as ``data_address`` + ``i - 1``;
- the admin socket: worker 1 keeps the configured one (``gw admin`` reaches it, and a
  change or kill there reaches every worker over the bus); worker ``i`` adds ``-NODE-i``;
- the metrics listener, when enabled: its port + ``i - 1``.

:func:`supervise` runs in the first process: it starts the workers (``gatewayd
--workers N --worker i``), passes SIGTERM, SIGINT and SIGHUP on to each, and when
one ends by itself stops the others and exits with its status (systemd restarts
the whole).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from relay.errors import ConfigError

from ..config import Config

#: Most workers one host runs (a worker per core; more only share the cores).
MAX_WORKERS = 256


def check(cfg: Config, workers: int) -> None:
    """Whether ``cfg`` can run ``workers`` worker processes; ConfigError saying why not."""
    if not 1 <= workers <= MAX_WORKERS:
        raise ConfigError("--workers", f"must be between 1 and {MAX_WORKERS}")
    if workers == 1:
        return
    if cfg.cluster is None:
        raise ConfigError(
            "--workers",
            "needs [cluster] in the config: each worker is a node of a cluster (docs/cluster.md)",
        )
    if cfg.cluster.data_listen is None:
        raise ConfigError(
            "cluster.data_listen",
            "missing: with --workers each worker needs a data port of its own "
            "(data_listen + worker number - 1)",
        )
    for key, port in (
        ("cluster.data_listen", cfg.cluster.data_listen[1]),
        ("cluster.data_address", cfg.cluster.data_address[1]),
    ):
        if port + workers - 1 > 65535:
            raise ConfigError(key, f"port {port} + {workers - 1} workers is past 65535")


def worker_config(cfg: Config, index: int) -> Config:
    """The config of worker ``index`` (1-based) of a ``--workers`` node."""
    assert cfg.cluster is not None and cfg.cluster.data_listen is not None
    shift = index - 1
    node = f"{cfg.cluster.node_id}-{index}"
    data_host, data_port = cfg.cluster.data_listen
    addr_host, addr_port = cfg.cluster.data_address
    cluster = replace(
        cfg.cluster,
        node_id=node,
        data_listen=(data_host, data_port + shift),
        data_address=(addr_host, addr_port + shift),
    )
    audit = replace(cfg.audit, path=cfg.audit.path.parent / node / cfg.audit.path.name)
    admin = cfg.admin
    if index > 1:
        sock = cfg.admin.socket
        admin = replace(admin, socket=sock.with_name(f"{sock.stem}-{node}{sock.suffix}"))
    metrics = cfg.metrics
    if metrics.enabled and metrics.listen[1] != 0:  # port 0: each its own anyway
        metrics = replace(metrics, listen=(metrics.listen[0], metrics.listen[1] + shift))
    return replace(
        cfg,
        gateway=replace(cfg.gateway, node_id=node, reuse_port=True),
        cluster=cluster,
        audit=audit,
        admin=admin,
        metrics=metrics,
    )


def supervise(config_path: Path, workers: int, passthrough: list[str]) -> int:
    """Start the workers, pass signals on, and return the exit status of the first that ends."""
    env = dict(os.environ)
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):  # systemd talks to us
        env.pop(name, None)
    procs = [
        subprocess.Popen(  # noqa: S603 - this very program, no shell
            [
                sys.executable,
                "-m",
                "gatewayd",
                "--config",
                str(config_path),
                *passthrough,
                "--workers",
                str(workers),
                "--worker",
                str(i),
            ],
            env=env,
        )
        for i in range(1, workers + 1)
    ]
    stopping = False

    def forward(sig: int, _frame: object) -> None:
        nonlocal stopping
        if sig != signal.SIGHUP:
            stopping = True
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    from .. import systemd

    systemd.notify("READY=1", f"STATUS={workers} workers")
    status = 0
    while any(proc.poll() is None for proc in procs):
        ended = [proc for proc in procs if proc.poll() is not None]
        if ended and not stopping:
            status = ended[0].returncode or 1
            forward(signal.SIGTERM, None)
        time.sleep(0.2)
    systemd.notify("STOPPING=1")
    return status if not stopping else max((p.returncode or 0) for p in procs)
