"""gatewayd nodes as a cluster over MQTT (``[cluster]`` in the config).

- :mod:`gatewayd.cluster.wire`: the topics and payloads, without I/O;
- :mod:`gatewayd.cluster.bus`: one node's MQTT connection (aiomqtt), reconnecting;
- :mod:`gatewayd.cluster.directory`: the session directory of a node in a cluster
  (presence, dial routing, revocation, outage), its theory of operation.

Without ``[cluster]`` none of this is imported: a node alone needs no MQTT.
"""

from __future__ import annotations

from .directory import ClusterDirectory, ClusterUnavailable, RemoteAgent

__all__ = ["ClusterDirectory", "ClusterUnavailable", "RemoteAgent"]
