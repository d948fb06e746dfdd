"""The async semaphores' and read-write locks' own contract: sync and async handles share
one semaphore / rwlock, a cancelled waiting acquire leaves nothing behind, and a release
wakes every waiter it may admit (memory, Redis and etcd: real servers)."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import dcoord
from dcoord.aio import AsyncClient, AsyncLock, connect
from dcoord.backends.redis.inspect import subscribers
from tests.conformance.test_semaphore import MARGIN, stored


@pytest.fixture
def sync_client(aio_url: str, namespace: str) -> Iterator[dcoord.Client]:
    with dcoord.connect(aio_url, namespace=namespace) as client:
        yield client


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``predicate`` (off the loop: it may read the server) until it holds."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def waiting(sync: dcoord.Client, before: list[str], channel: str) -> Callable[[], bool]:
    """Whether a waiter is known to the server: its queue entry or key (memory, etcd),
    its subscription to the release channel (Redis)."""
    if sync.backend.kind == "redis":
        return lambda: subscribers(sync.backend, channel) > 0  # type: ignore[arg-type]
    return lambda: len(stored(sync)) > len(before)


def channel_of(sync: dcoord.Client, kind: str, name: str) -> str:
    if sync.backend.kind != "redis":
        return ""
    if kind == "semaphore":
        slot: Any = sync.backend.semaphores.slot(name, 1, 30, True)
    else:
        slot = sync.backend.rwlocks.slot(name, True, 30, True)
    return str(slot.channel)


def test_sync_and_async_handles_share_one_semaphore(
    aio_url: str, namespace: str, sync_client: dcoord.Client
) -> None:
    async def main() -> None:
        async with connect(aio_url, namespace=namespace) as client:
            fences: list[int] = []
            sync_permit = sync_client.semaphore("pool", 2, ttl=30)
            async_permit = client.semaphore("pool", 2, ttl=30)
            assert sync_permit.acquire(blocking=False) and await async_permit.acquire(timeout=0)
            fences += [sync_permit.fence, async_permit.fence]
            # Full across both APIs.
            assert sync_client.semaphore("pool", 2).acquire(blocking=False) is False
            third = client.semaphore("pool", 2, ttl=30)
            assert await third.acquire(timeout=0) is False
            # A sync release wakes an async waiter (the holders' TTL is 30 s).
            before = stored(sync_client)
            task = asyncio.create_task(third.acquire(timeout=20))
            channel = channel_of(sync_client, "semaphore", "pool")
            assert await eventually(waiting(sync_client, before, channel))
            released_at = time.monotonic()
            sync_permit.release()
            assert await task
            assert time.monotonic() - released_at < MARGIN
            fences.append(third.fence)
            # An async release wakes a sync waiter.
            got = threading.Event()
            thread = threading.Thread(
                target=lambda: sync_permit.acquire(timeout=20) and got.set(), daemon=True
            )
            thread.start()
            await asyncio.sleep(0.2)  # let the thread start waiting; it is woken below
            await async_permit.release()
            assert await asyncio.to_thread(got.wait, 10)
            fences.append(sync_permit.fence)
            assert fences == sorted(fences) and len(set(fences)) == 4
            sync_permit.release()
            await third.release()

    asyncio.run(main())


def test_sync_and_async_handles_share_one_rwlock(
    aio_url: str, namespace: str, sync_client: dcoord.Client
) -> None:
    async def main() -> None:
        async with connect(aio_url, namespace=namespace) as client:
            sync_reader = sync_client.rwlock("doc", ttl=30).read()
            async_reader = client.rwlock("doc", ttl=30).read()
            assert sync_reader.acquire(blocking=False) and await async_reader.acquire(timeout=0)
            async_writer = client.rwlock("doc", ttl=30).write()
            assert await async_writer.acquire(timeout=0) is False
            assert sync_client.rwlock("doc").write().acquire(blocking=False) is False
            # The async writer waits; the readers' releases (one sync, one async) let it in.
            waiter = asyncio.create_task(async_writer.acquire(timeout=20))
            await asyncio.sleep(0.2)
            sync_reader.release()
            await async_reader.release()
            assert await waiter
            assert async_writer.fence > max(sync_reader.fence, async_reader.fence)
            assert sync_client.rwlock("doc").read().acquire(blocking=False) is False
            await async_writer.release()
            sync_writer = sync_client.rwlock("doc").write()
            assert sync_writer.acquire(blocking=False)
            assert await client.rwlock("doc").read().acquire(timeout=0) is False
            sync_writer.release()
            assert sync_writer.fence > async_writer.fence

    asyncio.run(main())


def make_waiter(client: AsyncClient, kind: str) -> AsyncLock:
    if kind == "semaphore":
        return client.semaphore("pool", 1, ttl=30)
    return client.rwlock("pool", ttl=30).write()


@pytest.mark.parametrize("kind", ["semaphore", "writer"])
@pytest.mark.parametrize("style", ["cancel", "asyncio.timeout"])
def test_a_cancelled_acquire_leaves_no_permit_or_queue_entry(
    aio_url: str, namespace: str, sync_client: dcoord.Client, kind: str, style: str
) -> None:
    async def main() -> None:
        async with (
            connect(aio_url, namespace=namespace) as a,
            connect(aio_url, namespace=namespace) as b,
        ):
            if kind == "semaphore":
                holder: AsyncLock = a.semaphore("pool", 1, ttl=30)
            else:
                holder = a.rwlock("pool", ttl=30).read()
            assert await holder.acquire()
            before = stored(sync_client)
            waiter = make_waiter(b, kind)
            if style == "cancel":
                task = asyncio.create_task(waiter.acquire(timeout=60))
                # Negative control: the helper does see a waiting acquire.
                channel = channel_of(sync_client, kind, "pool")
                assert await eventually(waiting(sync_client, before, channel))
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            else:
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.3):
                        await waiter.acquire()
            assert not waiter.held
            # No permit, queue key or writer's claim left (a Redis undo runs as a task).
            assert await eventually(lambda: stored(sync_client) == before), (
                before,
                stored(sync_client),
            )
            if kind == "writer":
                # A writer's claim would keep readers out: a new reader gets in at once.
                reader = a.rwlock("pool").read()
                assert await reader.acquire(timeout=0)
                await reader.release()
            await holder.release()
            assert await make_waiter(a, kind).acquire(timeout=0)

    asyncio.run(main())


@pytest.mark.parametrize("kind", ["semaphore", "rwlock"])
def test_a_release_wakes_every_waiter_it_admits(
    aio_url: str, namespace: str, sync_client: dcoord.Client, kind: str
) -> None:
    """A writer's release admits every waiting reader, and releases of three permits
    admit three waiters: each must get in at once, not at a TTL hint."""

    async def main() -> None:
        async with connect(aio_url, namespace=namespace) as client:
            if kind == "semaphore":
                holders = [sync_client.semaphore("pool", 3, ttl=30) for _ in range(3)]
                waiters: list[AsyncLock] = [client.semaphore("pool", 3, ttl=30) for _ in range(3)]
            else:
                holders = [sync_client.rwlock("pool", ttl=30).write()]
                waiters = [client.rwlock("pool", ttl=30).read() for _ in range(3)]
            for holder in holders:
                assert holder.acquire(blocking=False)
            before = stored(sync_client)
            tasks = [asyncio.create_task(w.acquire(timeout=20)) for w in waiters]
            channel = channel_of(sync_client, "semaphore" if kind == "semaphore" else "rw", "pool")
            assert await eventually(waiting(sync_client, before, channel))
            await asyncio.sleep(0.2)  # every waiter has tried once and waits
            released_at = time.monotonic()
            for holder in holders:
                holder.release()
            assert all(await asyncio.gather(*tasks))
            # A waiter left to its TTL hint (10 s here) could not be this quick.
            assert time.monotonic() - released_at < MARGIN
            for waiter in waiters:
                await waiter.release()

    asyncio.run(main())


@pytest.mark.parametrize("kind", ["semaphore", "writer"])
@pytest.mark.parametrize("undo", [True, False], ids=["undo", "negative-control-no-undo"])
def test_redis_acquire_cancelled_in_flight_leaves_no_grant_behind(
    server_factory: Callable[..., object],
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    undo: bool,
) -> None:
    """The acquire script was sent to a paused server and the acquire was cancelled: the
    server still runs it once it resumes, and the permit (or write grant) must be undone."""
    from dcoord.backends.redis.aio_locks import AsyncRedisLocks

    if not undo:
        monkeypatch.setattr(AsyncRedisLocks, "undo", lambda *args: None)
    server: Any = server_factory("redis", persistent=False)

    def sync_handle(sync: dcoord.Client) -> dcoord.Lock:
        if kind == "semaphore":
            return sync.semaphore("pool", 1)
        return sync.rwlock("pool").write()

    async def main() -> None:
        client = await connect(server.url, namespace=namespace, request_timeout=1)
        try:
            warm = make_waiter(client, kind)  # loads the script: no NOSCRIPT round below
            assert await warm.acquire()
            await warm.release()
            server.pause()
            try:
                # Sent on the pooled connection; the paused server's socket holds it.
                task = asyncio.create_task(make_waiter(client, kind).acquire())
                await asyncio.sleep(0.3)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            finally:
                server.resume()
            with dcoord.connect(server.url, namespace=namespace) as sync:
                if undo:
                    assert await asyncio.to_thread(sync_handle(sync).acquire, timeout=10)
                else:
                    await asyncio.sleep(1)
                    assert sync_handle(sync).acquire(timeout=0) is False, "the grant landed"
        finally:
            await client.close()

    asyncio.run(main())


def test_redis_user_confined_to_the_documented_commands_runs_both(
    server_factory: Callable[..., object],
) -> None:
    """The async slots need no more commands than docs/semaphore.md lists (the sync
    suite's test of it connects with dcoord.connect)."""
    import redis

    from tests.conformance.test_semaphore import CLIENT_COMMANDS, SCRIPT_COMMANDS

    server: Any = server_factory("redis", persistent=False)
    admin = redis.Redis(host="127.0.0.1", port=server.port)
    grants = [f"+{c}" for c in f"{SCRIPT_COMMANDS} {CLIENT_COMMANDS}".split()]
    admin.execute_command(
        "ACL", "SETUSER", "app1", "reset", "on", ">pw", "~dcoord:app1:*", "&dcoord:app1:*", *grants
    )
    admin.close()
    url = f"redis://app1:pw@127.0.0.1:{server.port}/0"

    async def main() -> None:
        async with connect(url, namespace="app1") as a, connect(url, namespace="app1") as b:
            permit = a.semaphore("pool", 1)
            assert await permit.acquire()
            await permit.extend()
            waiter = asyncio.create_task(b.semaphore("pool", 1).acquire(timeout=5))
            await asyncio.sleep(0.1)
            await permit.release()
            assert await waiter
            reader = a.rwlock("doc").read()
            assert await reader.acquire()
            await reader.extend()
            assert await b.rwlock("doc", timeout=0.3).write().acquire() is False  # claims
            await reader.release()
            writer = b.rwlock("doc").write()
            assert await writer.acquire(timeout=0)
            await writer.extend()
            await writer.release()

    asyncio.run(main())


@pytest.mark.parametrize("kind", ["redis", "etcd"])
def test_closing_the_client_stops_its_waiters_with_client_closed(
    server_factory: Callable[..., object], namespace: str, kind: str
) -> None:
    """The async side of the sync suite's test: waiters of a closing client end with
    ClientClosed (Redis: at their next wake-up, at most a third of the TTL; etcd: when
    the closed channel ends their watch, which grpc.aio reports as a cancellation), not
    at their timeout nor as a cancelled task, and leave no task behind."""
    server: Any = server_factory(kind, persistent=False)
    ttl = 3.0 if kind == "etcd" else 1.5

    async def main() -> None:
        errors: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
        with dcoord.connect(server.url, namespace=namespace) as holder:
            assert holder.semaphore("pool", 1).acquire()
            assert holder.rwlock("doc").read().acquire()
            client = await connect(server.url, namespace=namespace)
            handles: list[AsyncLock] = [
                client.semaphore("pool", 1, ttl=ttl),
                client.rwlock("doc", ttl=ttl).write(),
            ]
            tasks = [asyncio.create_task(h.acquire(timeout=20)) for h in handles]
            await asyncio.sleep(0.3)  # both wait
            started = time.monotonic()
            await client.close()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            assert [type(o) for o in outcomes] == [dcoord.ClientClosed] * 2, outcomes
            assert time.monotonic() - started < ttl / 3 + MARGIN
            # grpc.aio ends the status task of each call the closed channel cancelled a
            # loop step or so later (their futures are done): give tasks a second to
            # end; a waiter or renewal dcoord left behind would still be running.
            others = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
            if others:
                await asyncio.wait(others, timeout=1.0)
            assert {t for t in others if not t.done()} == set()
            gc.collect()  # a task that failed unseen is reported when it is collected
            assert errors == []

    asyncio.run(main())


def test_redis_release_is_retried_while_the_server_restarts(
    server_factory: Callable[..., object], namespace: str
) -> None:
    """As the sync suite's test: a release that meets a restarting server (connection
    refused) is retried until the server is back, within the request timeout."""
    server: Any = server_factory("redis")  # AOF, fsync always: the permits survive

    async def main() -> None:
        async with connect(server.url, namespace=namespace, request_timeout=15) as client:
            handles: list[AsyncLock] = [
                client.semaphore("pool", 1),
                client.rwlock("doc").write(),
            ]
            for handle in handles:
                assert await handle.acquire()
                server.kill()
                restart = asyncio.create_task(asyncio.to_thread(server.start))
                try:
                    await handle.release()
                finally:
                    await restart
                assert not handle.held
            assert await client.semaphore("pool", 1).acquire(timeout=0)
            assert await client.rwlock("doc").read().acquire(timeout=0)

    asyncio.run(main())
