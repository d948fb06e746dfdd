"""Benchmark dcoord locks against the libraries users would pick instead.

    python bench/locks.py [--quick] [--seconds S] [--contended-seconds S] [--persistent]
                          [--only uncontended|contended|breakdown]

Everything runs in one go against servers this script starts (tests.servers) and stops:

* Redis, uncontended acquire+release cycles/s: dcoord (fencing on, auto-renewal on) vs
  redis-py ``Lock``, the raw floor of two round trips (``SET NX PX`` + ``DEL``),
  pottery ``Redlock`` (one master) and python-redis-lock.
* Redis, contended: 4 processes on one lock, 1 ms critical section: grants/s, p50/p99
  wait, grants per process, dcoord (default and ``fair=True``) vs redis-py ``Lock`` with
  its defaults; the same for dcoord on etcd (whose locks are FIFO). Hand-off: from a
  ``release()`` call to the next grant's ``acquire()`` return, in any process (back to
  back, what passing the lock on costs; with other work between grants it also counts
  moments when nobody waited).
* etcd, uncontended cycles/s: dcoord vs pyetcd's own ``Lock`` and the raw floor
  (put + delete).
* Where a Redis cycle's microseconds go (``--only breakdown``): client CPU (this
  thread's), server CPU (``INFO commandstats``) and wall time per cycle, layer by layer:
  raw commands, the two lock scripts called directly, the backend's slot, the full Lock.
* Hand-off latency: from ``release()`` returning in one client to ``acquire()``
  returning in a waiting client (threads of one process, so one clock).
* Waiter set-up: one shared pub/sub connection per client vs a connection per waiter.
* Metrics cost: uncontended cycles/s with dcoord's metrics off (no OpenTelemetry API, or
  disabled), with the API but no provider set (the default), and on (SDK provider with
  an in-memory reader). ``--metrics`` runs only this part.

By default Redis keeps nothing on disk, so the numbers are the libraries' cost, not the
disk's; ``--persistent`` uses the repository's redis.conf (AOF, appendfsync always).
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import platform
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyetcd
import redis

import dcoord
from dcoord import metrics
from tests.servers import Server, start_server

CRITICAL_SECTION = 0.001
WORKERS = 4
# Back to back (the releaser asks again at once), and with other work between grants,
# as processes that need a shared resource now and then do.
THINK_TIMES = (0.0, 0.005)


def rates(
    cycles: dict[str, Callable[[], object]],
    seconds: float,
    rounds: int = 5,
    *,
    warmup: int = 20,
    before: Callable[[str], object] | None = None,
) -> dict[str, float]:
    """Cycles per second of each candidate, run back to back for about ``seconds`` each.

    The candidates take turns in ``rounds`` slices, so a burst of load from elsewhere on
    the machine hits them all alike instead of whichever happened to run then. Each
    candidate first runs ``warmup`` cycles; ``before(name)`` runs before each slice.
    """
    for cycle in cycles.values():
        for _ in range(warmup):  # warm up connections and script caches
            cycle()
    counts = dict.fromkeys(cycles, 0)
    spent = dict.fromkeys(cycles, 0.0)
    for _ in range(rounds):
        for name, cycle in cycles.items():
            if before is not None:
                before(name)
            started = time.perf_counter()
            deadline = started + seconds / rounds
            while True:
                for _ in range(10):
                    cycle()
                counts[name] += 10
                now = time.perf_counter()
                if now >= deadline:
                    break
            spent[name] += now - started
    return {name: counts[name] / spent[name] for name in cycles}


def cycle_of(lock: Any) -> Callable[[], None]:
    def cycle() -> None:
        lock.acquire()
        lock.release()

    return cycle


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# -- uncontended -----------------------------------------------------------------------


def redis_uncontended(url: str, port: int, seconds: float) -> dict[str, float]:
    import redis_lock
    from pottery import Redlock

    r = redis.Redis(host="127.0.0.1", port=port)

    def raw_cycle() -> None:
        r.set("bench:raw", "token", nx=True, px=30_000)
        r.delete("bench:raw")

    with dcoord.connect(url, namespace=f"bench{uuid.uuid4().hex[:6]}") as client:
        results = rates(
            {
                "dcoord Lock (fenced, auto-renew)": cycle_of(client.lock("a")),
                "dcoord Lock (fenced, no auto-renew)": cycle_of(client.lock("b", auto_renew=False)),
                "dcoord Lock fair=True (fenced, auto-renew)": cycle_of(client.lock("c", fair=True)),
                "raw SET NX PX + DEL (floor)": raw_cycle,
                "redis-py Lock": cycle_of(r.lock("bench:redis-py", timeout=30)),
                "pottery Redlock (1 master)": cycle_of(
                    Redlock(key="bench:pottery", masters={r}, auto_release_time=30)
                ),
                "python-redis-lock": cycle_of(
                    redis_lock.Lock(r, "bench:python-redis-lock", expire=30)
                ),
            },
            seconds,
        )
    r.close()
    return results


def etcd_uncontended(url: str, port: int, seconds: float) -> dict[str, float]:
    etcd = pyetcd.client(host="127.0.0.1", port=port)

    def raw_cycle() -> None:
        etcd.put("/bench/raw", "token")
        etcd.delete("/bench/raw")

    with dcoord.connect(url, namespace=f"bench{uuid.uuid4().hex[:6]}") as client:
        results = rates(
            {
                "dcoord Lock (fenced, shared lease)": cycle_of(client.lock("a")),
                "dcoord Lock (no auto-renew: own lease)": cycle_of(
                    client.lock("b", auto_renew=False)
                ),
                "raw put + delete (floor)": raw_cycle,
                "pyetcd Lock": cycle_of(etcd.lock("bench-pyetcd", ttl=30)),
            },
            seconds,
        )
    etcd.close()
    return results


def redis_breakdown(url: str, port: int, cycles: int = 2000, rounds: int = 3) -> None:
    """Print client CPU, server CPU and wall time per cycle of each layer (medians)."""
    from dcoord.backends.redis.locks import ACQUIRE, RELEASE, lock_keys

    r = redis.Redis(host="127.0.0.1", port=port)
    admin = redis.Redis(host="127.0.0.1", port=port)
    with dcoord.connect(url, namespace=f"bench{uuid.uuid4().hex[:6]}") as client:
        lock, fair = client.lock("a"), client.lock("f", fair=True)
        slot = client.backend.locks.slot("b", 30.0, True)
        key, fence, channel = lock_keys(client.backend.prefix, "c")  # type: ignore[attr-defined]
        redis_py = r.lock("bench:redis-py", timeout=30)
        candidates: dict[str, Callable[[], object]] = {
            "raw SET NX PX + DEL": lambda: (r.set("raw", "t", nx=True, px=30_000), r.delete("raw")),
            "redis-py Lock": cycle_of(redis_py),
            "acquire.lua + release.lua, called directly": lambda: (
                ACQUIRE(r, [key, fence], ["token", 30_000, 0]),
                RELEASE(r, [key], ["token", channel]),
            ),
            "dcoord backend slot": lambda: (slot.acquire(None), slot.release()),
            "dcoord Lock (fenced, auto-renew)": cycle_of(lock),
            "dcoord Lock fair=True": cycle_of(fair),
        }
        rows: dict[str, list[tuple[float, float, float]]] = {name: [] for name in candidates}
        for _ in range(rounds):
            for name, cycle in candidates.items():
                for _ in range(100):
                    cycle()
                admin.config_resetstat()
                cpu, wall = time.thread_time(), time.perf_counter()
                for _ in range(cycles):
                    cycle()
                cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
                stats = admin.info("commandstats")
                server = sum(
                    v["usec"] for k, v in stats.items() if not k.endswith(("config", "info"))
                )
                rows[name].append((cpu * 1e6 / cycles, server / cycles, wall * 1e6 / cycles))
    r.close()
    admin.close()
    print(f"\nRedis, where a cycle's time goes (us per acquire+release, median of {rounds})")
    print(f"  {'':44s} {'client CPU':>10s} {'server CPU':>10s} {'wall':>8s}")
    for name, measured in rows.items():
        cpu, server, wall = (statistics.median(m[i] for m in measured) for i in range(3))
        print(f"  {name:44s} {cpu:10.1f} {server:10.1f} {wall:8.1f}")


# -- contended -------------------------------------------------------------------------


def contended_worker(
    kind: str, url: str, port: int, seconds: float, think: float, barrier: Any, out: Any
) -> None:
    """One process: acquire, 1 ms critical section, release, ``think`` s of other work.
    Puts its waits and, per grant, when acquire() returned and release() was called
    (CLOCK_MONOTONIC: one clock for every process of the machine)."""
    waits: list[float] = []
    grants: list[tuple[float, float]] = []
    if kind.startswith("dcoord"):
        client = dcoord.connect(url, namespace="bench-contended")
        lock: Any = client.lock("contended", ttl=10, fair=kind.endswith("fair"))
    else:
        r = redis.Redis(host="127.0.0.1", port=port)
        lock = r.lock("bench:contended", timeout=10)  # redis-py's defaults: sleep=0.1
    barrier.wait(timeout=120)  # every process connected before the clock starts
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        asked = time.perf_counter()
        lock.acquire()
        acquired = time.monotonic()
        waits.append(time.perf_counter() - asked)
        time.sleep(CRITICAL_SECTION)
        grants.append((acquired, time.monotonic()))
        lock.release()
        if think:
            time.sleep(think)
    if kind.startswith("dcoord"):
        client.close()
    out.put((waits, grants))


def contended(kind: str, url: str, port: int, seconds: float, think: float) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(WORKERS), ctx.Queue()
    procs = [
        ctx.Process(target=contended_worker, args=(kind, url, port, seconds, think, barrier, out))
        for _ in range(WORKERS)
    ]
    for proc in procs:
        proc.start()
    try:
        results = [out.get(timeout=seconds + 180) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    waits = [w for per, _ in results for w in per]
    grants = sorted(len(per) for per, _ in results)
    # Hand-off: from one grant's release() call to the next grant's acquire() return,
    # whichever processes they were in.
    timeline = sorted(grant for _, per in results for grant in per)
    handoffs = [
        acquired - released for (_, released), (acquired, _) in itertools.pairwise(timeline)
    ]
    return {
        "max/min": grants[-1] / max(1, grants[0]),
        "grants/s": len(waits) / seconds,
        "p50 wait ms": percentile(waits, 0.5) * 1000,
        "p99 wait ms": percentile(waits, 0.99) * 1000,
        "p50 hand-off ms": percentile(handoffs, 0.5) * 1000,
        "p99 hand-off ms": percentile(handoffs, 0.99) * 1000,
        "grants per process": grants,
    }


# -- hand-off latency ------------------------------------------------------------------


def handoff(url: str, rounds: int) -> list[float]:
    """Seconds from release() returning in one client to acquire() returning in another."""
    namespace = f"bench{uuid.uuid4().hex[:6]}"
    latencies = []
    with (
        dcoord.connect(url, namespace=namespace) as a,
        dcoord.connect(url, namespace=namespace) as b,
    ):
        holder, waiter = a.lock("handoff", ttl=30), b.lock("handoff", ttl=30)
        got: list[float] = []

        def wait() -> None:
            waiter.acquire()
            got.append(time.perf_counter())

        for _ in range(rounds):
            holder.acquire()
            got.clear()
            thread = threading.Thread(target=wait)
            thread.start()
            time.sleep(0.05)  # let the waiter block (its notification, not this, wakes it)
            released = time.perf_counter()
            holder.release()
            thread.join(timeout=30)
            latencies.append(got[0] - released)
            waiter.release()
    return latencies


def waiter_setup(port: int, url: str, rounds: int) -> dict[str, float]:
    """Milliseconds to be ready for a release message: own connection vs shared hub."""
    r = redis.Redis(host="127.0.0.1", port=port)
    per_waiter = []
    for i in range(rounds):
        started = time.perf_counter()
        pubsub = r.pubsub()
        pubsub.subscribe(f"bench:setup:{i}")
        while pubsub.get_message(timeout=1.0) is None:
            pass
        per_waiter.append(time.perf_counter() - started)
        pubsub.close()
    r.close()
    shared = []
    with dcoord.connect(url) as client:
        notifier = client.backend.locks.notifier  # type: ignore[attr-defined]
        for i in range(rounds):
            started = time.perf_counter()
            with notifier.interest(f"bench:setup:shared:{i}") as channel:
                notifier.wait(channel, 0, 1.0)  # the confirmation bumps the generation
            shared.append(time.perf_counter() - started)
    return {
        "own pub/sub connection per waiter": statistics.median(per_waiter) * 1000,
        "shared connection (new channel)": statistics.median(shared) * 1000,
    }


# -- metrics cost ----------------------------------------------------------------------


def metrics_cost(url: str, seconds: float, rounds: int = 5) -> dict[str, float]:
    """Cycles/s of one lock with metrics off, with the API and no provider, and on.

    The modes take turns in ``rounds`` slices of :func:`rates`; switching the mode
    is a global setting, so each slice runs one mode alone.
    """
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    modes: dict[str, dict[str, Any]] = {
        "metrics off (no API, or disabled)": {"enabled": False},
        "API, no provider set (default)": {},
        "on: SDK + in-memory reader": {"meter_provider": provider},
    }
    with dcoord.connect(url, namespace=f"bench{uuid.uuid4().hex[:6]}") as client:
        cycle = cycle_of(client.lock("metrics"))
        for _ in range(200):
            cycle()
        try:
            return rates(
                dict.fromkeys(modes, cycle),
                seconds,
                rounds,
                warmup=0,
                before=lambda name: metrics.configure(**modes[name]),
            )
        finally:
            metrics.configure()
            provider.shutdown()


def metrics_table(name: str, results: dict[str, float]) -> None:
    off = next(iter(results.values()))
    print(f"  {name}")
    for mode, rate in results.items():
        extra = (1 / rate - 1 / off) * 1e6
        print(f"    {mode:38s} {rate:9.0f} cycles/s   {extra:+6.2f} us/cycle vs off")


# -- report ----------------------------------------------------------------------------


def table(title: str, results: dict[str, float], base: str, unit: str = "cycles/s") -> None:
    print(f"\n{title}")
    for name, value in results.items():
        print(f"  {name:42s} {value:10.0f} {unit}   x{results[base] / value:5.2f} (dcoord / this)")


def uncontended_rows(redis_server: Server, etcd_server: Server, seconds: float) -> None:
    r = redis_uncontended(redis_server.url, redis_server.port, seconds)
    table("Redis, uncontended acquire+release", r, "dcoord Lock (fenced, auto-renew)")
    dcoord_rate = r["dcoord Lock (fenced, auto-renew)"]
    fair_cost = 1e6 / r["dcoord Lock fair=True (fenced, auto-renew)"] - 1e6 / dcoord_rate
    print(
        f"  goal: >= 1.1x redis-py Lock -> {dcoord_rate / r['redis-py Lock']:.2f}x; "
        f">= 0.95x the floor -> {dcoord_rate / r['raw SET NX PX + DEL (floor)']:.2f}x; "
        f"fair=True costs {fair_cost:+.1f} us/cycle"
    )

    e = etcd_uncontended(etcd_server.url, etcd_server.port, seconds)
    table("etcd, uncontended acquire+release", e, "dcoord Lock (fenced, shared lease)")
    dcoord_rate = e["dcoord Lock (fenced, shared lease)"]
    print(
        f"  goal: >= 1.5x pyetcd Lock -> {dcoord_rate / e['pyetcd Lock']:.2f}x; "
        f">= 0.95x the floor -> {dcoord_rate / e['raw put + delete (floor)']:.2f}x"
    )


def contended_rows(redis_server: Server, etcd_server: Server, seconds: float, think: float) -> None:
    print(
        f"\nContended: {WORKERS} processes, {CRITICAL_SECTION * 1000:g} ms critical section, "
        f"{think * 1000:g} ms of other work between grants, {seconds:g} s"
    )
    runs = {
        f"redis {kind}": contended(kind, redis_server.url, redis_server.port, seconds, think)
        for kind in ("dcoord", "dcoord fair", "redis-py")
    }
    runs["etcd dcoord (FIFO)"] = contended("dcoord", etcd_server.url, 0, seconds, think)
    for kind, result in runs.items():
        print(
            f"  {kind:20s} {result['grants/s']:6.0f} grants/s   "
            f"p50 wait {result['p50 wait ms']:7.2f} ms   "
            f"p99 wait {result['p99 wait ms']:8.2f} ms   "
            f"hand-off p50/p99 {result['p50 hand-off ms']:5.2f}/"
            f"{result['p99 hand-off ms']:5.2f} ms   "
            f"per process {result['grants per process']} (max/min {result['max/min']:.2f})"
        )
    fair = runs["redis dcoord fair"]
    print(
        f"  redis fair goal: p99 <= {10 * CRITICAL_SECTION * 1000:g} ms -> "
        f"{fair['p99 wait ms']:.2f} ms; max/min <= 1.2 -> {fair['max/min']:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (about 30 s total)")
    parser.add_argument("--seconds", type=float, help="seconds per uncontended measurement")
    parser.add_argument("--contended-seconds", type=float, help="seconds of contention")
    parser.add_argument("--persistent", action="store_true", help="Redis with AOF fsync always")
    parser.add_argument("--metrics", action="store_true", help="only the metrics-cost rows")
    parser.add_argument(
        "--only", choices=("uncontended", "contended", "breakdown"), help="only these rows"
    )
    args = parser.parse_args()
    seconds = args.seconds or (1.0 if args.quick else 3.0)
    contended_seconds = args.contended_seconds or (3.0 if args.quick else 10.0)
    rounds = 20 if args.quick else 100

    print(
        f"dcoord {dcoord.__version__} locks benchmark: Python {platform.python_version()}, "
        f"{os.cpu_count()} cores, redis-py {redis.__version__}, "
        f"Redis {'AOF fsync always' if args.persistent else 'no persistence'}"
    )
    servers: list[Server] = []
    try:
        redis_server = start_server("redis", persistent=args.persistent)
        servers.append(redis_server)
        if args.only in (None, "breakdown"):
            redis_breakdown(redis_server.url, redis_server.port)
        if args.only == "breakdown":
            return
        if args.only is None:
            print("\nMetrics cost, uncontended acquire+release (fenced, auto-renew)")
            for name, url in (("memory", "memory://bench"), ("redis", redis_server.url)):
                metrics_table(name, metrics_cost(url, seconds * 2))
        if args.metrics:
            return
        etcd_server = start_server("etcd")
        servers.append(etcd_server)

        if args.only in (None, "uncontended"):
            uncontended_rows(redis_server, etcd_server, seconds)
        if args.only in (None, "contended"):
            for think in THINK_TIMES:
                contended_rows(redis_server, etcd_server, contended_seconds, think)
        if args.only is not None:
            return

        print(f"\nHand-off latency, release -> waiter's acquire returns ({rounds} rounds)")
        for name, url in (
            ("memory", "memory://bench"),
            ("redis", redis_server.url),
            ("etcd", etcd_server.url),
        ):
            lat = handoff(url, rounds)
            print(
                f"  {name:7s} p50 {percentile(lat, 0.5) * 1000:6.2f} ms   "
                f"p99 {percentile(lat, 0.99) * 1000:6.2f} ms   max {max(lat) * 1000:6.2f} ms"
            )

        print("\nRedis waiter set-up, median of", rounds)
        for name, ms in waiter_setup(redis_server.port, redis_server.url, rounds).items():
            print(f"  {name:42s} {ms:6.2f} ms")
    finally:
        for server in servers:
            server.stop()


if __name__ == "__main__":
    main()
