"""Benchmark the asyncio API's two-phase commit with null participants: commits/s.

    python bench/aio_twopc.py [--seconds S] [--tasks 1,8] [--backends memory,redis,etcd]

Starts Redis (the repository's redis.conf: AOF with appendfsync always) and etcd
(tests.servers, local processes) and stops them at the end. One event loop; each of
``--tasks`` concurrent tasks commits transactions of three participants that do
nothing, so the figure is the async coordinator's own cost: the record, the decision,
the two participant rounds as awaits, and the ``done`` write as a background task.
Compare with ``bench/twopc.py``'s ``null`` rows (the sync coordinator, threads).
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dcoord
import dcoord.aio
from tests.servers import start_server


class Null:
    """A participant that does nothing (votes yes)."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def prepare(self, txid: str, payload: Any) -> bool:
        return True

    async def commit(self, txid: str) -> None:
        return None

    async def abort(self, txid: str) -> None:
        return None


async def measure(url: str, tasks: int, seconds: float) -> tuple[float, float, float]:
    """Commits/s, p50 and p99 latency (ms) of ``tasks`` tasks committing for ``seconds``."""
    async with dcoord.aio.connect(url, namespace=f"bench-{uuid.uuid4().hex[:8]}") as client:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dcoord.DurabilityWarning)
            coord = await client.coordinator(
                participants=[Null(n) for n in ("a", "b", "c")]
            ).start()
        latencies: list[float] = []

        async def one() -> None:
            started = time.perf_counter()
            async with coord.transaction(timeout=10) as tx:
                for name in ("a", "b", "c"):
                    tx.enlist(name, None)
            latencies.append(time.perf_counter() - started)

        for _ in range(20):  # warm up connections and script caches
            await one()
        latencies.clear()
        deadline = time.perf_counter() + seconds

        async def loop() -> None:
            while time.perf_counter() < deadline:
                await one()

        began = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(tasks)))
        elapsed = time.perf_counter() - began
        await coord.close()
    cuts = statistics.quantiles(latencies, n=100)
    return len(latencies) / elapsed, cuts[49] * 1000, cuts[98] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--tasks", default="1,8", help="concurrent tasks, comma-separated")
    parser.add_argument("--backends", default="memory,redis,etcd")
    args = parser.parse_args()
    backends = args.backends.split(",")
    servers = {kind: start_server(kind) for kind in ("redis", "etcd") if kind in backends}
    urls = {kind: server.url for kind, server in servers.items()}
    urls["memory"] = f"memory://bench-{uuid.uuid4().hex[:8]}"
    try:
        print(
            f"dcoord {dcoord.__version__} asyncio 2PC, 3 null participants: "
            f"Python {platform.python_version()}"
        )
        for kind in backends:
            for tasks in (int(t) for t in args.tasks.split(",")):
                rate, p50, p99 = asyncio.run(measure(urls[kind], tasks, args.seconds))
                print(
                    f"  {kind:7s} {tasks:2d} task(s): {rate:8.0f} commits/s  "
                    f"p50 {p50:7.2f} ms  p99 {p99:7.2f} ms"
                )
    finally:
        for server in servers.values():
            server.stop()


if __name__ == "__main__":
    main()
