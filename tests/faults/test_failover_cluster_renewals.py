"""Batched lock renewals on a Redis Cluster when a primary hangs or dies.

The watchdog renews the locks of each primary in one pipeline to that primary
(tests/conformance/test_cluster_lock_batching.py). A primary that stops answering holds
up its own batch only: the other primaries' batches run on other renewal workers. A
killed primary fails its batch; redis-py then re-reads the slot map, so the retries go
to the replica that took over, and its locks stay held (not wrongly lost). The async
client's batches (tests/aio/test_aio_cluster_lock_batching.py) go through the same
failover in the same test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dcoord
from dcoord.aio import AsyncClient, AsyncLock
from dcoord.aio import connect as aio_connect
from tests.aio.adapter import Loop
from tests.conformance.test_cluster_lock_batching import ask
from tests.conformance.test_lock_batching import held_through, lost_names
from tests.faults import test_failover_cluster
from tests.servers import HOST, Server
from tests.topologies.cluster import NODE_TIMEOUT_MS, ClusterSet

# The failover tests' fixture: a Cluster started for this module (and stopped) too.
cluster = test_failover_cluster.cluster

PER_PRIMARY = 6


def spread_locks(
    client: dcoord.Client,
    cluster: ClusterSet,
    namespace: str,
    ttls: Callable[[int], float],
    **options: Any,
) -> dict[Server, list[dcoord.Lock]]:
    """``PER_PRIMARY`` locks on each primary; those of the ``i``-th primary found have
    TTL ``ttls(i)``."""
    by_primary: dict[Server, list[dcoord.Lock]] = {}
    for i in range(10_000):
        key = f"dcoord:{namespace}:lock:{{res{i}}}"
        primary = cluster.primary_for(key)
        found = by_primary.setdefault(primary, [])
        if len(found) < PER_PRIMARY:
            ttl = ttls(list(by_primary).index(primary))
            found.append(client.lock(f"res{i}", ttl=ttl, **options))
        if len(by_primary) == 3 and all(len(v) == PER_PRIMARY for v in by_primary.values()):
            return by_primary
    raise AssertionError(f"names hashed to only {len(by_primary)} primaries")


def replicated(primary: Server, key: str) -> None:
    """Return once ``primary``'s replica has every write made to it so far: a write
    of our own in ``key``'s slot, then WAIT for it (the stream is in order)."""
    admin = primary.redis_admin()
    try:
        admin.set(f"{key}:probe", "1", px=60_000)
        assert admin.execute_command("WAIT", 1, 10_000) >= 1, "no replica acknowledged"
    finally:
        admin.close()


def test_a_hung_primary_holds_up_only_its_own_locks_renewals(
    cluster: ClusterSet, namespace: str
) -> None:
    """The hung primary's batch waits for its reply (the request timeout is longer than
    the hang) on one renewal worker; the other primaries' locks, whose TTL is shorter
    than the hang, keep being renewed. (Before, each renewal was a request of its own
    on the 4 renewal workers, which the hung node's requests all took.)"""
    hang = 4.0
    names, _, on_lost = lost_names()
    with dcoord.connect(cluster.url, namespace=namespace, request_timeout=hang * 2) as client:
        # The first primary found is the one that hangs (its locks are renewed every
        # second, so some renewals wait for it); the others' locks live 2 s.
        by_primary = spread_locks(
            client, cluster, namespace, lambda i: 3.0 if i == 0 else 2.0, on_lost=on_lost
        )
        hung, *others = by_primary
        for locks in by_primary.values():
            for lock in locks:
                assert lock.acquire(blocking=False)
        healthy = [lock for node in others for lock in by_primary[node]]
        held_through(healthy, 1.0)  # renewed in batches meanwhile
        # Far above the hang: no failover while the primary does not answer.
        for node in cluster.live():
            ask(node, "CONFIG", "SET", "cluster-node-timeout", str(int(hang * 10_000)))
        try:
            hung.pause()
            try:
                held_through(healthy, hang)
            finally:
                hung.resume()
        finally:
            for node in cluster.live():
                ask(node, "CONFIG", "SET", "cluster-node-timeout", str(NODE_TIMEOUT_MS))
        held_through(healthy, 2.0)
        # The hung primary's own locks may be lost: their TTL ran out while it hung.
        hung_names = {lock.name for lock in by_primary[hung]}
        assert set(names) <= hung_names, names
        for lock in healthy:
            lock.release()


def test_the_locks_of_a_killed_primary_are_renewed_on_the_replica_that_took_over(
    cluster: ClusterSet, namespace: str
) -> None:
    """Their batch fails (connection refused) while the map still names the dead node;
    each failure has redis-py (sync) or redis.asyncio (async) re-read the map, so once
    the replica is promoted the retries go there and find the locks (replicated before
    the kill) still held. Both APIs in one failover (each is a ~20 s run)."""
    ttl = 12.0  # longer than a failover (node timeout 2 s, then an election) takes
    names, _, on_lost = lost_names()
    loop = Loop()
    aio_namespace = f"{namespace}-aio"

    async def connect_async() -> AsyncClient:
        return await aio_connect(cluster.url, namespace=aio_namespace, request_timeout=2)

    async def acquire(locks: list[AsyncLock]) -> None:
        for lock in locks:
            assert await lock.acquire(timeout=0)

    async def release(locks: list[AsyncLock]) -> None:
        for lock in locks:
            await lock.release()

    try:
        aio_client = loop.run(connect_async())
        with dcoord.connect(cluster.url, namespace=namespace, request_timeout=2) as client:
            by_primary = spread_locks(client, cluster, namespace, lambda i: ttl, on_lost=on_lost)
            # The same names under another namespace: the same slots, so the same primaries.
            aio_by_primary: dict[Server, list[Any]] = spread_locks(
                aio_client,  # type: ignore[arg-type]
                cluster,
                aio_namespace,
                lambda i: ttl,
                on_lost=on_lost,
            )
            everyone = [lock for locks in by_primary.values() for lock in locks]
            aio_everyone = [lock for locks in aio_by_primary.values() for lock in locks]
            for lock in everyone:
                assert lock.acquire(blocking=False)
            loop.run(acquire(aio_everyone))
            victim, *_ = by_primary
            key: str = by_primary[victim][0]._slot.key  # type: ignore[attr-defined]
            replicated(victim, key)
            replicated(victim, aio_by_primary[victim][0]._slot.key)
            victim.kill()
            new = cluster.wait_for_failover(victim, key)
            # Renewed (every ttl/3) on the new primary: without it they would expire.
            held_through([*everyone, *aio_everyone], ttl + 2)
            assert names == [], f"wrongly reported lost: {names}"
            for lock in (by_primary[victim][0], aio_by_primary[victim][0]):
                batch = lock._slot.renewal_batch()
                assert batch._node == f"{HOST}:{new.port}", "the map followed the failover"
            for lock in everyone:
                lock.release()
            loop.run(release(aio_everyone))
        loop.run(aio_client.close())
    finally:
        loop.stop()
    cluster.restart(victim)  # it rejoins as a replica of the node that took over
    cluster.wait_healthy()
