"""The MQTT connection of one node: connect, subscribe, publish, reconnect.

:class:`Bus` keeps one aiomqtt client connected to the broker named by ``[cluster]``
(TLS and credentials from the config), with this node's last will set: when the
broker loses the node (killed, host gone, network cut) it publishes the node's
``dead`` state, retained, and the other nodes take its agents as offline. When the
connection drops, :meth:`Bus.run` waits (exponential backoff with full jitter,
capped) and connects again; ``on_up`` runs after each (re)connection so the node
republishes its presence. While it is down :meth:`Bus.publish` returns False and
callers fail what needed the bus with a clear error.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import ssl
from collections.abc import Callable
from typing import Any

import aiomqtt
import structlog

from relay.errors import ConfigError

from ..config import ClusterSection
from . import wire

log = structlog.get_logger("gatewayd.cluster")

#: Reconnect waits: the ceiling of the first, and the cap (seconds). A node is back on
#: the bus within five seconds of the broker; a few nodes retrying that often are no load.
BACKOFF_FIRST, BACKOFF_MAX = 0.25, 5.0
#: MQTT keepalive (seconds): a silent node is declared dead by the broker after 1.5 times
#: this, and a node takes a broker that stopped answering for gone as fast (a killed
#: process's socket closes at once, so its will goes out at once). A ping each way every
#: 5 s is no load.
KEEPALIVE = 5
#: Seconds between looks at whether the MQTT connection is still there.
WATCH_EVERY = 0.25
#: Publications in flight at once; beyond this the bus is congested and says so.
MAX_IN_FLIGHT = 10_000


def tls_context(section: ClusterSection) -> ssl.SSLContext | None:
    """The TLS context for the broker, or None for plain MQTT (no ``mqtt_ca_file``)."""
    if section.mqtt_ca_file is None:
        return None
    try:
        ctx = ssl.create_default_context(cafile=str(section.mqtt_ca_file))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if section.mqtt_cert_file is not None and section.mqtt_key_file is not None:
            ctx.load_cert_chain(str(section.mqtt_cert_file), str(section.mqtt_key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("cluster.mqtt_ca_file", f"cannot load the MQTT TLS files: {exc}") from exc
    return ctx


def _closed_by_peer(sock: Any) -> bool:
    """The broker closed the TCP connection and nothing is left to read (a look at the
    socket under TLS, without taking anything from it)."""
    try:
        fd = os.dup(sock.fileno())
    except (OSError, ValueError):
        return True
    with socket.socket(fileno=fd) as raw:
        try:
            return raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True


def password(section: ClusterSection) -> str | None:
    if section.mqtt_password_file is None:
        return None
    try:
        text = section.mqtt_password_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("cluster.mqtt_password_file", f"cannot read it: {exc}") from exc
    return text.splitlines()[0] if text else ""


class Bus:
    """One node's connection to the MQTT broker."""

    def __init__(
        self,
        section: ClusterSection,
        *,
        node: str,
        will: bytes,
        on_message: Callable[[str, bytes], None],
        on_up: Callable[[], None],
        on_down: Callable[[], None],
    ) -> None:
        self.section = section
        self.node = node
        self.will = will
        self.on_message = on_message
        self.on_up = on_up
        self.on_down = on_down
        self.client: aiomqtt.Client | None = None
        self.up = False
        self.connections = 0
        self._tls = tls_context(section)
        self._password = password(section)
        self._in_flight: set[asyncio.Task[None]] = set()

    def _client(self) -> aiomqtt.Client:
        host, port = self.section.mqtt
        version = (
            aiomqtt.ProtocolVersion.V5
            if self.section.mqtt_version == "5"
            else aiomqtt.ProtocolVersion.V311
        )
        return aiomqtt.Client(
            host,
            port,
            username=self.section.mqtt_username,
            password=self._password,
            identifier=f"gatewayd-{self.node}",
            protocol=version,
            will=aiomqtt.Will(wire.node_topic(self.node), self.will, qos=1, retain=True),
            keepalive=KEEPALIVE,
            timeout=5.0,
            tls_context=self._tls,
        )

    async def run(self) -> None:
        """Stay connected until cancelled."""
        failures = 0
        while True:
            try:
                async with self._client() as client:
                    await client.subscribe(
                        [(topic, 1) for topic in (*wire.SUBSCRIPTIONS, self.direct_topic)]
                    )
                    self.client, self.up = client, True
                    self.connections += 1
                    failures = 0
                    log.info(
                        "cluster bus up", broker=wire.hostport(self.section.mqtt), node=self.node
                    )
                    self.on_up()
                    await self._serve(client)
            except (aiomqtt.MqttError, OSError) as exc:
                what = "cluster bus down" if self.up else "cannot connect to the cluster bus"
                # At most one line per wait (5 s at the cap) while the broker is away.
                log.warning(what, broker=wire.hostport(self.section.mqtt), error=str(exc))
                failures += 1
            finally:
                was_up, self.up, self.client = self.up, False, None
                if was_up:
                    self.on_down()
            ceiling = min(BACKOFF_MAX, BACKOFF_FIRST * 2.0 ** min(failures, 16))
            await asyncio.sleep(ceiling * random.random())  # noqa: S311 - jitter, not crypto

    async def _serve(self, client: aiomqtt.Client) -> None:
        """Hand each message to ``on_message`` until the connection is lost."""
        loop = asyncio.get_running_loop()
        reader = loop.create_task(self._read(client))
        watchdog = loop.create_task(self._watch(client))
        try:
            await asyncio.wait({reader, watchdog}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, watchdog):
                task.cancel()
            for task in (reader, watchdog):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        failed = reader.exception() if reader.done() and not reader.cancelled() else None
        if failed is not None:
            raise failed
        raise aiomqtt.MqttError("connection to the MQTT broker lost")

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            if not isinstance(payload, bytes | bytearray):
                continue
            try:
                self.on_message(str(message.topic), bytes(payload))
            except Exception:  # a note must never take the node off the bus
                log.exception("cluster message failed", topic=str(message.topic)[:200])

    async def _watch(self, client: aiomqtt.Client) -> None:
        """Notice a lost connection that aiomqtt did not report: on uvloop, paho can
        lose its reader when the broker closes the connection while a publication is
        being registered, and would only find out at the next keepalive."""
        paho = getattr(client, "_client", None)
        # Polled: paho has no event to wait on for this.
        while paho is not None and paho.is_connected():
            sock = paho.socket()
            if sock is None or _closed_by_peer(sock):
                return
            await asyncio.sleep(WATCH_EVERY)

    @property
    def direct_topic(self) -> str:
        return wire.direct_topic(self.node)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        """Send ``payload`` (QoS 1) in order with every earlier one; False when the bus is
        down or congested (nothing is queued for later: callers say what failed)."""
        client = self.client
        if client is None or not self.up or len(self._in_flight) >= MAX_IN_FLIGHT:
            return False
        # aiomqtt hands the message to paho when the task first runs; tasks run in the
        # order they were created, so notes leave in the order they were published.
        task = asyncio.get_running_loop().create_task(self._send(client, topic, payload, retain))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        return True

    async def _send(self, client: aiomqtt.Client, topic: str, payload: bytes, retain: bool) -> None:
        try:
            await client.publish(topic, payload, qos=1, retain=retain)
        except aiomqtt.MqttError as exc:
            log.warning("cluster publish failed", topic=topic, error=str(exc))

    async def flush(self, timeout: float) -> None:
        """Wait (up to ``timeout``) until what was published so far has left."""
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=timeout)
