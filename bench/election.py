"""Benchmark leader fail-over: dcoord on every backend, side by side with ``etcdctl elect``.

    python bench/election.py [--quick] [--rounds N] [--ttl S] [--etcdctl-kill]

Servers are started by this script (tests.servers) and stopped at the end.

* Fail-over after a crash: the leader process is SIGKILLed; measured until the waiting
  candidate's ``campaign()`` returns (it prints a line; timed by this process when the
  line arrives). The TTL bounds it from below; what matters is the overhead above the
  TTL. Memory runs candidates as threads (a "kill" stops the leader's renewals).
* Hand-off on resignation: the leader resigns (etcdctl: SIGINT, upon which it resigns)
  until the waiting candidate is elected. Same measurement for dcoord and etcdctl.
* ``--etcdctl-kill``: one crash fail-over of ``etcdctl elect`` too. etcdctl 3.4 has a
  fixed 60 s session TTL, so this takes a minute; its overhead above the TTL is compared.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dcoord  # noqa: E402
from dcoord.election import Leadership  # noqa: E402
from tests.faults.child import LineReader  # noqa: E402
from tests.servers import Server, start_server  # noqa: E402

NAME = "bench"
ETCDCTL_SESSION_TTL = 60.0  # etcdctl 3.4's concurrency session default, not settable


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# -- candidate processes ---------------------------------------------------------------


def candidate_main(url: str, namespace: str, ttl: float) -> None:
    """A candidate process: READY, campaign, ELECTED; 'resign' on stdin resigns."""
    with dcoord.connect(url, namespace=namespace) as client:
        print("READY", flush=True)
        leadership = client.election(NAME).campaign(str(os.getpid()), ttl=ttl)
        assert leadership is not None
        print(f"ELECTED {leadership.term}", flush=True)
        for line in sys.stdin:
            if line.strip() == "resign":
                leadership.resign()
                print("RESIGNED", flush=True)


class Proc:
    """A child process whose stdout lines a :class:`LineReader` reads."""

    def __init__(self, argv: list[str], stdin: int = subprocess.PIPE) -> None:
        self.proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.lines = LineReader(self.proc.stdout)

    def line(self, timeout: float = 120) -> str:
        line = self.lines.next(timeout)
        if line is None:
            raise RuntimeError(f"{self.proc.args!r} said nothing in {timeout} s")
        return line

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


def dcoord_candidate(url: str, namespace: str, ttl: float) -> Proc:
    proc = Proc([sys.executable, __file__, "--candidate", url, namespace, str(ttl)])
    if proc.line() != "READY":
        raise RuntimeError("candidate did not start")
    return proc


def etcdctl_candidate(endpoint: str, name: str, value: str) -> Proc:
    return Proc(
        ["etcdctl", f"--endpoints={endpoint}", "elect", name, value], stdin=subprocess.DEVNULL
    )


def settle() -> None:
    # Let the waiting candidate reach the server and queue before the leader goes (a
    # start-up pause, not a synchronisation: the measurement starts at the kill).
    time.sleep(0.5)


def process_rounds(url: str, ttl: float, rounds: int, *, kill: bool) -> list[float]:
    """Seconds from the leader's kill (or resign) to its successor's election."""
    namespace = f"bench{uuid.uuid4().hex[:6]}"
    times = []
    leader = dcoord_candidate(url, namespace, ttl)
    leader.line()  # ELECTED
    try:
        for _ in range(rounds):
            follower = dcoord_candidate(url, namespace, ttl)
            settle()
            started = time.monotonic()
            if kill:
                leader.proc.send_signal(signal.SIGKILL)
            else:
                leader.send("resign")
            line = follower.line()
            times.append(time.monotonic() - started)
            assert line.startswith("ELECTED"), line
            leader.stop()
            leader = follower
    finally:
        leader.stop()
    return times


def memory_rounds(ttl: float, rounds: int, *, kill: bool) -> list[float]:
    """The same with threads on memory://: a kill stops the leader client's renewals."""
    url = f"memory://bench-{uuid.uuid4().hex[:6]}"
    times = []
    leader_client = dcoord.connect(url)
    leader = leader_client.election(NAME).campaign("0", ttl=ttl)
    assert leader is not None
    try:
        for n in range(rounds):
            follower_client = dcoord.connect(url)
            elected: list[Leadership | None] = []
            done = threading.Event()

            def campaign(
                client: dcoord.Client,
                value: str,
                out: list[Leadership | None],
                ran: threading.Event,
            ) -> None:
                out.append(client.election(NAME).campaign(value, ttl=ttl))
                ran.set()

            thread = threading.Thread(
                target=campaign, args=(follower_client, str(n), elected, done)
            )
            thread.start()
            settle()
            started = time.monotonic()
            if kill:
                leader_client.scheduler.close()
            else:
                leader.resign()
            done.wait()
            times.append(time.monotonic() - started)
            thread.join()
            leader_client.close()
            leader_client, leader = follower_client, elected[0]
            assert leader is not None
    finally:
        leader_client.close()
    return times


def etcdctl_rounds(endpoint: str, rounds: int, *, kill: bool) -> list[float]:
    name = f"/bench-etcdctl-{uuid.uuid4().hex[:6]}"
    times = []
    leader = etcdctl_candidate(endpoint, name, "0")
    leader.line()  # etcdctl prints the leader key, then the value
    leader.line()
    try:
        for n in range(rounds):
            follower = etcdctl_candidate(endpoint, name, str(n + 1))
            settle()
            started = time.monotonic()
            leader.proc.send_signal(signal.SIGKILL if kill else signal.SIGINT)
            follower.line(timeout=ETCDCTL_SESSION_TTL + 60)
            times.append(time.monotonic() - started)
            follower.line()
            leader.stop()
            leader = follower
    finally:
        leader.proc.send_signal(signal.SIGINT)
        try:
            leader.proc.wait(timeout=10)
        finally:
            leader.stop()
    return times


def summary(label: str, times: list[float]) -> str:
    return (
        f"  {label:34s} p50 {percentile(times, 0.5) * 1000:8.1f} ms   "
        f"p99 {percentile(times, 0.99) * 1000:8.1f} ms   max {max(times) * 1000:8.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds (a smoke run)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds per measurement")
    parser.add_argument("--ttl", type=float, default=2.0, help="leader TTL (etcd: >= 2)")
    parser.add_argument(
        "--etcdctl-kill", action="store_true", help="also one etcdctl crash fail-over (~60 s)"
    )
    args = parser.parse_args()
    rounds = 3 if args.quick else args.rounds
    ttl = args.ttl
    print(
        f"dcoord {dcoord.__version__} election benchmark: Python {platform.python_version()}, "
        f"{os.cpu_count()} cores, {rounds} rounds, TTL {ttl:g} s"
    )
    servers: list[Server] = []
    try:
        redis_server = start_server("redis", persistent=False)
        servers.append(redis_server)
        etcd_server = start_server("etcd")
        servers.append(etcd_server)
        endpoint = f"127.0.0.1:{etcd_server.port}"

        print(f"\nFail-over after SIGKILL of the leader (TTL {ttl:g} s)")
        kill = {
            "memory": memory_rounds(ttl, rounds, kill=True),
            "redis": process_rounds(redis_server.url, ttl, rounds, kill=True),
            "etcd": process_rounds(etcd_server.url, ttl, rounds, kill=True),
        }
        for backend, times in kill.items():
            print(summary(f"dcoord {backend}", times))
        print(
            "  (the leader last renewed up to TTL/3 before its kill, so fail-over lies between "
            "2/3 TTL and TTL plus the detection overhead)"
        )
        if args.etcdctl_kill:
            times = etcdctl_rounds(endpoint, 1, kill=True)
            print(summary(f"etcdctl elect (TTL {ETCDCTL_SESSION_TTL:g} s)", times))
            print(
                f"  fail-over / TTL: dcoord etcd {percentile(kill['etcd'], 0.5) / ttl:.2f}, "
                f"etcdctl {percentile(times, 0.5) / ETCDCTL_SESSION_TTL:.2f}"
            )

        print("\nHand-off on resignation (leader resigns -> successor elected)")
        resign = {
            "memory": memory_rounds(ttl, rounds, kill=False),
            "redis": process_rounds(redis_server.url, ttl, rounds, kill=False),
            "etcd": process_rounds(etcd_server.url, ttl, rounds, kill=False),
        }
        for backend, times in resign.items():
            print(summary(f"dcoord {backend}", times))
        etcdctl = etcdctl_rounds(endpoint, rounds, kill=False)
        print(summary("etcdctl elect (SIGINT resigns)", etcdctl))
        print(
            "  p50 ratio dcoord etcd / etcdctl: "
            f"{percentile(resign['etcd'], 0.5) / percentile(etcdctl, 0.5):.2f}x; "
            f"dcoord redis / etcdctl: "
            f"{percentile(resign['redis'], 0.5) / percentile(etcdctl, 0.5):.2f}x"
        )
    finally:
        for server in servers:
            server.stop()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--candidate":
        candidate_main(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    else:
        main()
