"""Benchmark dcoord semaphores (and read-write locks) on every backend.

    python bench/semaphore.py [--quick] [--seconds S] [--limit N]

Against servers this script starts (tests.servers) and stops; Redis keeps nothing on
disk (the numbers are the library's cost, not the disk's):

* Uncontended acquire+release cycles/s of one handle: semaphore, rwlock read and write,
  beside a plain Lock for scale.
* Contended semaphore grants/s with ``limit`` contenders (every one gets a permit at
  once) and with 2 x ``limit`` contenders (half of them wait), 1 ms hold each: separate
  processes on Redis and etcd, threads of one process on memory (the store is
  in-process). Also p50/p99 wait and the most holders seen at once (must be <= limit).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dcoord
from bench.locks import cycle_of, percentile, rates
from tests.servers import Server, start_server

HOLD = 0.001
NAME = "bench-pool"


def uncontended(url: str, seconds: float) -> dict[str, float]:
    with dcoord.connect(url, namespace=f"bench{uuid.uuid4().hex[:6]}") as client:
        rw = client.rwlock("rw")
        return rates(
            {
                "Lock (for scale)": cycle_of(client.lock("lock")),
                "Semaphore limit 2": cycle_of(client.semaphore("sem", 2)),
                "rwlock read": cycle_of(rw.read()),
                "rwlock write": cycle_of(rw.write()),
            },
            seconds,
        )


def contender(
    url: str, namespace: str, limit: int, seconds: float, start: Any, inside: Any, out: Any
) -> None:
    """One contender: acquire, hold 1 ms, release, for ``seconds``; reports its waits and
    the most holders it saw inside (a shared counter)."""
    waits: list[float] = []
    most = 0
    with dcoord.connect(url, namespace=namespace) as client:
        permit = client.semaphore(NAME, limit, ttl=10)
        start.wait(timeout=120)  # every contender connected before the clock starts
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            asked = time.perf_counter()
            permit.acquire()
            waits.append(time.perf_counter() - asked)
            with inside.get_lock():
                inside.value += 1
                most = max(most, inside.value)
            time.sleep(HOLD)
            with inside.get_lock():
                inside.value -= 1
            permit.release()
    out.put((waits, most))


def contended(url: str, limit: int, contenders: int, seconds: float) -> dict[str, Any]:
    namespace = f"bench{uuid.uuid4().hex[:6]}"
    in_process = url.startswith("memory://")
    ctx: Any = multiprocessing if in_process else multiprocessing.get_context("spawn")
    start, inside, out = ctx.Barrier(contenders), ctx.Value("i", 0), ctx.Queue()
    make: Callable[..., Any] = threading.Thread if in_process else ctx.Process
    workers = [
        make(target=contender, args=(url, namespace, limit, seconds, start, inside, out))
        for _ in range(contenders)
    ]
    for worker in workers:
        worker.start()
    results = [out.get(timeout=seconds + 180) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
    waits = [w for per, _ in results for w in per]
    return {
        "grants/s": len(waits) / seconds,
        "p50 wait ms": percentile(waits, 0.5) * 1000,
        "p99 wait ms": percentile(waits, 0.99) * 1000,
        "most at once": max(most for _, most in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (about 40 s total)")
    parser.add_argument("--seconds", type=float, help="seconds per measurement")
    parser.add_argument("--limit", type=int, default=2, help="permits (default 2)")
    args = parser.parse_args()
    seconds = args.seconds or (1.0 if args.quick else 3.0)
    print(
        f"dcoord {dcoord.__version__} semaphore benchmark: Python "
        f"{platform.python_version()}, {os.cpu_count()} cores, Redis without persistence"
    )
    servers: list[Server] = []
    try:
        urls = {"memory": f"memory://bench-{uuid.uuid4().hex[:6]}"}
        for kind in ("redis", "etcd"):
            server = start_server(kind, persistent=False) if kind == "redis" else start_server(kind)
            servers.append(server)
            urls[kind] = server.url
        for kind, url in urls.items():
            print(f"\n{kind}: uncontended acquire+release")
            for name, rate in uncontended(url, seconds).items():
                print(f"  {name:22s} {rate:9.0f} cycles/s")
            print(f"{kind}: semaphore limit {args.limit}, {HOLD * 1000:g} ms hold, {seconds:g} s")
            for contenders in (args.limit, 2 * args.limit):
                r = contended(url, args.limit, contenders, seconds)
                print(
                    f"  {contenders} contenders: {r['grants/s']:8.0f} grants/s   "
                    f"p50 wait {r['p50 wait ms']:7.2f} ms   p99 wait {r['p99 wait ms']:7.2f} ms"
                    f"   most at once {r['most at once']}"
                )
    finally:
        for server in servers:
            server.stop()


if __name__ == "__main__":
    main()
