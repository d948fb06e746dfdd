"""Batched lock renewals on a Redis Cluster: one pipeline per primary.

Run with ``DCOORD_TEST_TOPOLOGY=cluster`` (skipped elsewhere; single servers and
Sentinel are tests/conformance/test_lock_batching.py). The watchdog's batch of a lock is
that of the primary that serves its slot in redis-py's slot map, so the extends of locks
spread over three primaries go out as one pipeline to each. Round trips are counted on
each primary by the server (``INFO``: ``total_reads_processed``, ``cmdstat_evalsha``).

A resharding moves a slot while the client's map still names the old node: that node
answers the lock's extend in the batch with ASK (slot migrating) or MOVED (slot gone),
and the lock must be renewed where its key now is, not reported lost.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from redis.cluster import key_slot

import dcoord
from dcoord.backends.base import LockGrant, LockSlot, Renewed
from dcoord.backends.redis import locks as redis_locks
from tests.conformance.test_lock_batching import held_through, lost_names
from tests.conftest import Servers
from tests.servers import HOST, Server
from tests.topologies.cluster import ClusterSet

pytestmark = pytest.mark.parametrize("real_backend", ["redis"], indirect=True)

TTL = 1.5
PER_PRIMARY = 8  # locks on each primary


@pytest.fixture
def cluster(real_backend_url: str, servers: Servers) -> ClusterSet:
    started = servers._started.get("redis")
    if not isinstance(started, ClusterSet):
        pytest.skip("needs the Redis Cluster topology (DCOORD_TEST_TOPOLOGY=cluster)")
    return started


@pytest.fixture
def client(cluster: ClusterSet, real_backend_url: str, namespace: str) -> Iterator[dcoord.Client]:
    with dcoord.connect(real_backend_url, namespace=namespace) as client:
        yield client


def ask(node: Server, *command: Any) -> Any:
    admin = node.redis_admin()
    try:
        return admin.execute_command(*command)
    finally:
        admin.close()


class Counts:
    """Requests read and EVALSHA runs of each primary so far, one INFO each on a
    connection kept open (a new connection's handshake would be reads of its own)."""

    def __init__(self, primaries: list[Server]) -> None:
        self._admins = {node: node.redis_admin() for node in primaries}

    def __call__(self) -> dict[Server, tuple[int, int]]:
        counts = {}
        for node, admin in self._admins.items():
            info = admin.info("everything")
            evalsha = info.get("cmdstat_evalsha", {}).get("calls", 0)
            counts[node] = int(info["total_reads_processed"]), int(evalsha)
        return counts

    def close(self) -> None:
        for admin in self._admins.values():
            admin.close()


@pytest.fixture
def counts(cluster: ClusterSet) -> Iterator[Counts]:
    ranges = ask(cluster.live()[0], "CLUSTER", "SLOTS")
    counts = Counts([cluster.node_at(port) for port in sorted({int(r[2][1]) for r in ranges})])
    yield counts
    counts.close()


def spread_locks(
    client: dcoord.Client, cluster: ClusterSet, ttl: float, **options: Any
) -> dict[Server, list[dcoord.Lock]]:
    """``PER_PRIMARY`` locks on each primary (names tried until each has enough)."""
    by_primary: dict[Server, list[dcoord.Lock]] = {}
    for i in range(10_000):
        lock = client.lock(f"res{i}", ttl=ttl, **options)
        found = by_primary.setdefault(cluster.primary_for(lock._slot.key), [])  # type: ignore[attr-defined]
        if len(found) < PER_PRIMARY:
            found.append(lock)
        if len(by_primary) == 3 and all(len(v) == PER_PRIMARY for v in by_primary.values()):
            return by_primary
    raise AssertionError(f"names hashed to only {len(by_primary)} primaries")


def node_of(lock: dcoord.Lock) -> str:
    """The node name of the batch the lock's renewals join."""
    batch = lock._slot.renewal_batch()  # type: ignore[attr-defined]
    assert batch is not None, "on a Cluster, every lock's renewals join its node's batch"
    return str(batch._node)


class BatchSpy:
    """Records which node each batch the watchdog sends goes to, and its size."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: list[tuple[str, int]] = []
        self.grew = threading.Event()
        real = redis_locks._Renewals.extend_many

        def spy(batch: Any, requests: list[tuple[LockSlot, float]]) -> list[Renewed]:
            answers = real(batch, requests)
            self.sizes.append((batch._node, len(requests)))
            if len({node for node, size in self.sizes if size > 1}) == 3:
                self.grew.set()
            return answers

        monkeypatch.setattr(redis_locks._Renewals, "extend_many", spy)


def spread(
    client: dcoord.Client, cluster: ClusterSet, ttl: float, **options: Any
) -> tuple[dict[Server, list[dcoord.Lock]], list[dcoord.Lock]]:
    """``PER_PRIMARY`` held locks on each primary (by primary, and all of them)."""
    by_primary = spread_locks(client, cluster, ttl=ttl, **options)
    everyone = [lock for locks in by_primary.values() for lock in locks]
    for lock in everyone:
        assert lock.acquire(blocking=False)
    return by_primary, everyone


def test_a_batch_is_one_round_trip_per_primary(
    client: dcoord.Client, cluster: ClusterSet, counts: Counts
) -> None:
    """Before, a Cluster renewed each lock alone: one round trip per lock."""
    by_primary = spread_locks(client, cluster, ttl=60)
    everyone = [lock for locks in by_primary.values() for lock in locks]
    for lock in everyone:
        assert lock.acquire(blocking=False)
    batches: dict[Any, list[dcoord.Lock]] = {}
    for lock in everyone:
        batches.setdefault(lock._slot.renewal_batch(), []).append(lock)  # type: ignore[attr-defined]
    assert len(batches) == 3, "one batch per primary"
    for primary, locks in by_primary.items():
        assert {node_of(lock) for lock in locks} == {f"{HOST}:{primary.port}"}
    for batch, locks in batches.items():  # the script loaded, the connections open
        batch.extend_many([(locks[0]._slot, 60.0)])

    before = counts()
    for batch, locks in batches.items():
        answers = batch.extend_many([(lock._slot, 60.0) for lock in locks])
        assert all(isinstance(answer, LockGrant) for answer in answers), answers
    after = counts()
    for primary, locks in by_primary.items():
        reads, scripts = after[primary]
        assert scripts - before[primary][1] == len(locks), "each lock runs its own script"
        # One read for the pipeline (a second if the kernel split it), one for the INFO,
        # and a replica's REPLCONF ACK (one a second) may land in between.
        assert reads - before[primary][0] - 1 <= 3, (primary.port, reads - before[primary][0])

    # Negative control: the same renewals one by one cost a round trip each.
    before = counts()
    for lock in everyone:
        assert lock._slot.extend(60.0) is not None  # type: ignore[attr-defined]
    after = counts()
    for primary, locks in by_primary.items():
        assert after[primary][0] - before[primary][0] - 1 >= len(locks)
    for lock in everyone:
        lock.release()


def test_the_watchdog_renews_each_primarys_locks_in_shared_round_trips(
    client: dcoord.Client, cluster: ClusterSet, counts: Counts, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = BatchSpy(monkeypatch)
    by_primary, everyone = spread(client, cluster, ttl=TTL)
    before = counts()
    assert spy.grew.wait(TTL * 5), f"renewals were not batched on every primary: {spy.sizes}"
    held_through(everyone, TTL)
    after = counts()
    for primary in by_primary:
        reads, scripts = (after[primary][i] - before[primary][i] for i in (0, 1))
        assert scripts >= PER_PRIMARY, (primary.port, scripts)
        # Batches of several: fewer reads than scripts (replication ACKs and the INFOs
        # read here are some of the reads).
        assert reads < scripts, (primary.port, reads, scripts)
    sent = Counter(node for node, _ in spy.sizes)
    assert set(sent) == {f"{HOST}:{primary.port}" for primary in by_primary}, sent
    for lock in everyone:
        lock.release()


def test_one_lost_lock_in_a_primarys_batch_is_the_only_one_reported(
    client: dcoord.Client, cluster: ClusterSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    names, lost, on_lost = lost_names()
    spy = BatchSpy(monkeypatch)
    by_primary, everyone = spread(client, cluster, ttl=TTL, on_lost=on_lost)
    assert spy.grew.wait(TTL * 5), f"renewals were not batched on every primary: {spy.sizes}"
    victim = next(iter(by_primary.values()))[PER_PRIMARY // 2]
    client.backend.redis.delete(victim._slot.key)  # type: ignore[attr-defined]  # a failover ate it

    assert lost.wait(TTL * 3), "the lock the server no longer has must be reported lost"
    assert names == [victim.name]
    assert not victim.held
    survivors = [lock for lock in everyone if lock is not victim]
    held_through(survivors, TTL * 2)  # renewed in batches all the while
    assert names == [victim.name], "exactly the one lost lock is reported"
    with pytest.raises(dcoord.LockNotOwned):
        victim.release()
    for lock in survivors:
        lock.release()


def node_id(node: Server) -> str:
    reply = ask(node, "CLUSTER", "MYID")
    return reply.decode() if isinstance(reply, bytes) else str(reply)


def migrate(cluster: ClusterSet, source: Server, target: Server, *keys: str | bytes) -> None:
    auth = ["AUTH2", "default", cluster.password] if cluster.password else []
    ask(source, "MIGRATE", HOST, target.port, "", 0, 5000, *auth, "KEYS", *keys)


@contextlib.contextmanager
def migrating(
    cluster: ClusterSet, primaries: Sequence[Server], source: Server, target: Server, key: str
) -> Iterator[None]:
    """While the block runs, ``key``'s slot is migrating from ``source`` to ``target``
    with only ``key`` moved (the source answers ASK for it); then the slot's other keys
    are moved and every primary gives the slot to ``target`` (the source answers MOVED)."""
    slot = key_slot(key.encode())
    source_id, target_id = node_id(source), node_id(target)
    ask(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    ask(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    try:
        migrate(cluster, source, target, key)  # only the lock's key: its fence stays behind
        yield
    finally:
        while keys := ask(source, "CLUSTER", "GETKEYSINSLOT", slot, 100):
            migrate(cluster, source, target, *keys)
        for node in (target, source, *(p for p in primaries if p not in (source, target))):
            ask(node, "CLUSTER", "SETSLOT", slot, "NODE", target_id)


def test_a_resharded_lock_is_renewed_where_its_key_moved(
    client: dcoord.Client, cluster: ClusterSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slot moved by hand as ``redis-cli --cluster reshard`` moves it, behind the
    client's back: while it migrates, the old node answers the extend of the lock whose
    key already moved with ASK; once it has moved, with MOVED. In a batch that must not
    lose the lock: it is renewed alone through redis-py's cluster client, which follows
    the redirection (and, for MOVED, updates its slot map, so the next batches go to the
    new node)."""
    names, _, on_lost = lost_names()
    spy = BatchSpy(monkeypatch)
    by_primary, everyone = spread(client, cluster, ttl=TTL, on_lost=on_lost)
    assert spy.grew.wait(TTL * 5), f"renewals were not batched on every primary: {spy.sizes}"
    source, *others = by_primary
    target = others[0]
    victim = by_primary[source][0]
    key: str = victim._slot.key  # type: ignore[attr-defined]
    with migrating(cluster, list(by_primary), source, target, key):
        # Its extends now get ASK from the source (batched there with its neighbours).
        spy.sizes.clear()
        held_through(everyone, TTL * 2)
        assert any(node == f"{HOST}:{source.port}" and n > 1 for node, n in spy.sizes)
    # The source now answers MOVED, until the client's map learns where the slot went.
    held_through(everyone, TTL * 2)
    assert names == [], f"wrongly reported lost: {names}"
    assert node_of(victim) == f"{HOST}:{target.port}", "the map followed the slot"
    assert ask(target, "EXISTS", key) == 1
    for lock in everyone:
        lock.release()
