"""Async lock renewals on a Redis Cluster: one pipeline per primary.

The async twin of tests/conformance/test_cluster_lock_batching.py, with its helpers
(the Cluster and per-primary ``INFO`` counts, the locks spread over the primaries, the
resharding by hand). Run with ``DCOORD_TEST_TOPOLOGY=cluster`` (skipped elsewhere): the
renewal scheduler's batch of a lock (``slot.renewal_batch()``) is that of the primary
that serves its slot in redis.asyncio's slot map, so the locks of three primaries due
together are renewed in one pipeline to each, not one request per lock.

The client runs on an event loop of its own thread (tests/aio/adapter.py's ``Loop``),
so the test polls its locks' ``held`` from here without blocking its renewals.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

import dcoord
from dcoord.aio import AsyncClient, AsyncLock, connect
from dcoord.backends.aio_base import AsyncLockSlot
from dcoord.backends.base import LockGrant, Renewed
from dcoord.backends.redis import aio_locks
from tests.aio.adapter import Loop
from tests.conformance import test_cluster_lock_batching as batching
from tests.conformance.test_cluster_lock_batching import (
    PER_PRIMARY,
    TTL,
    Counts,
    ask,
    migrating,
    spread_locks,
)
from tests.conformance.test_lock_batching import held_through, lost_names
from tests.servers import HOST, Server
from tests.topologies.cluster import ClusterSet

pytestmark = pytest.mark.parametrize("real_backend", ["redis"], indirect=True)

# The sync module's fixtures: the Cluster of the topology (skips elsewhere), its counts.
cluster = batching.cluster
counts = batching.counts


@pytest.fixture
def client(
    cluster: ClusterSet, real_backend_url: str, namespace: str, loop: Loop
) -> Iterator[AsyncClient]:
    async def make() -> AsyncClient:
        return await connect(real_backend_url, namespace=namespace)

    made = loop.run(make())
    yield made
    loop.run(made.close())


def spread(
    client: AsyncClient, cluster: ClusterSet, loop: Loop, ttl: float, **options: Any
) -> tuple[dict[Server, list[AsyncLock]], list[AsyncLock]]:
    """``PER_PRIMARY`` held locks on each primary (by primary, and all of them)."""
    by_primary: dict[Server, list[Any]] = spread_locks(client, cluster, ttl, **options)  # type: ignore[arg-type]
    everyone = [lock for locks in by_primary.values() for lock in locks]

    async def acquire() -> None:
        for lock in everyone:
            assert await lock.acquire(timeout=0)

    loop.run(acquire())
    return by_primary, everyone


def release(loop: Loop, locks: Sequence[AsyncLock]) -> None:
    async def run() -> None:
        for lock in locks:
            await lock.release()

    loop.run(run())


def batch_of(lock: AsyncLock) -> Any:
    batch = lock._slot.renewal_batch()  # type: ignore[attr-defined]
    assert batch is not None, "on a Cluster, every lock's renewals join its node's batch"
    return batch


class BatchSpy:
    """Records which node each batch the renewal scheduler sends goes to, and its size."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: list[tuple[str, int]] = []
        self.grew = threading.Event()
        real = aio_locks._NodeExtends.extend_many

        async def spy(batch: Any, requests: Sequence[tuple[AsyncLockSlot, float]]) -> list[Renewed]:
            answers = await real(batch, requests)
            self.sizes.append((batch._node, len(requests)))
            if len({node for node, size in self.sizes if size > 1}) == 3:
                self.grew.set()
            return answers

        monkeypatch.setattr(aio_locks._NodeExtends, "extend_many", spy)


def test_a_batch_is_one_round_trip_per_primary(
    client: AsyncClient, cluster: ClusterSet, counts: Counts, loop: Loop
) -> None:
    """Before, an async Cluster lock had no batch: one request per renewal."""
    by_primary, everyone = spread(client, cluster, loop, ttl=60)
    batches: dict[Any, list[AsyncLock]] = {}
    for lock in everyone:
        batches.setdefault(batch_of(lock), []).append(lock)
    assert len(batches) == 3, "one batch per primary"
    for primary, locks in by_primary.items():
        assert {batch_of(lock)._node for lock in locks} == {f"{HOST}:{primary.port}"}

    async def extend_each_batch() -> None:
        for batch, locks in batches.items():
            answers = await batch.extend_many([(lock._slot, 60.0) for lock in locks])
            assert all(isinstance(answer, LockGrant) for answer in answers), answers

    loop.run(extend_each_batch())  # the script loaded, the connections open
    before = counts()
    loop.run(extend_each_batch())
    after = counts()
    for primary, locks in by_primary.items():
        reads, scripts = after[primary]
        assert scripts - before[primary][1] == len(locks), "each lock runs its own script"
        # One read for the pipeline (a second if the kernel split it), one for the INFO,
        # and a replica's REPLCONF ACK (one a second) may land in between.
        assert reads - before[primary][0] - 1 <= 3, (primary.port, reads - before[primary][0])

    # Negative control: the same renewals one by one cost a round trip each.
    async def extend_each_lock() -> None:
        for lock in everyone:
            assert await lock._slot.extend(60.0) is not None

    before = counts()
    loop.run(extend_each_lock())
    after = counts()
    for primary, locks in by_primary.items():
        assert after[primary][0] - before[primary][0] - 1 >= len(locks)
    release(loop, everyone)


def test_the_scheduler_renews_each_primarys_locks_in_shared_round_trips(
    client: AsyncClient,
    cluster: ClusterSet,
    counts: Counts,
    loop: Loop,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spy = BatchSpy(monkeypatch)
    by_primary, everyone = spread(client, cluster, loop, ttl=TTL)
    before = counts()
    held_through(everyone, TTL * 2)  # type: ignore[arg-type]  # some 6 renewals each
    after = counts()
    for primary in by_primary:
        reads, scripts = (after[primary][i] - before[primary][i] for i in (0, 1))
        assert scripts >= PER_PRIMARY, (primary.port, scripts)
        # Batches of several: fewer reads than scripts (replication ACKs and the INFOs
        # read here are some of the reads). One request per renewal: reads >= scripts.
        assert reads < scripts, (primary.port, reads, scripts)
    assert spy.grew.is_set(), f"renewals were not batched on every primary: {spy.sizes}"
    assert set(Counter(node for node, _ in spy.sizes)) == {
        f"{HOST}:{primary.port}" for primary in by_primary
    }
    release(loop, everyone)


def test_one_lost_lock_in_a_primarys_batch_is_the_only_one_reported(
    client: AsyncClient, cluster: ClusterSet, loop: Loop, monkeypatch: pytest.MonkeyPatch
) -> None:
    names, lost, on_lost = lost_names()
    spy = BatchSpy(monkeypatch)
    by_primary, everyone = spread(client, cluster, loop, ttl=TTL, on_lost=on_lost)
    assert spy.grew.wait(TTL * 5), f"renewals were not batched on every primary: {spy.sizes}"
    primary, locks = next(iter(by_primary.items()))
    victim = locks[PER_PRIMARY // 2]
    ask(primary, "DEL", victim._slot.key)  # type: ignore[attr-defined]  # a failover ate it

    assert lost.wait(TTL * 3), "the lock the server no longer has must be reported lost"
    assert names == [victim.name]
    assert not victim.held
    survivors = [lock for lock in everyone if lock is not victim]
    held_through(survivors, TTL * 2)  # type: ignore[arg-type]  # renewed in batches all the while
    assert names == [victim.name], "exactly the one lost lock is reported"
    with pytest.raises(dcoord.LockNotOwned):
        loop.run(victim.release())
    release(loop, survivors)


def test_a_resharded_lock_is_renewed_where_its_key_moved(
    client: AsyncClient, cluster: ClusterSet, loop: Loop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the sync test: while the lock's slot migrates, its old node answers its
    extend in the batch with ASK; once moved, with MOVED. Either way the lock is renewed
    alone through the cluster client (which follows the redirection and, for MOVED,
    updates its slot map, so the next batches go to the new node), never lost."""
    names, _, on_lost = lost_names()
    spy = BatchSpy(monkeypatch)
    by_primary, everyone = spread(client, cluster, loop, ttl=TTL, on_lost=on_lost)
    assert spy.grew.wait(TTL * 5), f"renewals were not batched on every primary: {spy.sizes}"
    source, *others = by_primary
    target = others[0]
    victim = by_primary[source][0]
    key: str = victim._slot.key  # type: ignore[attr-defined]

    async def two_free_connections() -> None:
        # redis.asyncio sends ASKING and the command as two pooled commands: with two
        # free connections to the target they went on different ones and the lock was
        # lost ("TTL exhausted", once in CI); dcoord sends both in one write.
        cluster_client: Any = client.backend.locks.redis  # type: ignore[attr-defined]
        node = cluster_client.get_node(host=HOST, port=target.port)
        await asyncio.gather(node.execute_command("PING"), node.execute_command("PING"))

    loop.run(two_free_connections())
    with migrating(cluster, list(by_primary), source, target, key):
        # Its extends now get ASK from the source (batched there with its neighbours).
        spy.sizes.clear()
        held_through(everyone, TTL * 2)  # type: ignore[arg-type]
        assert any(node == f"{HOST}:{source.port}" and n > 1 for node, n in spy.sizes)
    # The source now answers MOVED, until the client's map learns where the slot went.
    held_through(everyone, TTL * 2)  # type: ignore[arg-type]
    assert names == [], f"wrongly reported lost: {names}"
    assert batch_of(victim)._node == f"{HOST}:{target.port}", "the map followed the slot"
    assert ask(target, "EXISTS", key) == 1
    release(loop, everyone)
