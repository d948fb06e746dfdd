"""Benchmark two-phase commit: commits/s, p50/p99 latency, and what each commit costs.

    python bench/twopc.py [--seconds S] [--quick] [--repeat N] [--against DIR] [--json PATH]
    python bench/twopc.py --slices N [--seconds S] [--json PATH]

Runs against the embedded backend and against Redis (the repository's redis.conf: AOF
with appendfsync always) and etcd, which this script starts (tests.servers) and stops.
Each transaction has 3 participants, each with 1 and 8 concurrent clients:

* ``null``: participants that do nothing, so the numbers are the coordinator's own
  cost: the log writes and whatever it spends on asking participants;
* ``slow``: participants that sleep 5 ms in prepare and in commit, where asking them in
  parallel pays; ``slow-serial`` is the same with every participant asked inline, one
  after the other (this tree only: it shows what the pools are worth);
* ``kv``: three KVParticipants, each adding to one key (no conflicts between clients).

On Redis it also measures the floor those numbers are held to, on the same server in
the same run: ``floor`` clients make two ``SET`` of a record-sized value per
"transaction", each its own round trip and each forced to disk (``appendfsync always``),
as the coordinator's two forced log writes are. With 8 clients the floor gains from
Redis's group commit (writes that arrive in one event-loop iteration share one fsync),
and so may the coordinator. The ``null`` rows are printed as ratios to that floor.
On the embedded backend the ``null`` rows come with a reference for 8 clients against
1: threads doing plain Python work (``python``), which lose to the GIL's hand-offs what
the coordinator loses to them.
``--slices N`` measures only that: N pairs of short slices (``--seconds``) of null
participants and floor in one process, seconds apart, which a loaded machine's swings
in fsync latency disturb less than rows in fresh processes.

``--against DIR`` measures every row also with the dcoord package found in DIR (e.g. a
tree made by ``git archive main | tar -x -C DIR``), interleaved with this tree's, each
row in a fresh process, and prints the ratio. The machine's load moves single numbers
by 20 % or more: compare the ratios, over ``--repeat`` runs.

Every measurement also records the client's CPU per commit (``cpu_us``: every thread
of the measuring process, the coordinator's done writer included, not the server's),
printed for the Redis null rows beside the floor's: what the coordinator itself can
change, and far steadier than the rates on a loaded machine.

For every commit it counts, from the coordinator's calls into the backend, the log
writes and backend round trips on the critical path (before ``commit()`` returns) and
off it (the ``done`` marker, written in the background). The protocol needs exactly:
record + decision on the log, one prepare round and one commit round.

``--json PATH`` also writes every measurement (each run, not only the medians) to PATH,
for ``bench/plot.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

# A child measuring a reference tree imports that tree's dcoord (tests.servers is ours).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, os.environ.get("DCOORD_BENCH_CODE", sys.path[0]))

import redis

import dcoord
from dcoord import txlog
from dcoord.participants import KVParticipant
from tests.servers import start_server

ROOT = Path(__file__).resolve().parents[1]
PARTICIPANTS = ("p1", "p2", "p3")
KINDS = ("null", "slow", "slow-serial", "kv")
SLOW = 0.005


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


class SleepingParticipant(NullParticipant):
    """Takes 5 ms to prepare and to commit, like a remote resource manager."""

    def prepare(self, txid: str, payload: Any) -> bool:
        time.sleep(SLOW)
        return True

    def commit(self, txid: str) -> None:
        time.sleep(SLOW)


class AlwaysInline:
    """Stands in for the coordinator's record of participant speed: everyone is fast."""

    def fast(self, phase: str, name: str) -> bool:
        return True

    def took(self, phase: str, name: str, seconds: float) -> None:
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


def floor(url: str, clients: int, seconds: float) -> dict[str, Any]:
    """The raw floor: ``clients`` threads, each making two fsynced ``SET`` of a value the
    size of a started record per "transaction", one round trip each."""
    record = txlog.new_record(
        uuid.uuid4().hex, dict.fromkeys(PARTICIPANTS), now=time.time(), timeout=30.0
    )
    value = txlog.encode(record)
    server = redis.Redis.from_url(url)  # its pool gives each thread its own connection
    latencies: list[float] = []
    mutex = threading.Lock()
    stop = time.monotonic() + seconds

    def work(worker: int) -> None:
        mine: list[float] = []
        n = 0
        while time.monotonic() < stop:
            started = time.perf_counter()
            server.set(f"bench-floor:{worker}:{n}:record", value)
            server.set(f"bench-floor:{worker}:{n}:decision", value)
            mine.append(time.perf_counter() - started)
            n += 1
        with mutex:
            latencies.extend(mine)

    began, cpu = time.monotonic(), time.process_time()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    server.close()
    return summary(latencies, elapsed, Tally(), time.process_time() - cpu)


def python_loop(clients: int, seconds: float) -> dict[str, Any]:
    """The reference for 8 clients against 1 on the embedded backend: ``clients``
    threads doing only plain Python work (encoding and digesting a record-sized dict, as
    a commit does), no lock, no I/O. Under one GIL, what 8 threads lose to hand-offs
    here the coordinator cannot win back."""
    record = {"txid": uuid.uuid4().hex, "participants": list(PARTICIPANTS), "acks": []}
    latencies: list[float] = []
    mutex = threading.Lock()
    stop = time.monotonic() + seconds

    def work() -> None:
        mine: list[float] = []
        while time.monotonic() < stop:
            started = time.perf_counter()
            for _ in range(20):  # about a commit's worth of CPU on the embedded backend
                hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
            mine.append(time.perf_counter() - started)
        with mutex:
            latencies.extend(mine)

    began, cpu = time.monotonic(), time.process_time()
    threads = [threading.Thread(target=work) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    return summary(latencies, elapsed, Tally(), time.process_time() - cpu)


def summary(latencies: list[float], elapsed: float, tally: Tally, cpu: float) -> dict[str, Any]:
    """Rate, p50/p99 (ms), client CPU (us, every thread of the process: ``cpu`` seconds)
    and the counted calls per transaction of one measurement."""
    latencies.sort()
    n = len(latencies)
    return {
        "commits": n,
        "rate": n / elapsed,
        "cpu_us": cpu / max(n, 1) * 1e6,
        "p50": latencies[n // 2] * 1000,
        "p99": latencies[min(n - 1, int(n * 0.99))] * 1000,
        "critical": {k: v / n for k, v in tally.critical.items()},
        "background": {k: v / n for k, v in tally.background.items()},
    }


def measure(url: str, kind: str, clients: int, seconds: float, count: bool) -> dict[str, Any]:
    if kind == "floor":
        return floor(url, clients, seconds)
    if kind == "python":
        return python_loop(clients, seconds)
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    with dcoord.connect(url, namespace=namespace) as client:
        tally = Tally()
        if count:
            instrument(client, tally)
        parts: list[Any]
        if kind == "kv":
            parts = [KVParticipant(client, n) for n in PARTICIPANTS]
        elif kind.startswith("slow"):
            parts = [SleepingParticipant(n) for n in PARTICIPANTS]
        else:
            parts = [NullParticipant(n) for n in PARTICIPANTS]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dcoord.DurabilityWarning)
            coord = client.coordinator(participants=parts)
        if kind == "slow-serial":
            coord._pace = AlwaysInline()  # type: ignore[attr-defined]
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
                    # Let this commit's background write land outside (the done
                    # writes wait DONE_LINGER to be batched, then take a round trip).
                    time.sleep(0.05)
            with mutex:
                latencies.extend(mine)

        began, cpu = time.monotonic(), time.process_time()
        threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - began
        coord.close()  # let the background "done" writes land before counting them
        cpu = time.process_time() - cpu  # theirs included: the client makes them too
    return summary(latencies, elapsed, tally, cpu)


# Calls that send nothing to the server (a lock handle's slot is created locally; the
# shared clock is read from the server once per 5 s, not per call) or happen once per
# coordinator, not per commit.
NOT_ROUND_TRIPS = ("locks.slot", "locks.close", "log.durability", "log.now")


def describe(counts: dict[str, float]) -> str:
    counts = {k: v for k, v in counts.items() if k not in NOT_ROUND_TRIPS}
    log = sum(v for k, v in counts.items() if k.startswith("log.") and k != "log.get")
    trips = sum(counts.values())
    detail = ", ".join(f"{k} {v:.1f}" for k, v in sorted(counts.items()))
    return f"log writes {log:.1f}, round trips {trips:.1f} ({detail})"


def child_row(code: Path, url: str, kind: str, clients: int, seconds: float, count: bool) -> Any:
    """One measurement in a fresh process importing the dcoord of ``code``."""
    argv = [sys.executable, __file__, "--row", json.dumps([url, kind, clients, seconds, count])]
    env = {**os.environ, "DCOORD_BENCH_CODE": str(code)}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def slices(count: int, seconds: float) -> list[dict[str, Any]]:
    """Redis null participants against the floor, 1 and 8 clients, in ``count`` pairs of
    slices of ``seconds`` in this process, alternating which goes first: the pairs are
    seconds apart, so a loaded machine's swings (fsync latency moving fivefold from one
    second to the next) hit both sides of a ratio alike."""
    server = start_server("redis", persistent=True)  # appendfsync always
    rows: list[dict[str, Any]] = []
    try:
        for clients in (1, 8):
            runs: dict[str, list[Any]] = {"this": [], "floor": []}
            for i in range(count):
                for name in ("this", "floor") if i % 2 == 0 else ("floor", "this"):
                    kind = "null" if name == "this" else "floor"
                    runs[name].append(measure(server.url, kind, clients, seconds, False))
            pairs = ratios(runs["this"], runs["floor"])
            low, _, high = statistics.quantiles(pairs, n=4)
            this = statistics.median(r["rate"] for r in runs["this"])
            raw = statistics.median(r["rate"] for r in runs["floor"])
            cpu = {k: statistics.median(r["cpu_us"] for r in v) for k, v in runs.items()}
            print(
                f"redis null, {clients} client(s): this {this:.0f} c/s, floor {raw:.0f} tx/s; "
                f"this/floor median {statistics.median(pairs):.2f}, quartiles {low:.2f}-"
                f"{high:.2f}, min-max {min(pairs):.2f}-{max(pairs):.2f}; client CPU per "
                f"commit {cpu['this']:.0f} us, per floor transaction {cpu['floor']:.0f} us",
                flush=True,
            )
            rows.extend(
                {"backend": "redis", "kind": "null", "clients": clients, "code": name,
                 "runs": runs[name]}
                for name in runs
            )  # fmt: skip
    finally:
        server.stop()
    return rows


def ratios(these: list[Any], others: list[Any]) -> list[float]:
    """Rate ratios of paired runs (measured one after the other, under the same load)."""
    return [t["rate"] / o["rate"] for t, o in zip(these, others, strict=True)]


def median_rate(runs: list[Any]) -> float:
    return statistics.median(r["rate"] for r in runs)


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--quick", action="store_true", help="0.5 s per measurement")
    parser.add_argument("--repeat", type=int, default=1, help="runs of every row")
    parser.add_argument("--against", type=Path, help="a tree whose dcoord is the reference")
    parser.add_argument("--backends", default="memory,redis,etcd")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    parser.add_argument(
        "--slices", type=int, help="only Redis null vs the floor, N short slices in one process"
    )
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: one child measurement
    args = parser.parse_args()
    if args.row:
        url, kind, clients, seconds, count = json.loads(args.row)
        print(json.dumps(measure(url, kind, clients, seconds, count)))
        return
    seconds = 0.5 if args.quick else args.seconds
    codes = {"this": ROOT} if args.against is None else {"this": ROOT, "ref": args.against}
    print(
        f"2PC benchmark: {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{seconds:g} s per row, {args.repeat} run(s); "
        + ", ".join(f"{k} = {v}" for k, v in codes.items())
    )
    rows: list[dict[str, Any]] = []
    if args.slices:
        rows = slices(args.slices, seconds)
        if args.json is not None:
            meta = {"slices": args.slices, "seconds": seconds, "load": os.getloadavg()}
            args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        return
    redis_server = start_server("redis", persistent=True)  # appendfsync always
    etcd_server = start_server("etcd")
    try:
        urls = {
            "memory": f"memory://bench-{uuid.uuid4().hex[:6]}",
            "redis": redis_server.url,
            "etcd": etcd_server.url,
        }
        cols = "".join(f" {k + ' c/s':>10} {k + ' p50':>9}" for k in codes)
        ratio = "  this/ref c/s: median (min-max)" if len(codes) > 1 else ""
        print(f"{'backend':<8} {'parts':<11} {'clients':>7}{cols}{ratio}")
        single: dict[int, dict[str, list[Any]]] = {}  # memory null runs by clients
        for backend in args.backends.split(","):
            for kind in args.kinds.split(","):
                for clients in (1, 8):
                    runs: dict[str, list[Any]] = {k: [] for k in codes}
                    with_floor = backend == "redis" and kind == "null"
                    if with_floor:
                        runs["floor"] = []
                    with_python = backend == "memory" and kind == "null"
                    if with_python:
                        runs["python"] = []
                    for _ in range(args.repeat):
                        for name, code in codes.items():
                            if kind == "slow-serial" and name != "this":
                                continue  # the reference has no inline asking to force
                            runs[name].append(
                                child_row(code, urls[backend], kind, clients, seconds, False)
                            )
                        if with_floor:  # interleaved: the same moment's load and disk
                            runs["floor"].append(
                                child_row(ROOT, urls[backend], "floor", clients, seconds, False)
                            )
                        if with_python:
                            runs["python"].append(
                                child_row(ROOT, urls[backend], "python", clients, seconds, False)
                            )
                    rows.extend(
                        {"backend": backend, "kind": kind, "clients": clients, "code": name,
                         "runs": runs[name]}
                        for name in runs
                    )  # fmt: skip
                    line = f"{backend:<8} {kind:<11} {clients:>7}"
                    for name in codes:
                        rates = [r["rate"] for r in runs[name]]
                        p50s = [r["p50"] for r in runs[name]]
                        if not rates:
                            line += f" {'-':>10} {'-':>9}"
                            continue
                        line += (
                            f" {statistics.median(rates):>10.0f} {statistics.median(p50s):>9.2f}"
                        )
                    if len(codes) > 1 and runs.get("ref"):
                        line += f"  {spread(ratios(runs['this'], runs['ref']))}"
                    print(line, flush=True)
                    if with_floor:
                        rates = [r["rate"] for r in runs["floor"]]
                        p50s = [r["p50"] for r in runs["floor"]]
                        against = ", ".join(
                            f"{name}/floor {spread(ratios(runs[name], runs['floor']))}"
                            for name in codes
                        )
                        cpu = ", ".join(
                            f"{name} {statistics.median(r['cpu_us'] for r in runs[name]):.0f}"
                            for name in runs
                        )
                        print(
                            f"{backend:<8} {'floor':<11} {clients:>7} "
                            f"{statistics.median(rates):>10.0f} {statistics.median(p50s):>9.2f}"
                            f"  c/s: {against}; client CPU us per commit: {cpu}",
                            flush=True,
                        )
                    if with_python:
                        print(
                            f"{backend:<8} {'python':<11} {clients:>7} "
                            f"{statistics.median(r['rate'] for r in runs['python']):>10.0f}"
                            f" {statistics.median(r['p50'] for r in runs['python']):>9.2f}"
                            "  (plain Python work per thread: the GIL's reference)",
                            flush=True,
                        )
                        single[clients] = runs
                        if clients == 8:  # 8 clients against 1, medians of the repeats
                            scaling = ", ".join(
                                f"{name} {median_rate(at8) / median_rate(single[1][name]):.2f}"
                                for name, at8 in runs.items()
                            )
                            print(f"{backend:<8} 8 clients / 1 client, c/s: {scaling}", flush=True)
        print("\nper commit, 1 client, counted on the redis run (same on every backend):")
        for name, code in codes.items():
            for kind in [k for k in ("null", "kv") if k in args.kinds.split(",")]:
                r = child_row(code, urls["redis"], kind, 1, min(seconds, 1.0), True)
                print(f"  {name} {kind}: critical path: {describe(r['critical'])}")
                print(f"  {name} {kind}: background:    {describe(r['background'])}")
                rows.append({"backend": "redis", "kind": kind, "clients": 1, "code": name,
                             "counted": r})  # fmt: skip
        if args.json is not None:
            meta = {"cores": os.cpu_count(), "python": platform.python_version(),
                    "seconds": seconds, "repeat": args.repeat,
                    "load": os.getloadavg(), "argv": sys.argv[1:]}  # fmt: skip
            args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    finally:
        redis_server.stop()
        etcd_server.stop()


if __name__ == "__main__":
    main()
