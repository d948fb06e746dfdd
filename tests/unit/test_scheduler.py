"""The per-client background scheduler: one thread, periodic jobs, clean shutdown."""

from __future__ import annotations

import threading
import time

from dcoord.scheduler import Scheduler, WorkerPool


def test_jobs_run_repeatedly_on_the_schedulers_workers_and_stop_on_close() -> None:
    scheduler = Scheduler(name="sched")
    ran: dict[str, list[str]] = {"a": [], "b": []}
    done = threading.Event()

    def job(name: str) -> None:
        ran[name].append(threading.current_thread().name)
        if len(ran["a"]) >= 3 and len(ran["b"]) >= 3:
            done.set()

    scheduler.every(0.01, lambda: job("a"), name="a")
    scheduler.every(0.02, lambda: job("b"), name="b")
    assert done.wait(5)
    scheduler.close()
    threads = set(ran["a"]) | set(ran["b"])
    assert all(name.startswith("sched-job") for name in threads), threads
    count = len(ran["a"])
    # Idle workers see the close and end on their own: poll, with a deadline.
    deadline = time.monotonic() + 5
    while any(t.name.startswith("sched") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the scheduler's threads outlived close()"
        time.sleep(0.01)
    assert len(ran["a"]) == count


def test_cancel_and_false_result_stop_a_job_and_errors_do_not() -> None:
    scheduler = Scheduler()
    calls = {"once": 0, "flaky": 0}
    flaky_again = threading.Event()

    def once() -> bool:
        calls["once"] += 1
        return False

    def flaky() -> None:
        calls["flaky"] += 1
        if calls["flaky"] >= 3:
            flaky_again.set()
        raise RuntimeError("boom")

    scheduler.every(0.01, once, name="once")
    scheduler.every(0.01, flaky, name="flaky")
    assert flaky_again.wait(5)  # kept running after raising
    cancelled = scheduler.every(0.01, lambda: None, name="cancelled", delay=60)
    cancelled.cancel()
    scheduler.close()
    assert calls["once"] == 1


def test_a_job_can_choose_its_next_delay() -> None:
    scheduler = Scheduler()
    times: list[int] = []
    done = threading.Event()

    def job() -> float:
        times.append(1)
        if len(times) == 3:
            done.set()
        return 0.001

    scheduler.every(60, job, name="fast", delay=0)
    assert done.wait(5)
    scheduler.close()


def test_cancelled_jobs_do_not_pile_up_in_the_queue() -> None:
    scheduler = Scheduler()
    keep = scheduler.every(3600, lambda: None, name="keep")
    for i in range(1000):
        scheduler.every(3600, lambda: None, name=f"short-{i}").cancel()
    assert len(scheduler._queue) <= 3  # compacted, not 1001 entries waiting an hour
    assert any(entry[2] is keep for entry in scheduler._queue)
    scheduler.close()


def test_worker_pool_starts_threads_only_when_busy_and_caps_them() -> None:
    pool = WorkerPool("test-pool", 3)
    ran = threading.Event()
    assert pool.submit(ran.set)
    assert ran.wait(5)
    # Quick tasks one after another reuse the one thread.
    for _ in range(20):
        done = threading.Event()
        pool.submit(done.set)
        assert done.wait(5)
    assert pool._threads == 1
    # Tasks that block: a thread each, up to the cap; the rest wait their turn.
    release = threading.Event()
    started = threading.Semaphore(0)
    finished = threading.Semaphore(0)

    def block() -> None:
        started.release()
        release.wait(10)
        finished.release()

    for _ in range(5):
        pool.submit(block)
    for _ in range(3):
        assert started.acquire(timeout=5)
    assert not started.acquire(timeout=0.1), "at most 3 run at once"
    assert pool._threads == 3
    release.set()
    for _ in range(5):
        assert finished.acquire(timeout=5)
    pool.close()
    assert not pool.submit(lambda: None)


def test_worker_pool_survives_failing_tasks_and_idle_threads_end() -> None:
    pool = WorkerPool("test-pool", 2, idle_exit=0.05)
    done = threading.Event()

    def fail() -> None:
        raise RuntimeError("boom")

    pool.submit(fail)
    pool.submit(done.set)
    assert done.wait(5)
    deadline = time.monotonic() + 5
    while pool._threads and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool._threads == 0, "idle threads end"
    again = threading.Event()
    pool.submit(again.set)  # and start again on demand
    assert again.wait(5)
    pool.close()


def test_a_job_stuck_in_a_request_does_not_hold_up_the_others() -> None:
    """A heartbeat hanging for request_timeout must not starve the lock watchdog: each
    run goes to a worker, the scheduler thread only times them."""
    scheduler = Scheduler()
    release = threading.Event()
    stuck = threading.Event()
    runs: list[float] = []
    ran_three_times = threading.Event()

    def hang() -> None:
        stuck.set()
        release.wait(30)

    def tick() -> None:
        runs.append(time.monotonic())
        if len(runs) >= 3:
            ran_three_times.set()

    scheduler.every(60, hang, name="hanging heartbeat", delay=0)
    assert stuck.wait(5)
    scheduler.every(0.01, tick, name="watchdog")
    try:
        assert ran_three_times.wait(5), "the other job did not run while one was stuck"
    finally:
        release.set()
        scheduler.close()


def test_close_waits_for_a_run_in_progress_and_a_job_runs_once_at_a_time() -> None:
    scheduler = Scheduler()
    inside = threading.Event()
    release = threading.Event()
    concurrent = []
    active = [0]

    def slow() -> None:
        active[0] += 1
        concurrent.append(active[0])
        inside.set()
        release.wait(5)
        active[0] -= 1

    scheduler.every(0.001, slow, name="slow", delay=0)
    assert inside.wait(5)
    closer = threading.Thread(target=scheduler.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive(), "close() returned while a job was still running"
    release.set()
    closer.join(5)
    assert not closer.is_alive()
    assert max(concurrent) == 1


def test_a_paused_scheduler_starts_no_run_until_resumed() -> None:
    """The fault suite's stand-in for SIGSTOP on memory:// (no renewals while paused)."""
    scheduler = Scheduler()
    resume = threading.Event()
    runs: list[float] = []
    ran = threading.Event()

    def tick() -> None:
        runs.append(time.monotonic())
        ran.set()

    scheduler.pause(until=resume)
    scheduler.every(0.01, tick, name="watchdog", delay=0)
    try:
        assert not ran.wait(0.3), "a job ran while the scheduler was paused"
        resume.set()
        assert ran.wait(5)
    finally:
        scheduler.close()
