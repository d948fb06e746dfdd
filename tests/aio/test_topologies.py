"""The async API on every topology: what the conformance run under
``DCOORD_TEST_TOPOLOGY=sentinel|cluster|etcd3`` found, pinned by tests of their own.

The whole of tests/aio runs on each topology (backends/run-tests.sh); the tests here
check, without a topology or with one started here, what made that run fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import dcoord
import dcoord.aio
import dcoord.core.membership
from dcoord.aio import connect
from dcoord.backends.etcd_names import etcd_lock_prefix
from dcoord.backends.redis.aio_locks import AsyncRedisBackend, AsyncRedisLockSlot
from dcoord.config import settings_from
from tests.aio.test_twopc import Crash, Ledger, SyncLedger, quiet, started
from tests.servers import HOST, Server
from tests.topologies.cluster import ClusterSet
from tests.topologies.etcd import EtcdCluster


async def swallows_cancellation() -> str:
    """What ``asyncio.wait_for`` does on Python 3.11 when its inner call completes in
    the step its caller is cancelled: return the result, drop the cancellation."""
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        return "reply"
    return "no cancel"


def test_a_cancellation_lost_inside_redis_py_still_cancels_the_call() -> None:
    # Found on a Cluster: a waiter cancelled during its SSUBSCRIBE went on waiting
    # (tests/aio/test_aio_locks.py::test_a_cancelled_acquire_leaves_nothing_behind).
    async def main() -> None:
        backend = AsyncRedisBackend(settings_from("redis://127.0.0.1:1"))
        try:
            entered = asyncio.Event()

            async def fn() -> str:
                entered.set()
                return await swallows_cancellation()

            task = asyncio.create_task(backend.call(fn, what="a call"))
            await entered.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

            # Negative control: a task already cancelling (releasing on its way out of
            # ``async with``) still gets the replies of its calls.
            async def cleanup_after_cancel() -> str:
                try:
                    await asyncio.sleep(30)
                except asyncio.CancelledError:
                    return await backend.call(lambda: asyncio.sleep(0, "released"), what="x")
                return "not cancelled"

            cleanup = asyncio.create_task(cleanup_after_cancel())
            await asyncio.sleep(0)
            cleanup.cancel()
            assert await cleanup == "released"
        finally:
            await backend.close()

    asyncio.run(main())


# etcd failover, as tests/faults/test_failover_etcd.py for the sync API: an election
# takes 1-2 s (etcd.env); generous bounds for a loaded 2-core machine.
FOLLOW_BOUND = 10.0
REQUEST_TIMEOUT = 3.0
TTL = 6.0


@pytest.fixture(scope="module")
def etcd_cluster(servers: Any) -> Iterator[EtcdCluster]:
    with EtcdCluster(**servers.security()) as started:
        started.start()
        yield started


def with_timeout(url: str, seconds: float) -> str:
    return f"{url}{'&' if '?' in url else '?'}request_timeout={seconds:g}"


def on_member(client: dcoord.aio.AsyncClient, member: Server) -> None:
    """Send ``client``'s requests to ``member`` (it starts with the URL's first)."""
    client.backend._use(f"{HOST}:{member.port}")  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["kill", "pause"])
def test_async_etcd_locks_follow_a_leader_failover(
    etcd_cluster: EtcdCluster, namespace: str, kind: str
) -> None:
    """Holder and waiter talk to the leader (the waiter watches its predecessor there)
    when it is killed or paused: the release goes through another member, the waiter
    gets the lock with a higher fence, within FOLLOW_BOUND."""
    url = with_timeout(etcd_cluster.url, REQUEST_TIMEOUT)

    async def main() -> None:
        async with (
            dcoord.aio.connect(url, namespace=namespace) as a,
            dcoord.aio.connect(url, namespace=namespace) as b,
        ):
            leader = etcd_cluster.leader()
            on_member(a, leader)
            on_member(b, leader)
            holder = a.lock("failover", ttl=TTL)
            assert await holder.acquire(timeout=10)
            first = holder.fence
            waiter = b.lock("failover", ttl=TTL)
            waiting = asyncio.create_task(waiter.acquire(timeout=3 * FOLLOW_BOUND))
            # The waiter is queued (its watch on the leader) before the fault.
            assert await eventually(lambda: queued(url, namespace, "failover") == 2)
            await asyncio.to_thread(
                etcd_cluster.kill_leader if kind == "kill" else etcd_cluster.pause_leader
            )
            started = time.monotonic()
            # The election may outlast the release's retries (under load): then it raises
            # BackendUnavailable, but the handle has let go all the same (a second
            # release() is LockNotOwned) and revokes its lease in the background.
            with contextlib.suppress(dcoord.BackendUnavailable):
                await holder.release()
            assert await waiting
            took = time.monotonic() - started
            assert took < FOLLOW_BOUND, f"the waiter got the lock {took:.2f} s after the fault"
            assert waiter.fence > first
            await waiter.release()

    try:
        asyncio.run(main())
    finally:
        etcd_cluster.heal()


def test_async_etcd_client_of_the_paused_leader_alone_cannot_follow(
    etcd_cluster: EtcdCluster, namespace: str
) -> None:
    """Negative control: with the leader's address alone the client has nowhere to go:
    BackendUnavailable, which shows that the pause does cut the leader off."""
    leader = etcd_cluster.leader()
    url = with_timeout(leader.url, 1)

    async def main() -> None:
        async with dcoord.aio.connect(url, namespace=namespace) as client:
            await asyncio.to_thread(etcd_cluster.pause, leader)
            with pytest.raises(dcoord.BackendUnavailable):
                await client.lock("alone", ttl=TTL).acquire(timeout=2)

    try:
        asyncio.run(main())
    finally:
        etcd_cluster.heal()


def queued(url: str, namespace: str, name: str) -> int:
    """Keys in lock ``name``'s queue, read by a sync client of ``url``."""
    with dcoord.connect(url, namespace=namespace) as sync:
        prefix = etcd_lock_prefix(namespace, name) + "/"
        return len(list(sync.backend.etcd.get_prefix(prefix)))  # type: ignore[attr-defined]


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` (off the loop: it may block) until it holds or ``timeout``."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_many_tasks_of_one_redis_client_contend_without_running_out_of_connections(
    aio_url: str, namespace: str
) -> None:
    """Found by bench/aio_locks.py (1,000 tasks, 10 locks): redis-py's async pool
    raises MaxConnectionsError past 100 connections instead of waiting."""
    tasks = 300

    async def main() -> None:
        async with dcoord.aio.connect(aio_url, namespace=namespace, request_timeout=30) as client:

            async def cycle(i: int) -> int:
                async with client.lock(f"many-{i}", ttl=60) as lock:
                    return lock.fence

            # Started together: their acquire scripts are all in flight at once.
            fences = await asyncio.gather(*(cycle(i) for i in range(tasks)))
            assert len(fences) == tasks and all(fence > 0 for fence in fences)

    asyncio.run(main())


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_a_release_wakes_one_waiter_of_the_client_not_all(
    aio_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by bench/aio_locks.py: 1,000 tasks on 10 locks made 98 acquire scripts per
    grant (46 grants/s), as each release woke every waiter of the lock in the client,
    and all but one lost the race again."""
    waiting = 20

    async def main() -> None:
        async with (
            dcoord.aio.connect(aio_url, namespace=namespace) as holder_client,
            dcoord.aio.connect(aio_url, namespace=namespace, request_timeout=30) as client,
        ):
            holder = holder_client.lock("herd", ttl=60)
            assert await holder.acquire()
            tries = 0
            original = AsyncRedisLockSlot._try

            async def counted(self: AsyncRedisLockSlot, token: str) -> tuple[int, float]:
                nonlocal tries
                tries += 1
                return await original(self, token)

            monkeypatch.setattr(AsyncRedisLockSlot, "_try", counted)
            granted: list[int] = []

            async def wait() -> None:
                async with client.lock("herd", ttl=60) as lock:
                    granted.append(lock.fence)

            tasks = [asyncio.create_task(wait()) for _ in range(waiting)]
            notifier: Any = client.backend.locks.notifier  # type: ignore[attr-defined]
            assert await eventually(
                lambda: (
                    sum(c.waiters for c in notifier._channels.values()) == waiting
                    and tries >= waiting
                )
            )
            before = tries
            await holder.release()
            await asyncio.gather(*tasks)
            assert len(granted) == waiting
            # Each of the 20 grants needs one try; woken all at once, each release
            # would make every remaining waiter try: about 20 * 21 / 2 = 210.
            assert tries - before <= 3 * waiting, f"{tries - before} tries for {waiting}"

    asyncio.run(main())


@pytest.fixture(scope="module")
def redis_cluster(servers: Any) -> Iterator[ClusterSet]:
    """Three primaries with a replica each; its URL asks ``min_replicas=1``."""
    with ClusterSet(**servers.security()) as started:
        started.start()
        yield started


def test_sync_and_async_clients_share_members_and_transactions_on_a_redis_cluster(
    redis_cluster: ClusterSet, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Groups and log buckets on every primary: each API sees the other's members (an
    async follower woken by a sync join on its shard channel) and finishes the other's
    transactions, every log write a forced one (WAIT on the record's primary)."""
    url = redis_cluster.url
    # Followers re-read only when woken: a plain SUBSCRIBE, which a script's SPUBLISH
    # never reaches, showed the join only at the periodic re-read (every 5 s).
    monkeypatch.setattr(dcoord.core.membership, "RESYNC_INTERVAL", 3600.0)
    groups = [f"g{i}" for i in range(6)]
    assert len({redis_cluster.primary_for(f"{{{g}}}").port for g in groups}) > 1

    def decided(point: str, txid: str, participant: str | None) -> None:
        if point == "after_decision":
            raise Crash(point)

    async def main() -> None:
        async with connect(url, namespace=namespace) as client:
            views = [client.group(g).watch() for g in groups]
            for view in views:
                assert dict(await anext(view)) == {}
            with dcoord.connect(url, namespace=namespace) as sync:
                joined = [sync.group(g).join("sync", ttl=30) for g in groups]
                for view in views:
                    # Woken by the join's SPUBLISH (nothing else re-reads within the
                    # hour and the members' 30 s TTL).
                    seen = await asyncio.wait_for(anext(view), 10)
                    assert set(seen) == {"sync"}
                    await view.aclose()  # type: ignore[attr-defined]
                mine = [await client.group(g).join("async", ttl=30) for g in groups]
                for g in groups:
                    members = await asyncio.to_thread(sync.group(g).members)
                    assert set(members) == {"sync", "async"}

                a = Ledger("a")
                txids = []
                for _ in range(8):  # spread over the log's buckets, hence primaries
                    dying: Any = quiet(sync, [SyncLedger(a)], failpoint=decided)
                    tx = dying.begin(timeout=10)
                    tx.enlist("a", None)
                    with pytest.raises(Crash):
                        await asyncio.to_thread(tx.commit)
                    txids.append(tx.txid)
                    adying = await started(quiet(client, [a], failpoint=decided))
                    atx = adying.begin(timeout=10)
                    atx.enlist("a", None)
                    with pytest.raises(Crash):
                        await atx.commit()
                    txids.append(atx.txid)
                rescuer = await started(quiet(client, [a]))
                report = await rescuer.recover()
                assert sorted(report.committed) == sorted(txids) and report.clean
                assert set(txids) <= a.committed
                # The sync listing reads every bucket's index, on every primary.
                listed = await asyncio.to_thread(quiet(sync, []).transactions, "committed")
                assert set(txids) <= {record.txid for record in listed}
                for member, g in zip(mine, groups, strict=True):
                    await member.leave()
                    assert set(await asyncio.to_thread(sync.group(g).members)) == {"sync"}
                for sync_member in joined:
                    sync_member.leave()

    asyncio.run(main())


def test_async_forced_writes_on_a_redis_cluster_wait_on_the_records_primary(
    redis_cluster: ClusterSet, namespace: str
) -> None:
    """The WAIT of a log write counts the replicas of the record's primary: with that
    primary's replica stopped, the write fails by name, while a write to another primary
    succeeds (negative control). Sent elsewhere, the WAIT answered at once with that
    node's replica, which had nothing to acknowledge: an unreplicated write passed."""
    url = redis_cluster.user_url("default", redis_cluster.password, replica_timeout="0.5")

    async def main() -> None:
        async with connect(url, namespace=namespace) as client:
            log: Any = client.backend.txlog  # type: ignore[attr-defined]
            cluster: Any = client.backend.redis  # type: ignore[attr-defined]
            default = cluster.get_default_node()  # where a keyless command goes
            # A txid of a bucket on a primary other than the default node, and one of a
            # bucket on yet another primary.
            by_port: dict[int, str] = {}
            for i in range(200):
                txid = f"wait-{i}"
                port = cluster.get_node_from_key(log._keys(txid)[0]).port
                by_port.setdefault(port, txid)
            ports = sorted(p for p in by_port if p != default.port)
            assert len(ports) >= 2, by_port
            stopped, other = by_port[ports[0]], by_port[ports[1]]
            assert await log.create(f"{other}-first", b"{}", time.time() + 60)  # scripts loaded
            (replica,) = redis_cluster.replicas_of(redis_cluster.node_at(ports[0]))
            replica.pause()
            try:
                with pytest.raises(
                    dcoord.BackendUnavailable, match=r"record .wait-\d+.: only 0 replica"
                ):
                    await log.create(stopped, b"{}", time.time() + 60)
                assert await log.create(other, b"{}", time.time() + 60)
            finally:
                replica.resume()
        await asyncio.to_thread(redis_cluster.wait_healthy)

    asyncio.run(main())


def test_an_async_swap_across_cluster_slots_is_refused_naming_its_keys(
    redis_cluster: ClusterSet, namespace: str
) -> None:
    async def main() -> None:
        async with connect(redis_cluster.url, namespace=namespace) as client:
            kv: Any = client.backend.kv_store  # type: ignore[attr-defined]
            with pytest.raises(dcoord.ConfigError, match=r"'dcoord:.*kv:left'.* hash to 2 slots"):
                await kv.swap({"left": b"1", "right": b"2"})
            assert await kv.get("left") is None
            # Negative control: keys sharing a hash tag share a slot.
            assert await kv.swap({"{t}left": b"1", "{t}right": b"2"}) is None  # applied
            assert await kv.get("{t}right") == b"2"

    asyncio.run(main())


def test_the_async_log_checks_the_persistence_of_every_cluster_node(
    redis_cluster: ClusterSet, namespace: str
) -> None:
    """As the sync check: a replica is promoted with its own settings, so one replica
    without ``appendfsync always`` fails the check, naming it. The async check read
    only the client's default node (a primary) and passed."""
    primary = redis_cluster.primary_for("{any}")
    (replica,) = redis_cluster.replicas_of(primary)

    async def main() -> None:
        async with connect(redis_cluster.url, namespace=namespace) as client:
            log: Any = client.backend.txlog  # type: ignore[attr-defined]
            assert await log.durability() is None  # negative control: every node agrees
            redis_cluster._ask(replica, "CONFIG", "SET", "appendfsync", "everysec")
            try:
                problem = await log.durability()
            finally:
                redis_cluster._ask(replica, "CONFIG", "SET", "appendfsync", "always")
            assert problem is not None and f"everysec on {HOST}:{replica.port}" in problem

    asyncio.run(main())
