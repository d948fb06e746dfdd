"""Async batched lock renewals on a Redis Cluster when a primary dies.

The async client renews each primary's locks in one pipeline to that primary
(tests/aio/test_aio_cluster_lock_batching.py). A killed primary fails its batch, which
has redis.asyncio re-read the slot map, so the retries go to the replica that took over
and its locks stay held (as the sync client's, tests/faults/test_failover_cluster_renewals.py,
whose Cluster fixture and helpers this module uses).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from dcoord.aio import AsyncClient, AsyncLock, connect
from tests.aio.adapter import Loop
from tests.conformance.test_lock_batching import held_through, lost_names
from tests.faults import test_failover_cluster_renewals as sync_renewals
from tests.faults.test_failover_cluster_renewals import replicated, spread_locks
from tests.servers import HOST, Server
from tests.topologies.cluster import ClusterSet

cluster = sync_renewals.cluster


@pytest.fixture
def loop() -> Iterator[Loop]:
    running = Loop()
    yield running
    running.stop()


def test_async_locks_of_a_killed_primary_are_renewed_on_the_replica_that_took_over(
    cluster: ClusterSet, namespace: str, loop: Loop
) -> None:
    """Their batch fails (connection refused) while the map still names the dead node;
    each failure re-reads the map, so once the replica is promoted the retries go there
    and find the locks (replicated before the kill) still held."""
    ttl = 12.0  # longer than a failover (node timeout 2 s, then an election) takes
    names, _, on_lost = lost_names()

    async def make() -> AsyncClient:
        return await connect(cluster.url, namespace=namespace, request_timeout=2)

    client = loop.run(make())
    try:
        # The sync module's spread_locks: it only names the locks (client.lock).
        by_primary: dict[Server, list[Any]] = spread_locks(
            client,  # type: ignore[arg-type]
            cluster,
            namespace,
            lambda i: ttl,
            on_lost=on_lost,
        )
        everyone: list[AsyncLock] = [lock for locks in by_primary.values() for lock in locks]

        async def acquire() -> None:
            for lock in everyone:
                assert await lock.acquire(timeout=0)

        loop.run(acquire())
        victim, *_ = by_primary
        key: str = by_primary[victim][0]._slot.key
        replicated(victim, key)
        victim.kill()
        new = cluster.wait_for_failover(victim, key)
        # Renewed (every ttl/3) on the new primary: without it they would expire.
        held_through(everyone, ttl + 2)  # type: ignore[arg-type]
        assert names == [], f"wrongly reported lost: {names}"
        batch = by_primary[victim][0]._slot.renewal_batch()
        assert batch._node == f"{HOST}:{new.port}"

        async def release() -> None:
            for lock in everyone:
                await lock.release()

        loop.run(release())
    finally:
        loop.run(client.close())
    cluster.restart(victim)  # it rejoins as a replica of the node that took over
    cluster.wait_healthy()
