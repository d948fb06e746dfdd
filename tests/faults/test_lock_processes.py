"""Locks under process faults, with real processes against real Redis and etcd.

A killed holder (SIGKILL) frees the lock within its TTL. A holder paused (SIGSTOP) past
its TTL loses the lock to a new holder; resumed, it still believes for a moment that it
could write, and only the fence stops it: the checker below finds a stale write in the
resource's history, and a negative control shows it does find one when the stale holder
writes unfenced. The ``dcoord lock`` command is tested here as well.

Run as a script, this module is the holder process the tests drive over stdin/stdout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.child import DrivenChild

ROOT = Path(__file__).resolve().parents[2]
# Long enough that a renewal delayed by a loaded machine does not lose the lock early.
TTL = {"redis": 2.0, "etcd": 2.0}
RESOURCE = "resource"


# -- the holder process ----------------------------------------------------------------


def holder_main(url: str, namespace: str, name: str, ttl: float, log_path: str) -> None:
    """Acquire ``name``, say ``ACQUIRED <fence>``, then obey commands from stdin."""
    import dcoord
    from tests.faults.child import line_writer

    say = line_writer()

    with dcoord.connect(url, namespace=namespace) as client:
        lock = client.lock(name, ttl=ttl, on_lost=lambda _: say("LOST"))
        if not lock.acquire(timeout=60):
            say("TIMEOUT")
            return
        say(f"ACQUIRED {lock.fence}")
        fence = client.fence(RESOURCE)
        for line in sys.stdin:
            command = line.strip()
            if command in ("write-fenced", "write-unfenced"):
                admitted = command == "write-unfenced" or fence.admit(lock.fence)
                if admitted:
                    with open(log_path, "a") as log:
                        log.write(f"{lock.fence} {os.getpid()}\n")
                say(f"WROTE {admitted} held={lock.held}")
            elif command == "exit":
                break


# -- the checker -----------------------------------------------------------------------


def stale_writes(log_path: Path) -> list[str]:
    """Writes that landed after a write with a greater fence: a stale holder's writes."""
    problems = []
    highest = 0
    for number, line in enumerate(log_path.read_text().splitlines(), 1):
        fence = int(line.split()[0])
        if fence < highest:
            problems.append(f"line {number}: fence {fence} written after fence {highest}")
        highest = max(highest, fence)
    return problems


def test_checker_flags_a_write_with_a_smaller_fence(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_text("5 1\n5 1\n9 2\n")
    assert stale_writes(log) == []
    log.write_text("5 1\n9 2\n5 1\n")
    assert stale_writes(log) == ["line 3: fence 5 written after fence 9"]


# -- driving holders -------------------------------------------------------------------


class Holder(DrivenChild):
    """A holder process; stopped (SIGKILL) by the fixture even if the test fails."""

    def __init__(self, url: str, namespace: str, ttl: float, log_path: Path) -> None:
        super().__init__(
            [sys.executable, __file__, url, namespace, "the-lock", str(ttl), str(log_path)],
            cwd=ROOT,
            kind="holder",
        )

    def acquired_fence(self) -> int:
        return int(self.expect("ACQUIRED").split()[1])


@pytest.fixture
def holders(
    real_backend: str, real_backend_url: str, tmp_path: Path
) -> Iterator[tuple[str, float, Path, list[Holder]]]:
    started: list[Holder] = []
    yield real_backend_url, TTL[real_backend], tmp_path / "resource.log", started
    for holder in started:
        holder.stop()


def spawn(holders: tuple[str, float, Path, list[Holder]], namespace: str) -> Holder:
    url, ttl, log_path, started = holders
    holder = Holder(url, namespace, ttl, log_path)
    started.append(holder)
    return holder


@pytest.mark.slow
def test_killed_holder_frees_the_lock_within_its_ttl(
    holders: tuple[str, float, Path, list[Holder]], namespace: str
) -> None:
    ttl = holders[1]
    first = spawn(holders, namespace)
    first_fence = first.acquired_fence()
    first.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    second = spawn(holders, namespace)
    second_fence = second.acquired_fence()
    waited = time.monotonic() - killed_at
    assert second_fence > first_fence
    # The TTL bounds the wait (etcd: the lease TTL, rounded up to whole seconds), plus
    # the new process's start-up.
    assert waited < ttl + 3.0, waited


@pytest.mark.slow
def test_paused_holder_loses_the_lock_and_its_stale_fence_is_rejected(
    holders: tuple[str, float, Path, list[Holder]], namespace: str
) -> None:
    ttl, log_path = holders[1], holders[2]
    stale = spawn(holders, namespace)
    stale_fence = stale.acquired_fence()
    stale.send("write-fenced")
    assert stale.expect("WROTE") == "WROTE True held=True"

    stale.signal(signal.SIGSTOP)
    paused_at = time.monotonic()
    successor = spawn(holders, namespace)
    successor_fence = successor.acquired_fence()
    assert time.monotonic() - paused_at >= ttl * 0.5, "the lock was taken before its TTL"
    assert successor_fence > stale_fence
    successor.send("write-fenced")
    assert successor.expect("WROTE") == "WROTE True held=True"

    assert not stale.lost, "the holder lost the lock before it was paused"
    stale.signal(signal.SIGCONT)
    stale.send("write-fenced")
    # Resumed, the stale holder already knows it lost the lock (held=False) and the
    # fence refuses its write; its watchdog reports the loss as well.
    assert stale.expect("WROTE") == "WROTE False held=False"
    if not stale.lost:
        assert stale.expect("LOST", timeout=TTL["redis"] + 5) == "LOST"
    assert stale_writes(log_path) == []

    # Negative control: the same stale holder writing without the fence corrupts the
    # resource's history, and the checker catches it.
    stale.send("write-unfenced")
    assert stale.expect("WROTE").startswith("WROTE True")
    problems = stale_writes(log_path)
    assert problems == [f"line 3: fence {stale_fence} written after fence {successor_fence}"]


# -- dcoord lock -----------------------------------------------------------------------


def dcoord_lock(url: str, namespace: str, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dcoord",
        "lock",
        "cli-lock",
        "--url",
        url,
        "--namespace",
        namespace,
        *args,
    ]


def test_cli_passes_fence_and_exit_code(real_backend_url: str, namespace: str) -> None:
    script = "import os, sys; print(os.environ['DCOORD_FENCE']); sys.exit(3)"
    done = subprocess.run(
        dcoord_lock(real_backend_url, namespace, "--ttl", "5", "--", sys.executable, "-c", script),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3, done.stderr
    assert int(done.stdout.strip()) > 0


@pytest.mark.slow
def test_cli_runs_commands_one_at_a_time(
    real_backend_url: str, namespace: str, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    script = (
        "import sys, time; f = open(sys.argv[1], 'a'); f.write('start\\n'); f.flush(); "
        "time.sleep(0.3); f.write('end\\n')"
    )
    command = dcoord_lock(real_backend_url, namespace, "--", sys.executable, "-c", script, str(log))
    procs = [subprocess.Popen(command, cwd=ROOT) for _ in range(3)]
    try:
        assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert log.read_text().split() == ["start", "end"] * 3


def test_cli_forwards_sigterm_and_releases(real_backend_url: str, namespace: str) -> None:
    import dcoord

    script = "import sys, time; print('ready', flush=True); time.sleep(60)"
    proc = subprocess.Popen(
        dcoord_lock(real_backend_url, namespace, "--ttl", "30", "--", sys.executable, "-c", script),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        with dcoord.connect(real_backend_url, namespace=namespace) as client:
            assert not client.lock("cli-lock").acquire(blocking=False)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 128 + signal.SIGTERM
            # Released at once, not after the 30 s TTL.
            assert client.lock("cli-lock").acquire(timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    holder_main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5])
