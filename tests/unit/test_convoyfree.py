"""Locks many threads take all the time (the embedded store's tables, a client's register
of held locks): a release wakes a waiter but does not hand it the lock."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import dcoord
from dcoord.backends.memory import memory_server
from dcoord.backends.memory.locks import _table
from dcoord.backends.memory.semaphore import queue_table
from dcoord.convoyfree import ConvoyFreeLock
from dcoord.lock import _client_locks


@pytest.fixture
def no_forced_switches() -> Iterator[None]:
    """The GIL passes only when a thread blocks (or sleeps): the tests decide who runs."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(10.0)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


def blocked_in_acquire(thread: threading.Thread, line: int, deadline: float) -> None:
    """Wait until ``thread`` is at ``line`` of this file with the GIL given up: with no
    forced switches, it gave the GIL up only by blocking there."""
    while time.monotonic() < deadline:
        time.sleep(0.001)
        assert thread.ident is not None
        frame = sys._current_frames().get(thread.ident)
        while frame is not None and frame.f_code.co_filename != __file__:
            frame = frame.f_back
        if frame is not None and frame.f_lineno == line:
            return
    raise AssertionError("the waiter never blocked")


def fresh_store() -> str:
    return f"convoyfree-{time.monotonic_ns()}"


def client_register() -> Any:
    client = dcoord.connect(f"memory://{fresh_store()}")
    register = _client_locks(client)
    client.close()  # the register's lock outlives it: all this test needs
    return register._mutex


LOCKS = {
    "store": lambda: memory_server(fresh_store()).cond,
    "lock table": lambda: _table(memory_server(fresh_store())).mutex,
    "queue table": lambda: queue_table(memory_server(fresh_store())).mutex,
    "client register": client_register,
}


@pytest.mark.parametrize("make", LOCKS.values(), ids=LOCKS.keys())
def test_a_released_lock_is_still_free_for_the_running_thread(
    no_forced_switches: None, make: Callable[[], Any]
) -> None:
    # A plain lock handed itself to the waiter its release woke, while that waiter could
    # not run (no GIL): the releaser's next step then blocked, and every step after it
    # cost a thread switch (the lock convoy that made 8 threads 0.2-0.8x as fast as 1).
    cond = make()
    took: list[str] = []
    cond.acquire()

    def waiter() -> None:
        with cond:  # the line blocked_in_acquire() waits at
            took.append("waiter")

    thread = threading.Thread(target=waiter)
    thread.start()
    blocked_in_acquire(thread, waiter.__code__.co_firstlineno + 1, time.monotonic() + 10)
    cond.release()
    # Long enough for the woken thread to be scheduled, while this one keeps the GIL.
    until = time.monotonic() + 0.05
    while time.monotonic() < until:
        pass
    assert cond.acquire(False), "the release handed the lock to a thread that is not running"
    took.append("releaser")
    cond.release()
    thread.join(10)
    assert took == ["releaser", "waiter"]  # the waiter took it once it ran, and was free


def test_it_is_reentrant_and_a_wait_gives_it_up_at_any_depth() -> None:
    cond = memory_server(fresh_store()).cond
    ready, got = threading.Event(), []

    def notifier() -> None:
        ready.wait(10)
        with cond:  # only once the waiter has given up both levels
            got.append("notified")
            cond.notify_all()

    thread = threading.Thread(target=notifier)
    thread.start()
    with cond, cond:
        ready.set()
        assert cond.wait_for(lambda: got, 10)  # the notifier took it: the wait gave it up
        # Taken back two levels deep: one release leaves it held, the second frees it.
        cond.release()
        assert _held_elsewhere(cond)
        cond.release()
        assert not _held_elsewhere(cond)
        cond.acquire()
        cond.acquire()
    thread.join(10)
    assert not _held_elsewhere(cond)


def _held_elsewhere(cond: threading.Condition) -> bool:
    """Whether ``cond``'s lock is held, by any thread (asked from a thread of its own)."""
    free: list[bool] = []

    def probe() -> None:
        got = cond.acquire(False)
        free.append(got)
        if got:
            cond.release()

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join(10)
    return not free[0]


def test_no_waiter_sleeps_through_a_release() -> None:
    # 8 threads, each taking the lock 2,000 times with a switch now and then inside it:
    # a lost wake-up would leave one asleep on a free lock, and the join time out.
    cond = memory_server(fresh_store()).cond
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switches inside the critical section, often
    counts = [0]

    def work() -> None:
        for _ in range(2_000):
            with cond:
                counts[0] += 1

    threads = [threading.Thread(target=work) for _ in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        sys.setswitchinterval(interval)
    assert not any(thread.is_alive() for thread in threads)
    assert counts[0] == 16_000


class Interrupted(Exception):
    """Raised by this test's signal handler in the main thread."""


def test_a_wait_ended_by_a_signal_leaves_no_waiter_behind(no_forced_switches: None) -> None:
    # The main thread's wait on the lock is ended by an exception from a signal handler
    # (as a timeout or Ctrl-C would). Its place in the queue must go with it: else the
    # next release wakes that place, and the thread queued behind it sleeps on a free lock.
    lock = ConvoyFreeLock()
    holder_has_it, release_it = threading.Event(), threading.Event()

    def holder() -> None:
        with lock:
            holder_has_it.set()
            release_it.wait(10)

    main = threading.main_thread()
    assert threading.current_thread() is main, "signals reach only the main thread"
    previous = signal.signal(signal.SIGUSR1, lambda *_: (_ for _ in ()).throw(Interrupted()))
    holding = threading.Thread(target=holder)
    holding.start()
    try:
        assert holder_has_it.wait(10)

        def interrupt() -> None:
            blocked_in_acquire(main, interrupted_line, time.monotonic() + 10)
            assert main.ident is not None
            signal.pthread_kill(main.ident, signal.SIGUSR1)

        interrupted_line = sys._getframe().f_lineno + 4
        interrupter = threading.Thread(target=interrupt)
        interrupter.start()
        with pytest.raises(Interrupted):
            lock.acquire()  # the line interrupt() waits at
        interrupter.join(10)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    took: list[str] = []

    def behind() -> None:
        with lock:  # the line blocked_in_acquire() waits at
            took.append("behind")

    queued = threading.Thread(target=behind, daemon=True)  # (a failure leaves it asleep)
    queued.start()
    blocked_in_acquire(queued, behind.__code__.co_firstlineno + 1, time.monotonic() + 10)
    release_it.set()
    holding.join(10)
    queued.join(10)
    assert took == ["behind"], "the thread queued behind the interrupted wait never woke"
