"""One background thread per client that times periodic jobs, and pools for blocking work.

Lock renewal, member heartbeats and lease keep-alives of a client are all timed here, so
a client with a thousand held locks still has one scheduler thread, and
``Client.close()`` stops every job at once (a watchdog can never outlive its client).
The scheduler thread only times: each run of a job goes to a small :class:`WorkerPool`,
so one job stuck on a slow request (a heartbeat waiting out ``request_timeout``) never
holds up another (the lock watchdog that must renew in time). Work inside one job that
may wait for the network (each lock's renewal) can use a pool of its own the same way.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from .errors import ClientClosed

log = logging.getLogger("dcoord")

# A job returns None to run again after its interval, a number of seconds to run again
# after that delay instead, or False to stop.
JobResult = float | bool | None

#: Threads that run a scheduler's jobs, at most (started only when a run would wait).
JOB_WORKERS = 4


class Job:
    """A periodic job; ``cancel()`` stops it (a run in progress finishes first)."""

    def __init__(
        self, scheduler: Scheduler, fn: Callable[[], JobResult], interval: float, name: str
    ):
        self._scheduler = scheduler
        self.fn = fn
        self.interval = interval
        self.name = name
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self._scheduler.forget_cancelled()


class Scheduler:
    """Times jobs on one daemon thread, started on first use, and runs them on a pool.

    A job never runs twice at once: it is back in the queue only once its run ended.
    """

    def __init__(self, name: str = "dcoord", workers: int = JOB_WORKERS) -> None:
        self._name = name
        self._cond = threading.Condition()
        self._queue: list[tuple[float, int, Job]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._cancelled = 0  # cancelled jobs still in the queue, at most
        self._pool = WorkerPool(f"{name}-job", workers)
        self._running: set[int] = set()  # ident of each thread running a job now
        self._paused_until: threading.Event | None = None

    def every(
        self, interval: float, fn: Callable[[], JobResult], *, name: str, delay: float | None = None
    ) -> Job:
        """Run ``fn`` every ``interval`` seconds, first after ``delay`` (default: interval).

        Raises :class:`~dcoord.ClientClosed` once the scheduler is closed."""
        job = Job(self, fn, interval, name)
        with self._cond:
            if self._closed:
                raise ClientClosed(f"cannot start {name}: the client is closed")
            self._push(job, interval if delay is None else delay)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return job

    def forget_cancelled(self) -> None:
        """Drop cancelled jobs from the queue once they are most of it.

        Lazy removal keeps cancel() O(1); compacting at half keeps a client that makes and
        drops many short-lived jobs from growing its queue without bound.
        """
        with self._cond:
            self._cancelled += 1
            if self._cancelled * 2 > len(self._queue):
                self._queue = [entry for entry in self._queue if not entry[2].cancelled]
                heapq.heapify(self._queue)
                self._cancelled = 0
            self._cond.notify_all()

    def pause(self, until: threading.Event) -> None:
        """Start no run of any job until ``until`` is set (runs in progress finish).

        For fault injection: the in-process stand-in for a SIGSTOP of the client's
        process, used where the client cannot be a process of its own (``memory://``).
        """
        with self._cond:
            self._paused_until = until
            self._cond.notify_all()

    def close(self) -> None:
        """Stop timing jobs and wait for the runs in progress; queued jobs never run again.

        Called from inside a job, it does not wait for that job's own run.
        """
        me = threading.get_ident()
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._cond:
            # What the jobs use (the connection) goes after close(): let their runs end.
            self._cond.wait_for(lambda: not (self._running - {me}))
        self._pool.close()

    def _push(self, job: Job, delay: float) -> None:
        heapq.heappush(self._queue, (time.monotonic() + delay, next(self._seq), job))

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    if self._paused_until is not None:
                        if not self._paused_until.is_set():
                            self._cond.wait(0.05)  # the event cannot wake this condition
                            continue
                        self._paused_until = None
                    while self._queue and self._queue[0][2].cancelled:
                        heapq.heappop(self._queue)
                    if self._queue and self._queue[0][0] <= time.monotonic():
                        _, _, job = heapq.heappop(self._queue)
                        break
                    timeout = self._queue[0][0] - time.monotonic() if self._queue else None
                    self._cond.wait(timeout)
            self._pool.submit(functools.partial(self._execute, job))

    def _execute(self, job: Job) -> None:
        me = threading.get_ident()
        with self._cond:
            if self._closed:
                return
            self._running.add(me)
        try:
            result = job.fn()
        except Exception:
            log.exception("dcoord background job %s failed; it will run again", job.name)
            result = None
        with self._cond:
            self._running.discard(me)
            if not (self._closed or result is False or job.cancelled):
                self._push(job, job.interval if result is None or result is True else result)
            self._cond.notify_all()


class WorkerPool:
    """Runs tasks on at most ``size`` daemon threads, each started only when needed.

    A new thread starts only when a task would otherwise wait while fewer than ``size``
    run, and a thread idle for ``idle_exit`` seconds ends: a pool whose tasks are quick
    keeps one thread, an unused pool none. Threads are daemons, so a task stuck in a
    request never delays the interpreter's exit.
    """

    def __init__(self, name: str, size: int, *, idle_exit: float = 30.0) -> None:
        self._name = name
        self._size = size
        self._idle_exit = idle_exit
        self._cond = threading.Condition()
        self._tasks: deque[Callable[[], object]] = deque()
        self._threads = 0
        self._idle = 0
        self._closed = False
        self._serial = itertools.count(1)

    def submit(self, fn: Callable[[], object]) -> bool:
        """Run ``fn`` on a pool thread; False (and not run) once the pool is closed."""
        with self._cond:
            if self._closed:
                return False
            self._tasks.append(fn)
            if self._idle < len(self._tasks) and self._threads < self._size:
                self._threads += 1
                threading.Thread(
                    target=self._work, name=f"{self._name}-{next(self._serial)}", daemon=True
                ).start()
            self._cond.notify()
        return True

    def close(self) -> None:
        """Drop queued tasks and let the threads end; a task already running finishes."""
        with self._cond:
            self._closed = True
            self._tasks.clear()
            self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                self._idle += 1
                self._cond.wait_for(lambda: self._tasks or self._closed, self._idle_exit)
                self._idle -= 1
                if self._closed or not self._tasks:  # closed, or idle for idle_exit
                    self._threads -= 1
                    return
                task = self._tasks.popleft()
            try:
                task()
            except Exception:
                log.exception("dcoord background task on %s failed", self._name)
