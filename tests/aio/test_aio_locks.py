"""The async API's own contract: cancellation, close, interop with the sync API, renewal
isolation on the loop, and a killed async holder (memory and Redis, real servers)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import dcoord
from dcoord.aio import AsyncClient, AsyncLock, connect
from dcoord.aio.renewals import client_renewals
from dcoord.backends.base import LockGrant
from dcoord.backends.etcd_names import etcd_lock_prefix
from dcoord.backends.memory.locks import _table
from tests.conformance.test_locks import stored_keys

# Slack for task wake-ups and round trips on a loaded 2-core machine.
MARGIN = 1.0


@pytest.fixture
def sync_client(aio_url: str, namespace: str) -> Iterator[dcoord.Client]:
    with dcoord.connect(aio_url, namespace=namespace) as client:
        yield client


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``predicate`` on the loop until it holds or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def waiters(client: AsyncClient, name: str, sync: dcoord.Client) -> int:
    """Waiters the client has registered on lock ``name`` (memory: on the store's entry,
    Redis: on the client's pub/sub channel; etcd: queue keys behind the holder's, read
    by ``sync``, a sync client of the same namespace)."""
    backend: object = client.backend
    if client.backend.kind == "etcd":
        prefix = etcd_lock_prefix(client.namespace, name) + "/"
        queue = sync.backend.etcd.get_prefix(prefix)  # type: ignore[attr-defined]
        return max(0, len(list(queue)) - 1)
    if client.backend.kind == "memory":
        prefix = backend.locks._locks.lock_prefix  # type: ignore[attr-defined]
        entry = _table(backend.server).entries.get(prefix + name)  # type: ignore[attr-defined]
        return 0 if entry is None else max(entry.waiters, len(entry.wakers))
    channels = backend.locks.notifier._channels.values()  # type: ignore[attr-defined]
    return sum(channel.waiters for channel in channels)


def dcoord_tasks() -> set[asyncio.Task[object]]:
    return {t for t in asyncio.all_tasks() if t.get_name().startswith("dcoord")}


@pytest.mark.parametrize("style", ["cancel", "asyncio.timeout"])
def test_a_cancelled_acquire_leaves_nothing_behind(
    aio_url: str, namespace: str, sync_client: dcoord.Client, style: str
) -> None:
    async def main() -> None:
        async with (
            connect(aio_url, namespace=namespace) as a,
            connect(aio_url, namespace=namespace) as b,
        ):
            holder = a.lock("res", ttl=30)
            assert await holder.acquire()
            before = stored_keys(sync_client)
            waiter = b.lock("res", ttl=30)
            if style == "cancel":
                task = asyncio.create_task(waiter.acquire(timeout=60))
                # Negative control: the helper does see a waiting acquire.
                assert await eventually(lambda: waiters(b, "res", sync_client) == 1)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            else:
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.3):
                        await waiter.acquire()
            assert waiters(b, "res", sync_client) == 0
            assert not waiter.held
            assert stored_keys(sync_client) == before
            await holder.release()
            # Nothing of the cancelled attempt holds the lock: a third handle gets it now.
            assert await a.lock("res").acquire(timeout=0)

    asyncio.run(main())


def test_async_with_releases_when_the_block_is_cancelled(
    aio_url: str, namespace: str, sync_client: dcoord.Client
) -> None:
    async def main() -> None:
        async with connect(aio_url, namespace=namespace) as client:
            inside = asyncio.Event()
            lock = client.lock("res", ttl=30)

            async def block() -> None:
                async with lock:
                    inside.set()
                    await asyncio.Event().wait()  # until cancelled

            task = asyncio.create_task(block())
            await inside.wait()
            assert sync_client.lock("res").acquire(blocking=False) is False
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not lock.held
            # Released at once, not after its 30 s TTL.
            assert sync_client.lock("res").acquire(blocking=False)

    asyncio.run(main())


def test_close_releases_locks_and_cancels_every_task(
    aio_url: str, namespace: str, sync_client: dcoord.Client
) -> None:
    async def main() -> None:
        client = await connect(aio_url, namespace=namespace)
        locks = [client.lock(f"res{i}", ttl=30) for i in range(3)]
        for lock in locks:
            assert await lock.acquire()
        # A waiter that timed out leaves the Redis notifier's reader task running.
        other = sync_client.lock("busy", ttl=30)
        assert other.acquire()
        assert await client.lock("busy").acquire(timeout=0.2) is False
        renewals = client_renewals(client)
        assert all(lock in renewals._current for lock in locks), "each held lock is looked after"
        if client.backend.kind == "redis":
            assert dcoord_tasks(), "the notifier's reader task runs"
        await client.close()
        assert dcoord_tasks() == set()
        assert renewals._current == {} and renewals._timer is None
        assert all(not lock.held for lock in locks)
        assert sync_client.lock("res1").acquire(blocking=False), "released at close"
        with pytest.raises(dcoord.ClientClosed):
            await locks[0].acquire()
        other.release()

    asyncio.run(main())


def test_sync_and_async_clients_exclude_each_other(
    aio_url: str, namespace: str, sync_client: dcoord.Client
) -> None:
    async def main() -> None:
        async with connect(aio_url, namespace=namespace) as client:
            fences: list[int] = []
            sync_lock, async_lock = sync_client.lock("res", ttl=30), client.lock("res", ttl=30)
            assert sync_lock.acquire()
            fences.append(sync_lock.fence)
            assert await async_lock.acquire(timeout=0) is False
            # A sync release wakes an async waiter (no polling: the holder's TTL is 30 s).
            waiting = asyncio.create_task(async_lock.acquire(timeout=20))
            assert await eventually(lambda: waiters(client, "res", sync_client) == 1)
            released_at = time.monotonic()
            sync_lock.release()
            assert await waiting
            assert time.monotonic() - released_at < MARGIN
            fences.append(async_lock.fence)
            assert sync_client.lock("res").acquire(blocking=False) is False
            # An async release wakes a sync waiter.
            got = threading.Event()
            woken = threading.Thread(
                target=lambda: sync_lock.acquire(timeout=20) and got.set(), daemon=True
            )
            woken.start()
            await asyncio.sleep(0.2)  # let the thread start waiting; it is woken below
            await async_lock.release()
            assert await asyncio.to_thread(got.wait, 10)
            fences.append(sync_lock.fence)
            sync_lock.release()
            assert fences == sorted(fences) and len(set(fences)) == 3
            # One fence per resource across both APIs.
            assert await client.fence("t").admit(fences[2])
            assert not sync_client.fence("t").admit(fences[1])

    asyncio.run(main())


class HangingExtend:
    """A real slot whose extend never answers: a renewal stuck on a slow request."""

    def __init__(self, lock: AsyncLock) -> None:
        self.inner = lock._slot
        self.extends = 0
        lock._slot = self

    async def acquire(self, deadline: float | None) -> LockGrant | None:
        return await self.inner.acquire(deadline)

    async def release(self) -> bool:
        return await self.inner.release()

    async def extend(self, ttl: float) -> LockGrant | None:
        self.extends += 1
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


@pytest.mark.parametrize("backend", ["memory"], indirect=True)
def test_a_hanging_renewal_delays_no_other_lock_and_loses_its_own_on_time(
    aio_url: str, namespace: str
) -> None:
    ttl = 1.0

    async def main() -> None:
        # Threads of earlier tests may end meanwhile: compare which threads are new.
        before = set(threading.enumerate())
        async with connect(aio_url, namespace=namespace) as client:
            lost_at: list[float] = []
            stuck = client.lock(
                "stuck", ttl=ttl, on_lost=lambda _: lost_at.append(time.monotonic())
            )
            fine = client.lock("fine", ttl=ttl)
            hanging = HangingExtend(stuck)
            started = time.monotonic()
            assert await stuck.acquire() and await fine.acquire()
            assert await eventually(lambda: bool(lost_at), ttl + MARGIN)
            assert hanging.extends == 1, "one renewal in flight per grant, not a pile"
            assert lost_at[0] - started <= ttl + 0.1, "lost at its deadline, not later"
            assert not stuck.held
            await asyncio.sleep(ttl * 1.5)  # the other lock renews all along
            assert fine.held
            new = set(threading.enumerate()) - before
            assert not new, f"renewals are tasks, not threads: {new}"

    asyncio.run(main())


HOLDER = """
import asyncio, sys
import dcoord.aio

async def main():
    client = await dcoord.aio.connect(sys.argv[1], namespace=sys.argv[2])
    lock = client.lock("res", ttl=float(sys.argv[3]))
    assert await lock.acquire()
    print("held", lock.fence, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.mark.parametrize("backend", ["redis", "etcd"], indirect=True)
def test_a_killed_async_holder_frees_its_lock_within_the_ttl(
    aio_url: str, namespace: str, sync_client: dcoord.Client
) -> None:
    ttl = 2.0
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, aio_url, namespace, str(ttl)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.startswith("held"), line
        fence = int(line.split()[1])
        # Negative control: while it lives (and renews), nobody else gets the lock.
        assert sync_client.lock("res").acquire(timeout=ttl * 1.5) is False
        os.kill(child.pid, signal.SIGKILL)
        killed = time.monotonic()
        child.wait(timeout=10)
        lock = sync_client.lock("res")
        assert lock.acquire(timeout=ttl + MARGIN)
        assert time.monotonic() - killed <= ttl + MARGIN
        assert lock.fence > fence
        lock.release()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)


@pytest.mark.parametrize("backend", ["memory", "redis"], indirect=True)
def test_an_acquire_still_waiting_at_close_holds_nothing_after_it(
    aio_url: str, namespace: str, sync_client: dcoord.Client
) -> None:
    ttl = 0.5

    async def main() -> None:
        holder = sync_client.lock("res", ttl=ttl, auto_renew=False)
        assert holder.acquire()
        client = await connect(aio_url, namespace=namespace)
        waiting = asyncio.create_task(client.lock("res", ttl=30).acquire(timeout=ttl + 10))
        await asyncio.sleep(0.1)  # let it wait; it is woken by the holder's expiry
        await client.close()
        # Granted after the close (the holder expired), or failed on the closed
        # connection: either way it raises, and leaves nothing held.
        with pytest.raises(dcoord.DcoordError):
            await waiting
        assert sync_client.lock("res").acquire(timeout=ttl + MARGIN)

    asyncio.run(main())


@pytest.mark.parametrize("kind", ["redis", "etcd"])
def test_a_server_that_does_not_answer_is_backend_unavailable(kind: str) -> None:
    import socket

    with socket.socket() as probe:  # a free port: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def main() -> None:
        started = time.monotonic()
        with pytest.raises(dcoord.BackendUnavailable, match=f"127.0.0.1:{port}"):
            await connect(f"{kind}://127.0.0.1:{port}", connect_timeout=1)
        assert time.monotonic() - started < 1 + MARGIN

    asyncio.run(main())


@pytest.mark.parametrize("undo", [True, False], ids=["undo", "negative-control-no-undo"])
def test_redis_acquire_cancelled_in_flight_leaves_no_grant_behind(
    server_factory: Callable[..., object],
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
    undo: bool,
) -> None:
    """The acquire script was sent to a paused server and the acquire was cancelled: the
    server still runs it once it resumes, and the grant must be undone."""
    from dcoord.backends.redis.aio_locks import AsyncRedisLocks

    if not undo:
        monkeypatch.setattr(AsyncRedisLocks, "undo", lambda *args: None)
    server: Any = server_factory("redis", persistent=False)

    async def main() -> None:
        client = await connect(server.url, namespace=namespace, request_timeout=1)
        try:
            warm = client.lock("res", ttl=60)  # loads the script: no NOSCRIPT round below
            assert await warm.acquire()
            await warm.release()
            server.pause()
            try:
                # Sent on the pooled connection; the paused server's socket holds it.
                task = asyncio.create_task(client.lock("res", ttl=60).acquire())
                await asyncio.sleep(0.3)  # the script waits in the paused server's socket
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            finally:
                server.resume()
            with dcoord.connect(server.url, namespace=namespace) as sync:
                if undo:
                    assert await asyncio.to_thread(sync.lock("res").acquire, timeout=10)
                else:
                    await asyncio.sleep(1)
                    assert sync.lock("res").acquire(timeout=0) is False, "the grant landed"
        finally:
            await client.close()

    asyncio.run(main())
