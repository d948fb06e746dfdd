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
from dcoord.backends.etcd_names import etcd_lock_prefix
from dcoord.backends.redis.aio_locks import AsyncRedisBackend, AsyncRedisLockSlot
from dcoord.config import settings_from
from tests.servers import HOST, Server
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


def test_async_membership_and_2pc_are_refused_on_a_redis_cluster_by_name() -> None:
    """Async locks run on a Cluster; async membership and 2PC say they do not (yet),
    before any request, instead of failing on a cross-node pub/sub or WAIT."""
    url = "redis+cluster://127.0.0.1:1"  # never connected: the refusal comes first

    async def main() -> None:
        client = dcoord.aio.connect(url, namespace="t")
        try:
            with pytest.raises(dcoord.ConfigError, match="membership on a Redis Cluster"):
                await client.group("g").members()
            with pytest.raises(dcoord.ConfigError, match="2PC on a Redis Cluster"):
                client.coordinator(participants=[])
        finally:
            await client.close()

    asyncio.run(main())
