"""Real multi-server topologies for tests and benchmarks, on loopback only.

Each module starts one kind from the harness's own servers (tests/servers.py: processes
or containers, by the same provider rules) and stops every server it started:

- :mod:`.sentinel`: a Redis primary, two replicas and three sentinels;
- :mod:`.cluster`: a Redis Cluster of three primaries with one replica each;
- :mod:`.etcd`: a three-member etcd cluster.

Every topology has ``url`` (a dcoord URL with the admin's credentials), ``start()``,
``stop()`` and works as a context manager; each adds the faults its tests inject
(failover, killing a primary or the etcd leader).

``DCOORD_TEST_TOPOLOGY=sentinel|cluster|etcd3`` makes the shared ``redis`` (or ``etcd``)
server of the test suite such a topology (tests/conftest.py), so the conformance suite
runs against it unchanged.
"""
