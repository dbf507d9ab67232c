"""gatewayd nodes as a cluster over MQTT (``[cluster]`` in the config).

- :mod:`gatewayd.cluster.wire`: the topics and payloads, without I/O;
- :mod:`gatewayd.cluster.bus`: one node's MQTT connection (aiomqtt), reconnecting;
- :mod:`gatewayd.cluster.directory`: the session directory of a node in a cluster
  (presence, dial routing, revocation, outage), its theory of operation;
- :mod:`gatewayd.cluster.workers`: ``gatewayd --workers N``, N nodes on one host.

Nothing here is imported without ``[cluster]`` (a node alone needs no MQTT), and this
package imports none of its modules itself: ``workers`` must load without aiomqtt.
"""
