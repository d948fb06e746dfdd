"""Lock renewal isolation: one lock's renewal never costs another lock (issue 9).

The renewals of a client's locks share one scheduler job. These tests wrap one lock's
backend slot (memory backend) so that its renewal fails in a way the core does not
expect, or hangs, and check that the client's other locks stay held and that the bad
lock is lost exactly at its deadline, with ``on_lost``.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis

import dcoord
from dcoord.backends.base import LockGrant, LockSlot
from dcoord.scheduler import JOB_WORKERS

# Slack for thread wake-ups on a loaded 2-core machine.
MARGIN = 0.5


class WrappedSlot:
    """A real slot whose ``extend`` first runs ``before_extend`` (raise, or block)."""

    def __init__(self, inner: LockSlot, before_extend: Callable[[], LockGrant | None]) -> None:
        self.inner = inner
        self.before_extend = before_extend
        self.extends = 0

    def acquire(self, deadline: float | None) -> LockGrant | None:
        return self.inner.acquire(deadline)

    def release(self) -> bool:
        return self.inner.release()

    def extend(self, ttl: float) -> LockGrant | None:
        self.extends += 1
        grant = self.before_extend()
        return grant if grant is not None else self.inner.extend(ttl)


@pytest.fixture
def client() -> Iterator[dcoord.Client]:
    with dcoord.connect(f"memory://renewal-{uuid.uuid4().hex[:12]}") as client:
        yield client


def wrap(lock: dcoord.Lock, before_extend: Callable[[], LockGrant | None]) -> WrappedSlot:
    slot = WrappedSlot(lock._slot, before_extend)
    lock._slot = slot
    return slot


def lost_recorder() -> tuple[threading.Event, list[float], Callable[[dcoord.Lock], None]]:
    lost = threading.Event()
    at: list[float] = []

    def on_lost(_: dcoord.Lock) -> None:
        at.append(time.monotonic())
        lost.set()

    return lost, at, on_lost


def hold_across(lock: dcoord.Lock, seconds: float) -> None:
    """Assert that ``lock`` stays held for ``seconds`` (polled, no sleep as sync)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert lock.held, "a healthy lock was lost because of another lock's renewal"
        time.sleep(0.02)


def test_a_renewal_raising_a_foreign_error_costs_only_its_own_lock(
    client: dcoord.Client,
) -> None:
    """A Redis error reply the backend did not map (BUSY, READONLY, NOPERM...) used to
    abort the whole renewal pass: later locks went unrenewed and on_lost never ran."""
    bad_lost, bad_lost_at, bad_on_lost = lost_recorder()
    good_lost, _, good_on_lost = lost_recorder()
    ttl = 1.0
    bad = client.lock("bad", ttl=ttl, on_lost=bad_on_lost)
    good = client.lock("good", ttl=ttl, on_lost=good_on_lost)

    def busy() -> LockGrant | None:
        raise redis.exceptions.ResponseError("BUSY Redis is busy running a script")

    bad_slot = wrap(bad, busy)
    assert bad.acquire()  # first, so it comes first in every renewal pass
    acquired_at = time.monotonic()
    assert good.acquire()

    assert bad_lost.wait(ttl + MARGIN), "the failing lock must be lost, with on_lost"
    assert bad_lost_at[0] - acquired_at >= ttl * 0.98, "lost only at its deadline"
    assert bad_slot.extends >= 2, "a failed renewal is retried until the deadline"
    assert not bad.held
    hold_across(good, ttl * 2)
    assert not good_lost.is_set()
    good.release()


def test_a_hanging_renewal_does_not_delay_other_locks_or_its_own_loss(
    client: dcoord.Client,
) -> None:
    """Head-of-line blocking: one renewal stuck in a request used to stop every other
    renewal (all ran on the scheduler thread), and on_lost waited for the request."""
    hanging = threading.Event()
    answer = threading.Event()
    slow_lost, slow_lost_at, slow_on_lost = lost_recorder()
    fast_lost, _, fast_on_lost = lost_recorder()
    slow = client.lock("slow", ttl=1.5, on_lost=slow_on_lost)
    fast = client.lock("fast", ttl=0.6, on_lost=fast_on_lost)
    renewed_at: list[float] = []

    def hang() -> LockGrant | None:
        hanging.set()
        answer.wait(30)  # the server "answers" only when the test says so
        renewed_at.append(time.monotonic())
        # A reply claiming the lock was extended: it must not resurrect a lost handle.
        return LockGrant(slow.fence, time.monotonic() + slow.ttl)

    wrap(slow, hang)
    try:
        assert slow.acquire()
        acquired_at = time.monotonic()
        assert fast.acquire()
        assert hanging.wait(slow.ttl), "the slow lock's renewal never started"
        # fast's TTL is 0.6 s: it needs several renewals while slow's request hangs.
        assert slow_lost.wait(slow.ttl + MARGIN), "on_lost must fire at the deadline"
        assert slow_lost_at[0] - acquired_at >= slow.ttl * 0.98
        assert not slow.held
        hold_across(fast, fast.ttl * 3)
        assert not fast_lost.is_set()
    finally:
        answer.set()
    # The late "extended" reply comes back: the handle stays lost.
    deadline = time.monotonic() + 5
    while slow._renewing is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert renewed_at, "the hanging request was answered"
    assert slow._renewing is None, "the late reply was processed"
    assert not slow.held
    with pytest.raises(dcoord.LockNotOwned):
        slow.release()
    fast.release()


def test_renewals_of_many_locks_use_a_bounded_number_of_threads(
    client: dcoord.Client,
) -> None:
    names = {t.name for t in threading.enumerate()}
    locks = [client.lock(f"res{i}", ttl=0.6) for i in range(20)]
    for lock in locks:
        assert lock.acquire()
    hold_across(locks[-1], 1.5)
    assert all(lock.held for lock in locks)
    new = {t.name for t in threading.enumerate()} - names
    # One scheduler thread, its job workers and at most RENEWAL_WORKERS renewal threads
    # however many locks: the cost model stays "one job per client".
    assert len(new) <= 1 + JOB_WORKERS + dcoord.lock.RENEWAL_WORKERS, new
    for lock in locks:
        lock.release()


def test_close_lets_go_of_every_lock_even_if_one_release_fails(
    client: dcoord.Client,
) -> None:
    other = dcoord.connect(client.url)
    try:
        first = client.lock("first", ttl=30)
        second = client.lock("second", ttl=30)
        assert first.acquire() and second.acquire()

        def broken_release() -> bool:
            raise RuntimeError("the server said something unexpected")

        first._slot.release = broken_release  # type: ignore[method-assign]
        client.close()
        # Before, the first failure stopped the loop: "second" stayed held for 30 s.
        assert other.lock("second").acquire(blocking=False)
    finally:
        other.close()


def test_a_renewal_finishing_after_the_scheduler_stopped_is_quiet(
    client: dcoord.Client, caplog: pytest.LogCaptureFixture
) -> None:
    """A renewal answered after the scheduler closed (a dying client) has nothing left
    to reschedule: no error, no traceback."""
    hanging, answer, finished = threading.Event(), threading.Event(), threading.Event()
    lock = client.lock("res", ttl=3.0)

    def hang() -> LockGrant | None:
        hanging.set()
        answer.wait(30)
        return None  # then the real extend answers: still held

    slot = wrap(lock, hang)
    real_extend = slot.extend

    def extend(ttl: float) -> LockGrant | None:
        try:
            return real_extend(ttl)
        finally:
            finished.set()

    slot.extend = extend  # type: ignore[method-assign]
    assert lock.acquire()
    assert hanging.wait(5)
    client.scheduler.close()
    answer.set()
    assert finished.wait(5)
    deadline = time.monotonic() + 5
    while lock._renewing is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lock._renewing is None
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], caplog.text
