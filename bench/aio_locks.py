"""Benchmark the asyncio API's locks against redis-py's own asyncio lock.

    python bench/aio_locks.py [--seconds S] [--rounds N]

Starts a Redis server (tests.servers, no persistence) and stops it at the end. One event
loop, one task, back-to-back acquire+release cycles (uncontended), for:

* dcoord.aio, fenced, auto-renewal on (the default: a watchdog task per grant);
* dcoord.aio with ``auto_renew=False``;
* ``redis.asyncio.lock.Lock`` (redis-py's, no fencing, no renewal);
* dcoord.aio on ``memory://`` (no network: the cost of the async layer itself).

The candidates take turns in rounds so that load from elsewhere on the machine hits them
alike; the ratio dcoord / redis-py is printed (goal: >= 1.0).
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis
import redis.asyncio
import redis.asyncio.lock

import dcoord.aio
from tests.servers import start_server

Cycle = Callable[[], Awaitable[None]]


async def rates(cycles: dict[str, Cycle], seconds: float, rounds: int) -> dict[str, float]:
    """Cycles per second of each candidate, in ``rounds`` interleaved slices."""
    for cycle in cycles.values():
        for _ in range(50):  # warm up connections and script caches
            await cycle()
    counts = dict.fromkeys(cycles, 0)
    spent = dict.fromkeys(cycles, 0.0)
    for _ in range(rounds):
        for name, cycle in cycles.items():
            started = time.perf_counter()
            deadline = started + seconds / rounds
            n = 0
            while time.perf_counter() < deadline:
                await cycle()
                n += 1
            spent[name] += time.perf_counter() - started
            counts[name] += n
    return {name: counts[name] / spent[name] for name in cycles}


def dcoord_cycle(lock: dcoord.aio.AsyncLock) -> Cycle:
    async def cycle() -> None:
        await lock.acquire()
        await lock.release()

    return cycle


def redis_py_cycle(lock: redis.asyncio.lock.Lock) -> Cycle:
    async def cycle() -> None:
        await lock.acquire()
        await lock.release()

    return cycle


async def main_async(url: str, seconds: float, rounds: int) -> dict[str, float]:
    namespace = f"bench{uuid.uuid4().hex[:8]}"
    async with (
        dcoord.aio.connect(url, namespace=namespace) as client,
        dcoord.aio.connect(f"memory://{namespace}") as memory,
    ):
        raw = redis.asyncio.Redis.from_url(url)
        try:
            cycles = {
                "dcoord.aio (fenced, auto-renew)": dcoord_cycle(client.lock("a", ttl=30)),
                "dcoord.aio (fenced, no renewal)": dcoord_cycle(
                    client.lock("b", ttl=30, auto_renew=False)
                ),
                "redis.asyncio.lock.Lock": redis_py_cycle(
                    redis.asyncio.lock.Lock(raw, f"{namespace}:c", timeout=30)
                ),
                "dcoord.aio memory:// (fenced, auto-renew)": dcoord_cycle(memory.lock("d", ttl=30)),
            }
            return await rates(cycles, seconds, rounds)
        finally:
            await raw.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds per candidate")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved slices")
    args = parser.parse_args()
    server = start_server("redis", using="processes", persistent=False)
    try:
        result = asyncio.run(main_async(server.url, args.seconds, args.rounds))
    finally:
        server.stop()
    print(
        f"dcoord {dcoord.__version__} asyncio locks: Python {platform.python_version()}, "
        f"redis-py {redis.__version__}, Redis no persistence, one task, uncontended"
    )
    for name, rate in result.items():
        print(f"  {name:45s} {rate:9.0f} cycles/s")
    base = result["redis.asyncio.lock.Lock"]
    for name in ("dcoord.aio (fenced, auto-renew)", "dcoord.aio (fenced, no renewal)"):
        print(f"  {name} / redis.asyncio.lock.Lock: {result[name] / base:.2f}x")


if __name__ == "__main__":
    main()
