"""A lock that is never handed to a thread that is not running.

For short critical sections that many threads of one process enter all the time: the
embedded store's tables (its keys and log, its locks, its queues, its elections) and a
client's register of held locks, which every acquire and release updates. A plain
``threading.Lock`` forms a convoy there under the GIL: when the interpreter switches
threads while one holds the lock (it does every ``sys.getswitchinterval()``, wherever
the thread is), the others block on it; its release then wakes one of them, which takes
the lock at once *without the GIL* and so cannot use it until the GIL comes round, while
the releaser, still running, blocks on its very next step. From then on every step of
the store costs a thread switch: 8 threads committing null 2PC transactions made 5-6k
commits/s where one made 15-18k, and 8 threads taking and releasing embedded locks of
their own made 0.2x of one thread's cycles (docs/performance.md, "Coordinator cost, 8
threads").

Here a release only *wakes* a waiter; the waiter takes the lock when it runs again
(holding the GIL), if it is still free, and otherwise waits again. A thread switched out
inside a critical section then costs the others one wait each, not a convoy.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any


class ConvoyFreeLock:
    """A reentrant lock (as ``threading.RLock``, which does the counting) whose release
    wakes a waiter instead of handing it the lock. No timeout: what it guards is
    short."""

    __slots__ = ("_lock", "_waiters")

    def __init__(self) -> None:
        self._lock = threading.RLock()
        # Each waiter's own held lock, released to wake it. deque's append, popleft and
        # remove are atomic under the GIL, which is all this bookkeeping needs.
        self._waiters: deque[threading.Lock] = deque()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._lock.acquire(False):  # free, or this thread's already
            return True
        if not blocking:
            return False
        if timeout != -1:
            raise ValueError("a ConvoyFreeLock takes no timeout")
        waiter = threading.Lock()
        waiter.acquire()
        taken = False
        try:
            while not taken:
                # Registered before the retry: a release in between wakes this waiter.
                self._waiters.append(waiter)
                taken = self._lock.acquire(False)
                if not taken:
                    waiter.acquire()  # until a release wakes it; then try again
        finally:
            # Off the queue however this ends (an exception from a signal handler can
            # end the wait). If a release woke it already: taken, this thread's own
            # release wakes the next; not taken, that wake-up is passed on, or another
            # waiter could sleep on a free lock.
            try:
                self._waiters.remove(waiter)
            except ValueError:
                if not taken:
                    self._wake_one()
        return True

    def release(self) -> None:
        self._lock.release()
        if self._waiters and not self._lock._is_owned():  # type: ignore[attr-defined]
            self._wake_one()

    __enter__ = acquire

    def __exit__(self, *_: object) -> None:
        self.release()

    # What threading.Condition uses, if its lock has them, to wait on a reentrant lock:
    # give it up whatever the depth, then take it back at that depth.

    def _is_owned(self) -> bool:
        return bool(self._lock._is_owned())  # type: ignore[attr-defined]

    def _release_save(self) -> Any:
        state = self._lock._release_save()  # type: ignore[attr-defined]
        self._wake_one()
        return state

    def _acquire_restore(self, state: Any) -> None:
        self.acquire()
        for _ in range(state[0] - 1):  # (depth, owner): back to the depth it had
            self._lock.acquire(False)

    def _wake_one(self) -> None:
        try:
            waiter = self._waiters.popleft()
        except IndexError:
            return
        waiter.release()


def convoy_free_condition(lock: ConvoyFreeLock | None = None) -> threading.Condition:
    """A condition variable over ``lock`` (a new :class:`ConvoyFreeLock` by default)."""
    return threading.Condition(lock or ConvoyFreeLock())  # type: ignore[arg-type]
