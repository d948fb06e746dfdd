"""The async client's renewal scheduler (dcoord/aio/renewals.py, issue 16): locks due
together are looked at by one timer and renewed in one task and one round trip, each
answer applied to its own lock.

Locks are made due together by moving their next look to now in one loop step (the
scheduler's ``watch``), not by waiting: TTLs are long, nothing here depends on timing
except the one test whose point is a deadline passing. Round trips are counted by the
server (``INFO``), never by MONITOR.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import redis

from dcoord.aio import AsyncClient, AsyncLock, connect
from dcoord.aio.renewals import client_renewals
from dcoord.backends.aio_base import AsyncLockSlot, AsyncRenewalBatch
from dcoord.backends.base import LockGrant, Renewed
from dcoord.core.lockstate import RENEWAL_GRAIN, coalesced

# Long enough that no renewal falls due by itself while a test runs.
TTL = 60.0


async def eventually(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll ``predicate`` on the loop until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


async def held_locks(
    url: str, namespace: str, n: int, lost: list[str] | None = None
) -> tuple[AsyncClient, list[AsyncLock]]:
    client = await connect(url, namespace=namespace)
    on_lost = None if lost is None else (lambda lock: lost.append(lock.name))
    locks = [client.lock(f"res{i}", ttl=TTL, on_lost=on_lost) for i in range(n)]
    for lock in locks:
        assert await lock.acquire(timeout=0)
    return client, locks


def renew_now(client: AsyncClient, locks: Sequence[AsyncLock]) -> list[float]:
    """Make ``locks`` due now, together (one loop step: one tick sees them all); their
    deadlines before, to tell when each has been renewed."""
    renewals, now = client_renewals(client), time.monotonic()
    deadlines = []
    for lock in locks:
        assert lock._grant is not None
        deadlines.append(lock._grant.expires_at)
        renewals.watch(lock, lock._generation, now)
    return deadlines


def renewed(lock: AsyncLock, deadline: float) -> bool:
    return lock._grant is not None and lock._grant.expires_at > deadline


class Recorder:
    """Wraps a store's renewal batch: records the slots of each ``extend_many``."""

    def __init__(self, batch: AsyncRenewalBatch) -> None:
        self.batch = batch
        self.calls: list[list[AsyncLockSlot]] = []

    async def extend_many(self, requests: Sequence[tuple[AsyncLockSlot, float]]) -> list[Renewed]:
        self.calls.append([slot for slot, _ in requests])
        return await self.batch.extend_many(requests)


def record_batches(locks: Sequence[AsyncLock]) -> Recorder:
    batch = locks[0]._renewal_batch()
    assert batch is not None, "the lock store has a renewal batch"
    recorder = Recorder(batch)
    for lock in locks:
        lock._renewal_batch = lambda: recorder  # type: ignore[method-assign]
    return recorder


def take_away(backend: str, url: str, lock: AsyncLock) -> None:
    """Delete ``lock``'s grant on the server behind its holder's back (a failover)."""
    slot: Any = lock._slot
    if backend == "memory":
        table = slot._slot._table
        with table.mutex:
            del table.entries[slot._slot._key]
        return
    raw = redis.Redis.from_url(url.split("?")[0])
    try:
        assert raw.delete(slot.key) == 1
    finally:
        raw.close()


def redis_counts(url: str) -> tuple[int, int]:
    """(reads the server has processed, EVALSHA calls it has run) so far."""
    raw = redis.Redis.from_url(url.split("?")[0])
    try:
        stats: Any = raw.info("stats")
        commands: Any = raw.info("commandstats")
    finally:
        raw.close()
    return int(stats["total_reads_processed"]), int(commands["cmdstat_evalsha"]["calls"])


def test_coalesced_renewal_times_are_a_grain_early_at_most() -> None:
    for due in (100.0, 100.004, 100.0099, 123.456789, 0.3):
        at = coalesced(due)
        assert due - RENEWAL_GRAIN < at <= due
    assert coalesced(100.001) == coalesced(100.009), "due within a grain: one tick"


@pytest.mark.parametrize("backend", ["memory", "redis"], indirect=True)
def test_a_batch_where_one_lock_was_lost_reports_exactly_that_one(
    backend: str, backend_url: str, namespace: str
) -> None:
    async def main() -> None:
        lost: list[str] = []
        client, locks = await held_locks(backend_url, namespace, 20, lost)
        try:
            recorder = record_batches(locks)
            take_away(backend, backend_url, locks[7])
            deadlines = renew_now(client, locks)
            others = [
                (lock, d)
                for i, (lock, d) in enumerate(zip(locks, deadlines, strict=True))
                if i != 7
            ]
            await eventually(lambda: bool(lost) and all(renewed(*o) for o in others))
            assert len(recorder.calls) == 1 and len(recorder.calls[0]) == 20, "one batch"
            assert lost == ["res7"], lost
            assert not locks[7].held and locks[7]._lost_reason is not None
            assert "no longer has it" in locks[7]._lost_reason
            assert all(lock.held for lock, _ in others)
        finally:
            await client.close()

    asyncio.run(main())


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_locks_due_together_renew_in_one_task_and_one_round_trip(
    backend: str, backend_url: str, namespace: str
) -> None:
    async def main() -> tuple[int, int]:
        client, locks = await held_locks(backend_url, namespace, 50)
        try:
            # Warm: the EXTEND script loaded and a connection open, as in a long run.
            deadlines = renew_now(client, locks[:1])
            await eventually(lambda: renewed(locks[0], deadlines[0]))
            loop = asyncio.get_running_loop()
            started: list[asyncio.Task[Any]] = []

            def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> Any:
                task = asyncio.Task(coro, loop=loop, **kw)
                started.append(task)  # named by create_task after this returns
                return task

            reads, scripts = await asyncio.to_thread(redis_counts, backend_url)
            loop.set_task_factory(factory)
            deadlines = renew_now(client, locks)
            await eventually(lambda: all(map(renewed, locks, deadlines)))
            loop.set_task_factory(None)
            reads2, scripts2 = await asyncio.to_thread(redis_counts, backend_url)
            names = [task.get_name() for task in started]
            assert names.count("dcoord lock renewals") == 1, names
            # And no task per lock anywhere (the request's own timeout may be a task).
            assert len(names) < 5, names
            return reads2 - reads, scripts2 - scripts
        finally:
            await client.close()

    reads, scripts = asyncio.run(main())
    assert scripts == 50, "each lock its own owner-checked EXTEND"
    # The pipeline is one read (two if the kernel split it); the rest is the counting
    # connection's own (connect, HELLO/CLIENT SETINFO, two INFOs).
    assert reads <= 8, reads


@pytest.mark.parametrize("backend", ["memory"], indirect=True)
def test_a_lock_due_soon_is_renewed_with_those_due_now(backend_url: str, namespace: str) -> None:
    """Locks taken moments apart are due in different grains; a tick also takes those
    due within a quarter of their renewal interval, so they are then due together and
    share later batches (as the sync watchdog). Before, each stayed in its own batch."""

    async def main() -> None:
        client, locks = await held_locks(backend_url, namespace, 3)
        try:
            recorder = record_batches(locks)
            renewals, now = client_renewals(client), time.monotonic()
            interval = TTL / 3
            deadlines = [lock._grant.expires_at for lock in locks]  # type: ignore[union-attr]
            renewals.watch(locks[0], locks[0]._generation, now)
            renewals.watch(locks[1], locks[1]._generation, now + interval * 0.2)  # soon
            renewals.watch(locks[2], locks[2]._generation, now + interval * 0.5)  # not soon
            await eventually(lambda: renewed(locks[0], deadlines[0]))
            assert recorder.calls == [[locks[0]._slot, locks[1]._slot]], recorder.calls
            assert renewed(locks[1], deadlines[1]) and not renewed(locks[2], deadlines[2])
            # Renewed at one instant: their next renewals fall in one grain again.
            current = {e[2]: e[0] for e in renewals._heap if renewals._current.get(e[2]) == e[1]}
            assert current[locks[0]] == current[locks[1]]
        finally:
            await client.close()

    asyncio.run(main())


@pytest.mark.parametrize("backend", ["memory"], indirect=True)
def test_a_lock_without_renewal_is_not_looked_at_before_its_deadline(
    backend_url: str, namespace: str
) -> None:
    """Only renewals are taken early: a lock without renewal near its deadline was
    popped and watched again at the same time over and over in one tick."""

    async def main() -> None:
        client, locks = await held_locks(backend_url, namespace, 1)
        try:
            quiet = client.lock("quiet", ttl=TTL, auto_renew=False)
            assert await quiet.acquire(timeout=0)
            looks = 0
            real_look = quiet._look

            def counting_look(generation: int, now: float) -> Any:
                nonlocal looks
                looks += 1
                return real_look(generation, now)

            quiet._look = counting_look  # type: ignore[method-assign]
            renewals, now = client_renewals(client), time.monotonic()
            deadline = locks[0]._grant.expires_at  # type: ignore[union-attr]
            renewals.watch(quiet, quiet._generation, now + 1.0)  # within the early window
            renewals.watch(locks[0], locks[0]._generation, now)
            await eventually(lambda: renewed(locks[0], deadline))
            assert looks == 0, f"looked at {looks} times before its deadline"
        finally:
            await client.close()

    asyncio.run(main())


@pytest.mark.parametrize("backend", ["memory", "redis"], indirect=True)
def test_a_released_lock_is_not_renewed(backend: str, backend_url: str, namespace: str) -> None:
    async def main() -> None:
        client, locks = await held_locks(backend_url, namespace, 10)
        try:
            recorder = record_batches(locks)
            scripts = 0
            if backend == "redis":
                scripts = (await asyncio.to_thread(redis_counts, backend_url))[1]
            deadlines = renew_now(client, locks)
            # Released after it fell due, before the tick ran (the tick is the loop's
            # next step; release gives the loop up only after letting go of the grant).
            await locks[3].release()
            kept = [
                (lock, d)
                for i, (lock, d) in enumerate(zip(locks, deadlines, strict=True))
                if i != 3
            ]
            await eventually(lambda: all(renewed(*k) for k in kept))
            sent = [slot for call in recorder.calls for slot in call]
            assert len(sent) == 9 and locks[3]._slot not in sent, sent
            assert client_renewals(client)._current.keys() == {lock for lock, _ in kept}
            if backend == "redis":
                scripts = (await asyncio.to_thread(redis_counts, backend_url))[1] - scripts
                assert scripts == 10, "9 EXTENDs and the release: none of the released lock"
        finally:
            await client.close()

    asyncio.run(main())


class Unanswered:
    """A renewal batch whose answer comes only when the test says (a hung request)."""

    def __init__(self) -> None:
        self.sent = asyncio.Event()
        self.answer = asyncio.Event()
        self.answered = asyncio.Event()

    async def extend_many(self, requests: Sequence[tuple[AsyncLockSlot, float]]) -> list[Renewed]:
        self.sent.set()
        await self.answer.wait()
        # A grant the server would give now: only the client's deadline says it is late.
        answers: list[Renewed] = [LockGrant(1, time.monotonic() + TTL) for _ in requests]
        self.answered.set()
        return answers


@pytest.mark.parametrize("backend", ["memory"], indirect=True)
def test_a_renewal_answered_after_the_deadline_leaves_the_lock_lost(
    backend_url: str, namespace: str
) -> None:
    async def main() -> None:
        async with connect(backend_url, namespace=namespace) as client:
            lost: list[str] = []
            gone = asyncio.Event()

            def on_lost(lock: AsyncLock) -> None:
                lost.append(lock.name)
                gone.set()

            lock = client.lock("res", ttl=0.6, on_lost=on_lost)
            batch = Unanswered()
            lock._renewal_batch = lambda: batch  # type: ignore[method-assign]
            assert await lock.acquire(timeout=0)
            await asyncio.wait_for(batch.sent.wait(), 20)
            # The renewal hangs: the deadline still loses the lock, on time.
            await asyncio.wait_for(gone.wait(), 20)
            assert not lock.held
            assert lock._lost_reason is not None and "still unanswered" in lock._lost_reason
            batch.answer.set()
            await batch.answered.wait()
            renewals = client_renewals(client)
            await eventually(lambda: not renewals._tasks)
            assert not lock.held, "a late answer never makes a lost lock held again"
            assert lost == ["res"] and lock not in renewals._current

    asyncio.run(main())


@pytest.mark.parametrize("backend", ["memory"], indirect=True)
def test_many_releases_leave_the_held_locks_looked_after(backend_url: str, namespace: str) -> None:
    """Releases leave stale timer entries; compacting them keeps every held lock's."""

    async def main() -> None:
        client, locks = await held_locks(backend_url, namespace, 100)
        try:
            renewals = client_renewals(client)
            for lock in locks[:70]:
                await lock.release()
            assert len(renewals._heap) < 100, "compacted"
            assert renewals._current.keys() == set(locks[70:])
            watched = {entry[2] for entry in renewals._heap}
            assert watched >= set(locks[70:])
            deadlines = renew_now(client, locks[70:])
            await eventually(lambda: all(map(renewed, locks[70:], deadlines)))
        finally:
            await client.close()

    asyncio.run(main())


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_renewals_load_the_script_again_after_a_flush(
    backend: str, backend_url: str, namespace: str
) -> None:
    """A restarted or failed-over server lacks the EXTEND script: the batch's NOSCRIPT
    replies are sent again after loading it, and no lock is lost for it."""

    async def main() -> None:
        lost: list[str] = []
        client, locks = await held_locks(backend_url, namespace, 5, lost)
        try:
            raw = redis.Redis.from_url(backend_url.split("?")[0])
            try:
                raw.script_flush()
            finally:
                raw.close()
            deadlines = renew_now(client, locks)
            await eventually(lambda: all(map(renewed, locks, deadlines)))
            assert lost == []
        finally:
            await client.close()

    asyncio.run(main())


def test_a_batch_to_a_paused_server_fails_in_time_and_the_next_one_renews(
    server_factory: Callable[..., Any], namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The batch waits at most request_timeout for its replies (one timeout for all),
    each lock retries; once the server is back, the next batch renews on a fresh
    connection (the timed-out one, whose replies may still come, is not reused)."""
    server = server_factory("redis")

    async def main() -> None:
        lost: list[str] = []
        client, locks = await held_locks(server.url + "?request_timeout=0.5", namespace, 3, lost)
        try:
            server.pause()
            try:
                renew_now(client, locks)
                await eventually(lambda: "renewal failed, retrying" in caplog.text)
            finally:
                server.resume()
            deadlines = renew_now(client, locks)
            await eventually(lambda: all(map(renewed, locks, deadlines)))
            assert lost == [] and all(lock.held for lock in locks)
        finally:
            await client.close()

    with caplog.at_level("WARNING", logger="dcoord.lock"):
        asyncio.run(main())
    assert "BackendUnavailable" in caplog.text, caplog.text
