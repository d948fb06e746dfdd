"""Leader election under process faults, with real processes against real Redis and etcd.

A killed leader (SIGKILL) is replaced within its TTL plus a measured bound. A leader
paused (SIGSTOP) past its TTL is replaced; resumed, only the fence on its term stops its
writes (negative control: unfenced, the checker finds the stale write). ``dcoord elect``
stops its command (SIGTERM, then SIGKILL after the grace period) when it loses the
election, and ``dcoord leader`` reports who leads.

Run as a script, this module is the candidate process the tests drive over stdin/stdout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.child import DrivenChild
from tests.faults.test_lock_processes import RESOURCE, stale_writes

ROOT = Path(__file__).resolve().parents[2]
# Long enough that a renewal delayed by a loaded machine does not lose leadership early.
TTL = {"redis": 2.0, "etcd": 2.0}
# Measured by bench/election.py (20 rounds, 2 shared cores): fail-over after a SIGKILL
# took at most TTL + 0.31 s (etcd; Redis less). The bound leaves room for a loaded machine.
FAILOVER_BOUND = 2.0
ELECTION = "the-election"


# -- the candidate process -------------------------------------------------------------


def candidate_main(url: str, namespace: str, ttl: float, log_path: str) -> None:
    """Campaign, say ``ELECTED <term>``, then obey commands from stdin."""
    import dcoord
    from tests.faults.child import line_writer

    say = line_writer()

    with dcoord.connect(url, namespace=namespace) as client:
        election = client.election(ELECTION)
        say("CAMPAIGNING")
        leadership = election.campaign(
            str(os.getpid()), ttl=ttl, timeout=60, on_lost=lambda _: say("LOST")
        )
        if leadership is None:
            say("TIMEOUT")
            return
        say(f"ELECTED {leadership.term}")
        fence = client.fence(RESOURCE)
        for line in sys.stdin:
            command = line.strip()
            if command in ("write-fenced", "write-unfenced"):
                admitted = command == "write-unfenced" or fence.admit(leadership.term)
                if admitted:
                    with open(log_path, "a") as log:
                        log.write(f"{leadership.term} {os.getpid()}\n")
                say(f"WROTE {admitted} held={leadership.held}")
            elif command == "exit":
                break


class Candidate(DrivenChild):
    """A candidate process (stopped by the fixture even if the test fails)."""

    def __init__(self, url: str, namespace: str, ttl: float, log_path: Path) -> None:
        super().__init__(
            [sys.executable, __file__, url, namespace, str(ttl), str(log_path)], cwd=ROOT
        )

    def elected_term(self, timeout: float = 30) -> int:
        return int(self.expect("ELECTED", timeout).split()[1])


@pytest.fixture
def candidates(
    real_backend: str, real_backend_url: str, tmp_path: Path
) -> Iterator[tuple[str, float, Path, list[Candidate]]]:
    started: list[Candidate] = []
    yield real_backend_url, TTL[real_backend], tmp_path / "resource.log", started
    for candidate in started:
        candidate.stop()


def spawn(candidates: tuple[str, float, Path, list[Candidate]], namespace: str) -> Candidate:
    url, ttl, log_path, started = candidates
    candidate = Candidate(url, namespace, ttl, log_path)
    started.append(candidate)
    return candidate


@pytest.mark.slow
def test_killed_leader_is_replaced_within_ttl_and_a_bound(
    candidates: tuple[str, float, Path, list[Candidate]], namespace: str
) -> None:
    ttl = candidates[1]
    leader = spawn(candidates, namespace)
    first = leader.elected_term()
    follower = spawn(candidates, namespace)
    follower.expect("CAMPAIGNING")
    time.sleep(0.5)  # let it reach the server and queue; not a synchronisation
    leader.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    second = follower.elected_term(timeout=ttl + FAILOVER_BOUND + 10)
    waited = time.monotonic() - killed_at
    assert second > first
    assert waited < ttl + FAILOVER_BOUND, f"fail-over took {waited:.2f} s"


@pytest.mark.slow
def test_paused_leader_is_replaced_and_its_stale_term_is_fenced(
    candidates: tuple[str, float, Path, list[Candidate]], namespace: str
) -> None:
    ttl, log_path = candidates[1], candidates[2]
    stale = spawn(candidates, namespace)
    stale_term = stale.elected_term()
    stale.send("write-fenced")
    assert stale.expect("WROTE") == "WROTE True held=True"

    stale.signal(signal.SIGSTOP)
    paused_at = time.monotonic()
    successor = spawn(candidates, namespace)
    successor_term = successor.elected_term()
    assert time.monotonic() - paused_at >= ttl * 0.5, "replaced before the TTL"
    assert successor_term > stale_term
    successor.send("write-fenced")
    assert successor.expect("WROTE") == "WROTE True held=True"

    assert not stale.lost, "the leader lost before it was paused"
    stale.signal(signal.SIGCONT)
    stale.send("write-fenced")
    # Resumed, the stale leader knows it is over (held=False) and the fence refuses it.
    assert stale.expect("WROTE") == "WROTE False held=False"
    if not stale.lost:
        assert stale.expect("LOST", timeout=ttl + 5) == "LOST"
    assert stale_writes(log_path) == []

    # Negative control: unfenced, the stale leader's write lands and the checker sees it.
    stale.send("write-unfenced")
    assert stale.expect("WROTE").startswith("WROTE True")
    # (The checker says "fence": a term is the leader's fencing token.)
    assert stale_writes(log_path) == [
        f"line 3: fence {stale_term} written after fence {successor_term}"
    ]


# -- dcoord elect / dcoord leader ------------------------------------------------------


def dcoord(url: str, namespace: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "dcoord", *args, "--url", url, "--namespace", namespace]


def test_elect_passes_term_and_exit_code_and_leader_reports_it(
    real_backend_url: str, namespace: str
) -> None:
    script = (
        "import os, subprocess, sys; print(os.environ['DCOORD_TERM'], flush=True); "
        "out = subprocess.run(sys.argv[1:], capture_output=True, text=True).stdout; "
        "print(out, end='', flush=True); sys.exit(3)"
    )
    leader_cmd = dcoord(real_backend_url, namespace, "leader", "cli-election", "--json")
    done = subprocess.run(
        [
            *dcoord(real_backend_url, namespace, "elect", "cli-election"),
            "--value",
            "me",
            "--ttl",
            "5",
            "--",
            sys.executable,
            "-c",
            script,
            *leader_cmd,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3, done.stderr
    term_line, leader_line = done.stdout.splitlines()
    assert json.loads(leader_line) == {
        "election": "cli-election",
        "term": int(term_line),
        "value": "me",
    }
    # Resigned on exit: nobody leads now.
    after = subprocess.run(
        dcoord(real_backend_url, namespace, "leader", "cli-election"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (after.returncode, after.stdout) == (3, "-\n")


@pytest.mark.slow
def test_elect_stops_its_command_when_leadership_is_lost(
    real_backend: str, real_backend_url: str, namespace: str
) -> None:
    import dcoord as lib

    ttl = TTL[real_backend]
    # The command ignores SIGTERM: dcoord must SIGKILL it after the grace period.
    script = (
        "import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print(os.getpid(), flush=True); time.sleep(120)"
    )
    proc = subprocess.Popen(
        [
            *dcoord(real_backend_url, namespace, "elect", "cli-loss"),
            "--ttl",
            str(ttl),
            "--grace",
            "1",
            "--",
            sys.executable,
            "-c",
            script,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        child_pid = int(proc.stdout.readline())
        with lib.connect(real_backend_url, namespace=namespace) as client:
            proc.send_signal(signal.SIGSTOP)  # dcoord pauses past its TTL; its command runs on
            successor = client.election("cli-loss").campaign("other", ttl=30, timeout=ttl + 10)
            assert successor is not None
            proc.send_signal(signal.SIGCONT)
            assert proc.wait(timeout=ttl + 20) == 123
            assert proc.stderr is not None
            assert "LockLost" in proc.stderr.read()
            with pytest.raises(ProcessLookupError):
                os.kill(child_pid, 0)  # killed (and reaped) despite ignoring SIGTERM
            # dcoord did not resign its successor's term.
            leader = client.election("cli-loss").leader()
            assert leader is not None and leader.term == successor.term
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_elect_timeout_exits_124(real_backend_url: str, namespace: str) -> None:
    import dcoord as lib

    with lib.connect(real_backend_url, namespace=namespace) as client:
        held = client.election("busy").campaign("holder", ttl=30)
        assert held is not None
        done = subprocess.run(
            [
                *dcoord(real_backend_url, namespace, "elect", "busy"),
                "--timeout",
                "0.5",
                "--",
                "true",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 124, done.stderr
        assert "LockTimeout" in done.stderr
        held.resign()


def test_elect_and_leader_refuse_bad_usage_and_run_nothing(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.unit.test_cli import main, memory_url, one_error_line

    monkeypatch.delenv("DCOORD_URL", raising=False)
    ran = "print('ran')"
    cases = [
        (["elect", "job", "--", sys.executable, "-c", ran], "--url"),
        (["leader", "job"], "--url"),
        (["elect", "job", "--url", memory_url(), sys.executable], "'--'"),
        (["elect", "job", "--url", memory_url(), "--ttl", "0", "--", "true"], "ttl"),
        (["elect", "job", "--url", memory_url(), "--grace", "-1", "--", "true"], "-1"),
        (["elect", "job", "--url", memory_url(), "--"], "no command"),
    ]
    for argv, named in cases:
        assert main(argv) == 2, argv
        out = capfd.readouterr()
        assert named in one_error_line(out.err, "ConfigError"), argv
        assert out.out == ""
    # Negative control: the same command with a backend runs, and gets the backend's URL,
    # never the caller's DCOORD_URL with its password.
    monkeypatch.setenv("DCOORD_URL", "redis://user:s3cr3t@127.0.0.1:1/0")
    url = memory_url()
    show = "import os; print(os.environ['DCOORD_URL'], os.environ['DCOORD_ELECTION'])"
    assert main(["elect", "job", "--url", url, "--", sys.executable, "-c", show]) == 0
    assert capfd.readouterr().out.split() == [url, "job"]


def test_leader_watch_prints_every_change(real_backend_url: str, namespace: str) -> None:
    import dcoord as lib

    candidate = DrivenChild(
        dcoord(real_backend_url, namespace, "leader", "watched", "--watch", "--json"), cwd=ROOT
    )
    proc = candidate.proc
    try:
        first = json.loads(candidate.line())
        assert first == {"election": "watched", "term": None, "value": None}
        with lib.connect(real_backend_url, namespace=namespace) as client:
            lead = client.election("watched").campaign("a", ttl=10)
            assert lead is not None
            assert json.loads(candidate.line()) == {
                "election": "watched",
                "term": lead.term,
                "value": "a",
            }
            lead.proclaim("b")
            assert json.loads(candidate.line())["value"] == "b"
            lead.resign()
            assert json.loads(candidate.line())["term"] is None
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            candidate.dump_stacks()
            pytest.fail("dcoord leader --watch did not stop within 20 s of SIGINT")
        assert code == 130
    finally:
        candidate.stop()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    candidate_main(sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4])
