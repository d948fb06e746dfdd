"""Locks at scale: many auto-renewed locks in one client, and many processes contending.

    python -m bench.scale_locks [hold|contend ...] [--locks 10000] [--ttls 1,3] [--aio]
                                [--hold 9] [--processes 100] [--names 1000] [--seconds 10]

Starts its own Redis (AOF, ``appendfsync always``, as tests.servers configures it;
``--volatile``: no AOF) and
etcd 3.4 processes on loopback (tests.servers) and stops them at the end;
``--backends redis-cluster``: a Redis Cluster of three primaries with a replica each
(tests/topologies/cluster.py, AOF always), its requests summed over the primaries.

1. ``hold``: one client acquires ``--locks`` auto-renewed locks of TTL t (each of
   ``--ttls``), holds them ``--hold`` seconds (at least 3 TTLs) and reports how many
   stayed held (no ``on_lost``, ``held`` True at the end), the acquire rate, the
   client's CPU (process user + system time per second of holding) and the requests
   the server handled per second while holding: Redis ``INFO stats``
   ``total_reads_processed`` (one per read from a connection, of up to 16 KB: a
   pipeline of 1,000 scripts is one round trip, ~7 reads) next to the ``EVALSHA`` calls
   (``INFO commandstats``); etcd the gRPC messages its ``/metrics`` counts received.
   ``--aio``: the same with the async API (``dcoord.aio``), and the event loop's lag
   (how late a 10 ms sleep of another task wakes, p50/p99/max) while holding.
   ``--backends memory``: the embedded store (no server: no request counts).
2. ``contend``: ``--processes`` processes (forked, each with its own client) take
   random names of ``--names`` for ``--seconds``: acquire, 5 ms of work, release.
   Reported: grants/s, wait p50/p99 (acquire called to returned), and the hand-off
   latency p50/p99/max: from one holder's release returning to the acquire of a
   process that was already waiting for that name returning (one machine, so one
   ``time.monotonic`` clock for all processes). Each process stops by itself at its
   deadline; stragglers are killed by PID.

Numbers depend on the machine's load (the machine these were taken on is shared).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import multiprocessing
import os
import platform
import random
import re
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis

import dcoord
import dcoord.aio
from tests.servers import Server, start_server
from tests.topologies.cluster import PRIMARIES, ClusterSet

WORK = 0.005  # the critical section of the contention bench


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- 1. many locks in one client ----------------------------------------------------


class ClusterServer:
    """A Redis Cluster as this bench's ``Server``: a URL, and ``stop``."""

    kind = "cluster"

    def __init__(self) -> None:
        self.cluster = ClusterSet()
        self.cluster.start()
        self.url = self.cluster.url
        # No failover during a bench: the primaries stay the three first nodes.
        self.ports = [node.port for node in self.cluster.nodes[:PRIMARIES]]

    def stop(self) -> None:
        self.cluster.stop()


def redis_requests(port: int) -> tuple[int, int]:
    """(reads, EVALSHA calls) the redis server at ``port`` has handled so far."""
    r = redis.Redis(host="127.0.0.1", port=port)
    try:
        stats = r.info("stats")
        commands = r.info("commandstats")
    finally:
        r.close()
    return int(stats["total_reads_processed"]), int(
        commands.get("cmdstat_evalsha", {}).get("calls", 0)
    )


class Embedded:
    """``memory://``: no server to start, stop or count requests of."""

    kind = "memory"

    def __init__(self) -> None:
        self.url = f"memory://bench-{uuid.uuid4().hex[:8]}"

    def stop(self) -> None:
        """Nothing runs."""


def server_requests(server: Server | ClusterServer | Embedded) -> tuple[int, int]:
    """Requests the server has handled so far: (round trips, lock-script commands)."""
    if isinstance(server, Embedded):
        return 0, 0
    if isinstance(server, ClusterServer):
        counts = [redis_requests(port) for port in server.ports]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)
    if server.kind == "redis":
        return redis_requests(server.port)
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    received = sum(
        float(value)
        for value in re.findall(r"^grpc_server_msg_received_total\{[^}]*\} (\S+)$", text, re.M)
    )
    keepalives = sum(
        float(value)
        for value in re.findall(
            r'^grpc_server_msg_received_total\{[^}]*grpc_method="LeaseKeepAlive"[^}]*\} (\S+)$',
            text,
            re.M,
        )
    )
    return int(received), int(keepalives)


async def loop_lag(lags: list[float]) -> None:
    """Record how late each 10 ms sleep wakes (the event loop's lag), until cancelled."""
    loop = asyncio.get_running_loop()
    while True:
        asked = loop.time()
        await asyncio.sleep(0.01)
        lags.append(loop.time() - asked - 0.01)


async def hold_async(
    server: Server | ClusterServer | Embedded, n: int, ttl: float, seconds: float
) -> dict[str, Any]:
    """:func:`hold` with the async API (``dcoord.aio``), and the loop's lag meanwhile."""
    lost: list[str] = []
    namespace = f"hold-{uuid.uuid4().hex[:8]}"
    async with await dcoord.aio.connect(server.url, namespace=namespace) as client:
        locks = [
            client.lock(f"res-{i}", ttl=ttl, on_lost=lambda lock: lost.append(lock.name))
            for i in range(n)
        ]
        started = time.perf_counter()
        for lock in locks:
            assert await lock.acquire(timeout=30), f"{lock.name} not acquired"
        acquire_rate = n / (time.perf_counter() - started)
        lost_acquiring = len(lost)
        trips, scripts = server_requests(server)
        cpu, wall = time.process_time(), time.perf_counter()
        lags: list[float] = []
        lagging = asyncio.create_task(loop_lag(lags))
        await asyncio.sleep(seconds)
        lagging.cancel()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        trips2, scripts2 = server_requests(server)
        held = sum(lock.held for lock in locks)
    return {
        "acquire/s": acquire_rate,
        "held": held,
        "lost": len(lost),
        "lost acquiring": lost_acquiring,
        "cpu": cpu / wall,
        "trips/s": max(0, trips2 - trips - 1) / wall,  # one read is the first counter's own
        "scripts/s": (scripts2 - scripts) / wall,
        "lag": (percentile(lags, 0.5), percentile(lags, 0.99), max(lags, default=float("nan"))),
    }


def hold(
    server: Server | ClusterServer | Embedded, n: int, ttl: float, seconds: float
) -> dict[str, Any]:
    lost: list[str] = []
    with dcoord.connect(server.url, namespace=f"hold-{uuid.uuid4().hex[:8]}") as client:
        locks = [
            client.lock(f"res-{i}", ttl=ttl, on_lost=lambda lock: lost.append(lock.name))
            for i in range(n)
        ]
        started = time.perf_counter()
        for lock in locks:
            assert lock.acquire(timeout=30), f"{lock.name} not acquired"
        acquire_rate = n / (time.perf_counter() - started)
        lost_acquiring = len(lost)
        trips, scripts = server_requests(server)
        cpu, wall = time.process_time(), time.perf_counter()
        time.sleep(seconds)  # the bench measures what the watchdog does meanwhile
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        trips2, scripts2 = server_requests(server)
        held = sum(lock.held for lock in locks)
    return {
        "acquire/s": acquire_rate,
        "held": held,
        "lost": len(lost),
        "lost acquiring": lost_acquiring,
        "cpu": cpu / wall,
        "trips/s": max(0, trips2 - trips - 1) / wall,  # one read is the first counter's own
        "scripts/s": (scripts2 - scripts) / wall,
    }


def hold_rows(
    servers: list[Server | ClusterServer | Embedded],
    n: int,
    ttls: list[float],
    seconds: float,
    aio: bool = False,
) -> None:
    print(f"1. one {'async ' if aio else ''}client holds {n:,} auto-renewed locks")
    print(
        f"   {'backend':<8}{'ttl s':>6}{'acquire/s':>11}{'held':>8}{'lost':>7}"
        f"{'(acquiring)':>12}{'cpu':>7}{'reads/s':>10}{'scripts/s':>11}"
        + ("   loop lag p50/p99/max ms" if aio else "")
    )
    for server in servers:
        for ttl in ttls:
            wait = max(seconds, 3 * ttl)
            if aio:
                row = asyncio.run(hold_async(server, n, ttl, wait))
            else:
                row = hold(server, n, ttl, wait)
            print(
                f"   {server.kind:<8}{ttl:>6g}{row['acquire/s']:>11,.0f}{row['held']:>8,}"
                f"{row['lost']:>7,}{row['lost acquiring']:>12,}{row['cpu']:>7.2f}"
                f"{row['trips/s']:>10,.1f}"
                f"{row['scripts/s']:>11,.0f}"
                + (
                    "   {:.1f} / {:.1f} / {:.0f}".format(*(x * 1e3 for x in row["lag"]))
                    if aio
                    else ""
                ),
                flush=True,
            )
    print(
        "   (acquiring: lost before the last lock was acquired; cpu: client CPU seconds per\n"
        "   second of holding; scripts/s: Redis EVALSHA, etcd keep-alive requests)"
    )


# -- 2. many processes, many names --------------------------------------------------


def contend_worker(
    url: str, namespace: str, names: int, start: float, end: float, out: Any
) -> None:
    """One process: random names until ``end``: (name, asked, acquired, released)."""
    rng = random.Random(os.getpid())
    records: list[tuple[int, float, float, float]] = []
    with dcoord.connect(url, namespace=namespace) as client:
        locks = {}
        time.sleep(max(0.0, start - time.monotonic()))  # everyone connected first
        while time.monotonic() < end:
            i = rng.randrange(names)
            lock = locks.get(i) or locks.setdefault(i, client.lock(f"n{i}", ttl=10))
            asked = time.monotonic()
            if not lock.acquire(timeout=max(0.0, end + 5 - asked)):
                continue
            acquired = time.monotonic()
            time.sleep(WORK)  # the critical section
            lock.release()
            records.append((i, asked, acquired, time.monotonic()))
    out.put(records)


def contend(
    server: Server | Embedded, processes: int, names: int, seconds: float
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("fork")  # dcoord already imported: cheap children
    out = ctx.Queue()
    namespace = f"contend-{uuid.uuid4().hex[:8]}"
    start = time.monotonic() + 5 + processes * 0.05
    end = start + seconds
    procs = [
        ctx.Process(target=contend_worker, args=(server.url, namespace, names, start, end, out))
        for _ in range(processes)
    ]
    for proc in procs:
        proc.start()
    records: list[tuple[int, float, float, float]] = []
    try:
        for _ in procs:
            records.extend(out.get(timeout=max(0.0, end - time.monotonic()) + 120))
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()  # our own child, by its handle
    waits = [acquired - asked for _, asked, acquired, _ in records]
    handoffs = []
    by_name: dict[int, list[tuple[int, float, float, float]]] = {}
    for record in records:
        by_name.setdefault(record[0], []).append(record)
    for grants in by_name.values():
        grants.sort(key=lambda r: r[2])
        for before, after in itertools.pairwise(grants):
            if after[1] < before[3]:  # it was waiting when the holder released
                handoffs.append(after[2] - before[3])
    return {
        "grants/s": len(records) / seconds,
        "wait p50": percentile(waits, 0.5),
        "wait p99": percentile(waits, 0.99),
        "handoffs": len(handoffs),
        "handoff p50": percentile(handoffs, 0.5),
        "handoff p99": percentile(handoffs, 0.99),
        "handoff max": max(handoffs, default=float("nan")),
    }


def contend_rows(
    servers: list[Server | Embedded], processes: int, names: int, seconds: float
) -> None:
    print(f"2. {processes} processes x {names:,} names, {WORK * 1000:g} ms held, {seconds:g} s")
    print(
        f"   {'backend':<8}{'grants/s':>9}{'wait p50':>10}{'p99':>8}{'hand-offs':>11}"
        f"{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}"
    )
    for server in servers:
        if isinstance(server, Embedded):
            continue  # one process's store: forked processes would not share it
        row = contend(server, processes, names, seconds)
        print(
            f"   {server.kind:<8}{row['grants/s']:>9,.0f}{row['wait p50'] * 1e3:>10.1f}"
            f"{row['wait p99'] * 1e3:>8.1f}{row['handoffs']:>11,}"
            f"{row['handoff p50'] * 1e3:>8.2f}{row['handoff p99'] * 1e3:>8.2f}"
            f"{row['handoff max'] * 1e3:>8.1f}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="*", choices=("hold", "contend"), default=[])
    ap.add_argument(
        "--backends", default="redis,etcd", help="of redis, etcd, memory, redis-cluster"
    )
    ap.add_argument("--locks", type=int, default=10_000)
    ap.add_argument("--ttls", default="1,3", help="lock TTLs in seconds, comma-separated")
    ap.add_argument("--hold", type=float, default=9.0, help="seconds to hold (>= 3 TTLs)")
    ap.add_argument("--aio", action="store_true", help="hold with the async API")
    ap.add_argument("--volatile", action="store_true", help="Redis without AOF (no fsync)")
    ap.add_argument("--processes", type=int, default=100)
    ap.add_argument("--names", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds of contention")
    args = ap.parse_args(argv)
    parts = args.parts or ["hold", "contend"]
    # Each lost lock logs a warning: the table counts them instead.
    logging.getLogger("dcoord").setLevel(logging.ERROR)
    print(
        f"dcoord {dcoord.__version__}: {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, load average {os.getloadavg()[0]:.2f}\n",
        flush=True,
    )
    servers: list[Any] = []
    try:
        for kind in args.backends.split(","):
            if kind == "redis-cluster":
                servers.append(ClusterServer())
                continue
            if kind == "memory":
                servers.append(Embedded())
                continue
            options = {"persistent": False} if args.volatile and kind == "redis" else {}
            servers.append(start_server(kind, using="processes", **options))
        if "hold" in parts:
            ttls = [float(t) for t in args.ttls.split(",")]
            hold_rows(servers, args.locks, ttls, args.hold, args.aio)
        if "contend" in parts:
            contend_rows(servers, args.processes, args.names, args.seconds)
    finally:
        for server in servers:
            server.stop()
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
