"""A Redis Cluster on loopback: three primaries with one replica each.

Nodes are the harness's own redis servers (tests/servers.py: processes or containers, by
the same provider rules) started with ``--cluster-enabled yes``; ``redis-cli --cluster
create`` then hands each primary a third of the 16384 slots and a replica. Each node's
cluster bus listens on a free port of its own (``cluster-port``), not on port + 10000,
which may be taken or out of range. A killed node keeps its ``nodes.conf`` and data, so
:meth:`ClusterSet.restart` brings it back as a replica of whoever took over its slots.

With TLS the client port, the cluster bus and replication all use TLS; with a password
it is the ``default`` user's on every node, and replicas authenticate to their primary
with it (``masterauth``).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
import time
from typing import Any
from urllib.parse import quote, urlencode

import redis
from redis.cluster import key_slot

from dcoord.cli.acl import redis_acl_rule
from tests.servers import (
    HOST,
    START_TIMEOUT,
    Certificates,
    ContainerServer,
    ProcessServer,
    Server,
    ServerUnavailable,
    provider,
)

# Short enough for failover tests (a primary is marked failed after this, its replica
# promoted about a second later), long enough that a busy two-core machine does not see
# false failures.
NODE_TIMEOUT_MS = 2000
PRIMARIES = 3


def _node(
    using: str, tls: Certificates | None, password: str | None, min_replicas_to_write: int
) -> Server:
    node = (ContainerServer if using == "containers" else ProcessServer)(
        "redis", tls=tls, password=password
    )
    # Server.__init__ picked a peer port that a redis server does not use: the bus gets it.
    args = [
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-node-timeout",
        str(NODE_TIMEOUT_MS),
        "--cluster-port",
        str(node.peer_port),
        "--min-replicas-to-write",
        str(min_replicas_to_write),
        # A (re)joining replica syncs at once, not after the default 5 s wait for others.
        "--repl-diskless-sync-delay",
        "0",
    ]
    if password is not None:
        args += ["--masterauth", password]
    if tls is not None:
        args += ["--tls-cluster", "yes", "--tls-replication", "yes"]
    node.redis_args = tuple(args)
    return node


class ClusterSet:
    """Six redis servers forming one Cluster; ``url`` names the three first primaries
    (redis-py discovers the rest).

    ``min_replicas_to_write`` (default 1, what ``dcoord doctor`` asks for) makes a
    primary refuse writes that no replica receives. With one replica per primary, a
    primary promoted after a failover then refuses writes until another replica joins:
    failover tests that need writes right after the promotion pass 0.
    """

    def __init__(
        self,
        *,
        tls: Certificates | None = None,
        password: str | None = None,
        using: str | None = None,
        min_replicas_to_write: int = 1,
    ) -> None:
        self.using = using or provider()
        self.tls = tls
        self.password = password
        self.nodes = [
            _node(self.using, tls, password, min_replicas_to_write) for _ in range(2 * PRIMARIES)
        ]

    # -- URLs and clients -------------------------------------------------------------

    @property
    def url(self) -> str:
        """The dcoord URL of the Cluster as the admin (``default``), with TLS options."""
        return self.user_url("default", self.password)

    def user_url(self, user: str, password: str | None, **options: str) -> str:
        """The URL as ``user``, with ``min_replicas=1`` unless ``options`` say otherwise
        (what a deployment on a topology that fails over sets: a forced decision-log
        write waits for a replica) and the TLS options."""
        scheme = "rediss+cluster" if self.tls else "redis+cluster"
        auth = f"{quote(user, safe='')}:{quote(password, safe='')}@" if password else ""
        hosts = ",".join(f"{HOST}:{node.port}" for node in self.nodes[:PRIMARIES])
        query = {"min_replicas": "1", **(self.tls.client_options() if self.tls else {})}
        return f"{scheme}://{auth}{hosts}?{urlencode({**query, **options})}"

    def confine(self, namespace: str, user: str, password: str) -> str:
        """Create ``user`` confined to ``namespace`` on every node (a Cluster does not
        share ACLs between nodes) and return its URL."""
        rule = redis_acl_rule(namespace, user=user, password=password, cluster=True)
        for node in self.live():
            self._ask(node, *rule)
        return self.user_url(user, password)

    def live(self) -> list[Server]:
        return [node for node in self.nodes if node.running()]

    def _ask(self, node: Server, *command: str) -> Any:
        admin = node.redis_admin()
        try:
            return admin.execute_command(*command)
        finally:
            admin.close()

    # -- start and stop ---------------------------------------------------------------

    def start(self) -> None:
        """Start the nodes, create the Cluster and wait until every node sees every slot
        served and every replica is in sync with its primary."""
        errors: list[BaseException] = []

        def start(node: Server) -> None:
            try:
                node.start()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(n,)) for n in self.nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            self.stop()
            raise errors[0]
        try:
            self._create()
            self.wait_healthy(listed=False)
            self._touch_every_primary()
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise

    def _create(self) -> None:
        # redis-cli puts the first three nodes' slots first and makes the others their
        # replicas (it warns that they share a host: every test node is on 127.0.0.1).
        args = ["--cluster", "create", *(f"{HOST}:{n.port}" for n in self.nodes)]
        args += ["--cluster-replicas", "1", "--cluster-yes"]
        if self.password is not None:
            args += ["-a", self.password, "--no-auth-warning"]
        if self.tls is not None:
            cert, key = self.tls.pair("client")
            args += ["--tls", "--cacert", self.tls.ca, "--cert", cert, "--key", key]
        if shutil.which("redis-cli") is not None:
            done = subprocess.run(["redis-cli", *args], capture_output=True, text=True, timeout=120)
            code, output = done.returncode, done.stdout + done.stderr
        else:
            first = self.nodes[0]
            if not isinstance(first, ContainerServer):
                raise ServerUnavailable("redis-cli is not installed (apt-get install redis-tools)")
            code, raw = first.container.exec(["redis-cli", *args])
            output = raw.decode(errors="replace")
        if code != 0 or "[OK] All 16384 slots covered" not in output:
            raise ServerUnavailable(f"redis-cli --cluster create failed ({code}):\n{output}")

    def _touch_every_primary(self) -> None:
        # CLUSTER SLOTS (what clients read) leaves out a replica whose replication
        # offset is still 0, so a fresh, empty Cluster would show no replicas for up to
        # the 10 s between replication pings: one write (and its undo) per primary.
        ranges = self._ask(self.nodes[0], "CLUSTER", "SLOTS")
        for first, last, primary, *_ in ranges:
            key = next(
                f"dcoord-test:{i}"
                for i in range(100_000)
                if first <= key_slot(f"dcoord-test:{i}".encode()) <= last
            )
            node = self.node_at(int(primary[1]))
            self._write_when_replicas_ack(node, "SET", key, "1")
            self._write_when_replicas_ack(node, "DEL", key)

    def _write_when_replicas_ack(self, node: Server, *command: str) -> None:
        # With min-replicas-to-write, a primary refuses writes (NOREPLICAS) until its
        # replica's first REPLCONF ACK, sent about a second after the link comes up: a
        # link that is up is not yet a "good" replica. Under load that second stretched,
        # and the first write failed the whole fixture.
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                self._ask(node, *command)
                return
            except redis.ResponseError as exc:
                if not str(exc).startswith("NOREPLICAS") or time.monotonic() >= deadline:
                    raise
            time.sleep(0.05)  # poll with a deadline: the ACK has no event to wait on

    def wait_healthy(self, timeout: float = START_TIMEOUT, *, listed: bool = True) -> None:
        """Poll until every live node reports ``cluster_state:ok`` with all slots ok and
        knows every node, every live replica's link to its primary is up, and (``listed``)
        the slot map lists a replica for every primary."""
        deadline = time.monotonic() + timeout
        problem = "not checked yet"
        while time.monotonic() < deadline:
            problem = self._health_problem(listed) or ""
            if not problem:
                return
            time.sleep(0.1)
        raise ServerUnavailable(f"redis cluster not healthy after {timeout:g} s: {problem}")

    def _health_problem(self, listed: bool) -> str | None:
        for node in self.live():
            try:
                info = _fields(self._ask(node, "CLUSTER", "INFO"))
                replication = self._ask(node, "INFO", "replication")
            except Exception as exc:
                return f"node {node.port}: {exc!r}"
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != "16384":
                return f"node {node.port}: {info}"
            if int(info.get("cluster_known_nodes", 0)) != len(self.nodes):
                return f"node {node.port} knows {info.get('cluster_known_nodes')} nodes"
            if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                return f"replica {node.port}: link to its primary is not up"
        live = len(self.live())
        if listed and live == len(self.nodes):
            listed = sum(len(r) - 3 for r in self._ask(self.live()[0], "CLUSTER", "SLOTS"))
            if listed < live - PRIMARIES:
                return f"the slot map lists {listed} replicas of {live - PRIMARIES}"
        return None

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()

    def __enter__(self) -> ClusterSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- faults -----------------------------------------------------------------------

    def node_at(self, port: int) -> Server:
        for node in self.nodes:
            if node.port == port:
                return node
        raise LookupError(f"no node of this cluster listens on port {port}")

    def primary_for(self, key: str) -> Server:
        """The node that serves ``key``'s hash slot now, as the live nodes see it."""
        slot = key_slot(key.encode())
        problems = []
        for node in self.live():
            try:
                ranges = self._ask(node, "CLUSTER", "SLOTS")
            except Exception as exc:
                problems.append(f"{node.port}: {exc!r}")
                continue
            for first, last, primary, *_ in ranges:
                if first <= slot <= last:
                    return self.node_at(int(primary[1]))
        raise LookupError(f"no live node names the primary of slot {slot}: {problems}")

    def replicas_of(self, primary: Server) -> list[Server]:
        """The live nodes that replicate ``primary``."""
        found = []
        for node in self.live():
            if node is primary:
                continue
            with contextlib.suppress(Exception):
                replication = self._ask(node, "INFO", "replication")
                if replication.get("master_port") == primary.port:
                    found.append(node)
        return found

    def kill_primary_of(self, key: str) -> Server:
        """SIGKILL (or container kill) the primary of ``key``'s slot; return it."""
        primary = self.primary_for(key)
        primary.kill()
        return primary

    def wait_for_failover(self, old: Server, key: str, timeout: float = 30.0) -> Server:
        """Poll until a live node other than ``old`` serves ``key``'s slot, reports
        ``role:master`` and the Cluster is ok again; return that new primary."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                new = self.primary_for(key)
                if new is not old and new.running():
                    role = self._ask(new, "INFO", "replication").get("role")
                    if role == "master" and self._cluster_ok():
                        return new
                    last = f"{new.port} has role {role}"
                else:
                    last = f"slot still served by {new.port}"
            except Exception as exc:
                last = exc
            time.sleep(0.05)
        raise ServerUnavailable(f"no failover from {old.port} within {timeout:g} s: {last!r}")

    def _cluster_ok(self) -> bool:
        for node in self.live():
            try:
                info = _fields(self._ask(node, "CLUSTER", "INFO"))
            except Exception:
                return False
            if info.get("cluster_state") != "ok":
                return False
        return True

    def restart(self, node: Server) -> None:
        """Start a killed node again; it rejoins (as a replica if it lost its slots)."""
        node.start()


def _fields(text: bytes | str) -> dict[str, str]:
    """``CLUSTER INFO``'s ``name:value`` lines as a dict."""
    if isinstance(text, bytes):
        text = text.decode()
    fields = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name:
            fields[name.strip()] = value.strip()
    return fields
