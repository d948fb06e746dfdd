"""The per-client background scheduler: one thread, periodic jobs, clean shutdown."""

from __future__ import annotations

import threading

from dcoord.scheduler import Scheduler


def test_jobs_run_repeatedly_on_one_thread_and_stop_on_close() -> None:
    scheduler = Scheduler()
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
    assert len(threads) == 1
    count = len(ran["a"])
    assert not any(t.name == "dcoord" and t.is_alive() for t in threading.enumerate())
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
