"""Benchmark two-phase commit: commits/s, p50/p99 latency, and what each commit costs.

    python bench/twopc.py [--seconds S] [--quick]

Runs against the embedded backend and against Redis (the repository's redis.conf: AOF
with appendfsync always) and etcd, which this script starts (tests.servers) and stops.
Each transaction has 3 participants, each with 1 and 8 concurrent clients:

* ``null``: participants that do nothing, so the numbers are the coordinator's own
  cost: the log writes and the thread-pool rounds;
* ``kv``: three KVParticipants, each adding to one key (no conflicts between clients).

For every commit it counts, from the coordinator's calls into the backend, the log
writes and backend round trips on the critical path (before ``commit()`` returns) and
off it (the ``done`` marker, written in the background). The protocol needs exactly:
record + decision on the log, one prepare round and one commit round.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time
import uuid
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dcoord
from dcoord.participants import KVParticipant
from tests.servers import start_server

PARTICIPANTS = ("p1", "p2", "p3")


class NullParticipant:
    """Votes yes and does nothing: isolates the coordinator's cost."""

    def __init__(self, name: str) -> None:
        self.name = name

    def prepare(self, txid: str, payload: Any) -> bool:
        return True

    def commit(self, txid: str) -> None:
        pass

    def abort(self, txid: str) -> None:
        pass


class Counting:
    """Wraps a backend store and counts its calls (each is one backend round trip),
    split into 'critical' (made while a commit() runs) and 'background' (after it returned;
    the counting runs pause between commits so the two cannot overlap)."""

    def __init__(self, inner: Any, label: str, tally: Tally) -> None:
        self._inner = inner
        self._label = label
        self._tally = tally

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr) or name.startswith("_"):
            return attr
        tally, label = self._tally, f"{self._label}.{name}"

        def counted(*args: Any, **kwargs: Any) -> Any:
            result = attr(*args, **kwargs)
            tally.add(label)
            if label == "locks.slot":  # a lock handle's acquire/release are round trips too
                return Counting(result, "lock", tally)
            return result

        return counted


class Tally:
    """Counts per phase: calls made while some commit() is running are 'critical'."""

    def __init__(self) -> None:
        self.critical: Counter[str] = Counter()
        self.background: Counter[str] = Counter()
        self.active = 0
        self.mutex = threading.Lock()

    def add(self, label: str) -> None:
        with self.mutex:
            (self.critical if self.active else self.background)[label] += 1


def instrument(client: dcoord.Client, tally: Tally) -> None:
    backend: Any = client.backend
    backend.txlog = Counting(backend.txlog, "log", tally)
    backend.kv = Counting(backend.kv, "kv", tally)
    backend.locks = Counting(backend.locks, "locks", tally)


def measure(url: str, kind: str, clients: int, seconds: float, count: bool) -> dict[str, Any]:
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    with dcoord.connect(url, namespace=namespace) as client:
        tally = Tally()
        if count:
            instrument(client, tally)
        parts: list[Any] = (
            [KVParticipant(client, n) for n in PARTICIPANTS]
            if kind == "kv"
            else [NullParticipant(n) for n in PARTICIPANTS]
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dcoord.DurabilityWarning)
            coord = client.coordinator(participants=parts)
        latencies: list[float] = []
        mutex = threading.Lock()
        stop = time.monotonic() + seconds

        def work(worker: int) -> None:
            mine: list[float] = []
            while time.monotonic() < stop:
                tx = coord.begin(timeout=30)
                for name in PARTICIPANTS:
                    tx.enlist(name, {"add": {f"c{worker}": 1}} if kind == "kv" else None)
                started = time.perf_counter()
                if count:
                    with tally.mutex:
                        tally.active += 1
                try:
                    tx.commit()
                finally:
                    if count:
                        with tally.mutex:
                            tally.active -= 1
                mine.append(time.perf_counter() - started)
                if count:
                    time.sleep(0.02)  # let this commit's background write land outside
            with mutex:
                latencies.extend(mine)

        began = time.monotonic()
        threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - began
        coord.close()  # let the background "done" writes land before counting them
    latencies.sort()
    n = len(latencies)
    return {
        "commits": n,
        "rate": n / elapsed,
        "p50": latencies[n // 2] * 1000,
        "p99": latencies[min(n - 1, int(n * 0.99))] * 1000,
        "critical": {k: v / n for k, v in tally.critical.items()},
        "background": {k: v / n for k, v in tally.background.items()},
    }


# Calls that send nothing to the server (a lock handle's slot is created locally) or
# happen once per coordinator, not per commit.
NOT_ROUND_TRIPS = ("locks.slot", "locks.close", "log.durability")


def describe(counts: dict[str, float]) -> str:
    counts = {k: v for k, v in counts.items() if k not in NOT_ROUND_TRIPS}
    log = sum(
        v for k, v in counts.items() if k.startswith("log.") and k not in ("log.get", "log.now")
    )
    trips = sum(counts.values())
    detail = ", ".join(f"{k} {v:.1f}" for k, v in sorted(counts.items()))
    return f"log writes {log:.1f}, round trips {trips:.1f} ({detail})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--quick", action="store_true", help="0.5 s per measurement")
    args = parser.parse_args()
    seconds = 0.5 if args.quick else args.seconds
    print(
        f"2PC benchmark: {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{seconds:g} s per row"
    )
    redis_server = start_server("redis", persistent=True)  # appendfsync always
    etcd_server = start_server("etcd")
    try:
        urls = {
            "memory": f"memory://bench-{uuid.uuid4().hex[:6]}",
            "redis": redis_server.url,
            "etcd": etcd_server.url,
        }
        head = f"{'backend':<8} {'parts':<5} {'clients':>7} {'commits/s':>10}"
        print(f"{head} {'p50 ms':>8} {'p99 ms':>8}")
        for backend, url in urls.items():
            for kind in ("null", "kv"):
                for clients in (1, 8):
                    r = measure(url, kind, clients, seconds, count=False)
                    print(
                        f"{backend:<8} {kind:<5} {clients:>7} {r['rate']:>10.0f} "
                        f"{r['p50']:>8.2f} {r['p99']:>8.2f}"
                    )
        print("\nper commit, 1 client (counted on the redis run; same on every backend):")
        for kind in ("null", "kv"):
            r = measure(urls["redis"], kind, 1, min(seconds, 1.0), count=True)
            print(f"  {kind}: critical path: {describe(r['critical'])}")
            print(f"  {kind}: background:    {describe(r['background'])}")
    finally:
        redis_server.stop()
        etcd_server.stop()


if __name__ == "__main__":
    main()
