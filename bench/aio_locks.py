"""Benchmark the asyncio API's locks against redis-py's own asyncio lock.

    python bench/aio_locks.py [--seconds S] [--rounds N] [--repeat R] [--breakdown]
                              [--tasks T] [--locks L] [--grants G]
                              [--skip-uncontended] [--skip-contended]

Starts a Redis and an etcd server (tests.servers, no persistence) and stops them at the
end. Uncontended: one event loop, one task, back-to-back acquire+release cycles, for:

* dcoord.aio, fenced, auto-renewal on (the default: a watchdog task per grant);
* dcoord.aio with ``auto_renew=False``;
* ``redis.asyncio.lock.Lock`` (redis-py's, no fencing, no renewal), on a client as
  ``Redis.from_url`` makes it: no socket timeout;
* the same on a client with dcoord's request timeout as its socket timeout (like for
  like: dcoord's client has one, and redis-py pays for it on every command);
* dcoord.aio on ``memory://`` (no network: the cost of the async layer itself).

The candidates take turns in rounds so that load from elsewhere on the machine hits them
alike; the ratio dcoord / redis-py is printed (goal: >= 1.0) with the spread over the
rounds (each round's own rate: min / median / max); ``--repeat R`` does it R times
(a fresh server each) and prints the median and range of the ratio over the runs.
``--breakdown`` adds the raw commands of a cycle (dcoord's two scripts through
redis-py's ``execute_command`` and through the lock's direct path; redis-py's ``SET``
+ release script) and the server's CPU per command (``INFO commandstats``), to show
where a cycle's microseconds go (docs/performance.md).

Contended, on Redis and on etcd: T tasks in one process (one client) contend for L locks
(task i wants lock i mod L) until G grants in all. Printed: grants/s; the hand-off (from
the holder's ``release()`` call to the next holder's grant on that lock) p50 / p99; the
backend calls per grant (every request the client sends, counted at the backend's one
``call`` boundary: a client that polled would show calls growing with the wait, not
with the grants); and memory per waiting task (tracemalloc: T tasks parked behind L held
locks, traced bytes after minus before, divided by T). The wake-up path: Redis, a
release script PUBLISHes on the lock's channel, one pub/sub connection per client reads
it and wakes that lock's waiters, who retry the acquire script; etcd, each waiter
watches the delete of its predecessor's queue key (FIFO), so a release wakes one task.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import platform
import secrets
import statistics
import sys
import time
import tracemalloc
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis
import redis.asyncio
import redis.asyncio.lock

import dcoord.aio
from dcoord.backends.etcd_names import etcd_lock_prefix
from dcoord.backends.redis.aio_locks import execute
from dcoord.backends.redis.locks import ACQUIRE, RELEASE, lock_keys
from tests.servers import start_server

Cycle = Callable[[], Awaitable[None]]


async def rates(
    cycles: dict[str, Cycle], seconds: float, rounds: int
) -> dict[str, tuple[float, list[float], float]]:
    """Cycles per second of each candidate, in ``rounds`` interleaved slices: the overall
    rate, each round's, and this process's CPU time per cycle in microseconds (what the
    client spends; it moves far less with the machine's load than the rates do)."""
    for cycle in cycles.values():
        for _ in range(50):  # warm up connections and script caches
            await cycle()
    counts = dict.fromkeys(cycles, 0)
    spent = dict.fromkeys(cycles, 0.0)
    cpu = dict.fromkeys(cycles, 0.0)
    per_round: dict[str, list[float]] = {name: [] for name in cycles}
    for _ in range(rounds):
        for name, cycle in cycles.items():
            started, cpu_started = time.perf_counter(), time.process_time()
            deadline = started + seconds / rounds
            n = 0
            while time.perf_counter() < deadline:
                await cycle()
                n += 1
            took = time.perf_counter() - started
            cpu[name] += time.process_time() - cpu_started
            spent[name] += took
            counts[name] += n
            per_round[name].append(n / took)
    return {
        name: (counts[name] / spent[name], per_round[name], cpu[name] / counts[name] * 1e6)
        for name in cycles
    }


BASELINE = "redis.asyncio.lock.Lock"
LIKE_FOR_LIKE = "redis.asyncio.lock.Lock, socket_timeout"
DCOORD = ("dcoord.aio (fenced, auto-renew)", "dcoord.aio (fenced, no renewal)")


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


def raw_cycles(client: dcoord.aio.AsyncClient, raw: Any, namespace: str) -> dict[str, Cycle]:
    """``--breakdown``: the commands of a cycle without the locks around them - dcoord's
    two scripts through redis-py's ``execute_command`` and through the direct path the
    lock uses (``aio_locks.execute``), and redis-py's ``SET NX PX`` + release script."""
    backend: Any = client.backend
    mine = backend.redis
    key, fence, channel = lock_keys(backend.prefix, "raw")
    holder = backend.locks.holder
    plain = f"{namespace}:raw"
    release_sha = redis.asyncio.lock.Lock(raw, plain).lua_release.sha

    def scripts(run: Callable[..., Awaitable[Any]]) -> Cycle:
        async def cycle() -> None:
            token = secrets.token_hex(16) + holder
            await run("EVALSHA", ACQUIRE.sha, 2, key, fence, token, 30000, 0)
            await run("EVALSHA", RELEASE.sha, 1, key, token, channel)

        return cycle

    async def redis_py_commands() -> None:
        token = secrets.token_hex(16)
        await raw.execute_command("SET", plain, token, "NX", "PX", 30000)
        await raw.execute_command("EVALSHA", release_sha, 1, plain, token)

    return {
        "raw: dcoord's 2 scripts, execute_command": scripts(mine.execute_command),
        "raw: dcoord's 2 scripts, direct": scripts(functools.partial(execute, mine)),
        "raw: redis-py's SET + script": redis_py_commands,
    }


async def server_cpu(raw: Any) -> dict[str, float]:
    """Microseconds of server CPU per call of the commands a cycle runs, since the start."""
    stats = await raw.info("commandstats")
    wanted = ("evalsha", "set", "get", "del", "time", "publish")
    return {
        name: float(stats[f"cmdstat_{name}"]["usec_per_call"])
        for name in wanted
        if f"cmdstat_{name}" in stats
    }


async def uncontended(
    url: str, seconds: float, rounds: int, breakdown: bool = False
) -> tuple[dict[str, tuple[float, list[float], float]], dict[str, float]]:
    namespace = f"bench{uuid.uuid4().hex[:8]}"
    async with (
        dcoord.aio.connect(url, namespace=namespace) as client,
        dcoord.aio.connect(f"memory://{namespace}") as memory,
    ):
        raw = redis.asyncio.Redis.from_url(url)
        # What dcoord's client pays for its request timeout (redis-py then wraps every
        # socket write in asyncio.wait_for, a task each, and every read in a timeout):
        # redis-py's lock on a client with the same socket timeout, for comparison.
        timed = redis.asyncio.Redis.from_url(url, socket_timeout=client.settings.request_timeout)
        try:
            cycles = {
                "dcoord.aio (fenced, auto-renew)": dcoord_cycle(client.lock("a", ttl=30)),
                "dcoord.aio (fenced, no renewal)": dcoord_cycle(
                    client.lock("b", ttl=30, auto_renew=False)
                ),
                "redis.asyncio.lock.Lock": redis_py_cycle(
                    redis.asyncio.lock.Lock(raw, f"{namespace}:c", timeout=30)
                ),
                LIKE_FOR_LIKE: redis_py_cycle(
                    redis.asyncio.lock.Lock(timed, f"{namespace}:e", timeout=30)
                ),
                "dcoord.aio memory:// (fenced, auto-renew)": dcoord_cycle(memory.lock("d", ttl=30)),
            }
            if breakdown:
                await cycles["dcoord.aio (fenced, auto-renew)"]()  # loads the scripts
                await cycles[BASELINE]()
                cycles.update(raw_cycles(client, raw, namespace))
            result = await rates(cycles, seconds, rounds)
            return result, await server_cpu(raw) if breakdown else {}
        finally:
            await raw.aclose()
            await timed.aclose()


class Counted:
    """Counts the requests of one async backend at its ``call`` boundary (every request
    of the lock store goes through it)."""

    def __init__(self, backend: Any) -> None:
        self.calls = 0
        inner = backend.call

        async def call(fn: Any, **options: Any) -> Any:
            self.calls += 1
            return await inner(fn, **options)

        backend.call = call


async def contended(url: str, tasks: int, locks: int, grants: int) -> dict[str, float]:
    """T tasks, L locks, until G grants: see the module's docstring."""
    namespace = f"bench{uuid.uuid4().hex[:8]}"
    async with dcoord.aio.connect(url, namespace=namespace, request_timeout=30) as client:
        counted = Counted(client.backend)
        names = [f"lock-{n}" for n in range(locks)]
        for name in names:  # warm up: scripts loaded, connections made
            lock = client.lock(name, ttl=30, auto_renew=False)
            assert await lock.acquire()
            await lock.release()
        released_at: dict[str, float] = {}
        handoffs: list[float] = []
        left = grants
        done = asyncio.Event()

        async def worker(i: int) -> None:
            nonlocal left
            name = names[i % locks]
            lock = client.lock(name, ttl=30, auto_renew=False)
            while left > 0:
                if not await lock.acquire(timeout=120):
                    raise RuntimeError(f"{name}: no grant in 120 s")
                granted = time.perf_counter()
                if name in released_at:
                    handoffs.append(granted - released_at.pop(name))
                left -= 1
                if left <= 0:
                    done.set()
                released_at[name] = time.perf_counter()
                await lock.release()
            done.set()

        calls_before = counted.calls
        started = time.perf_counter()
        workers = [asyncio.create_task(worker(i)) for i in range(tasks)]
        await done.wait()
        took = time.perf_counter() - started
        made = grants - left
        calls = counted.calls - calls_before
        for task in workers:  # the rest were still waiting: not part of the measure
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        handoffs.sort()
        result = {
            "grants/s": made / took,
            "hand-off p50 ms": 1000 * statistics.median(handoffs),
            "hand-off p99 ms": 1000 * handoffs[min(len(handoffs) - 1, len(handoffs) * 99 // 100)],
            "calls/grant": calls / made,
        }
        result["bytes/waiting task"] = await waiting_memory(client, names, tasks)
        return result


async def waiting_memory(client: dcoord.aio.AsyncClient, names: list[str], tasks: int) -> float:
    """Traced bytes per task parked behind a held lock (tracemalloc, after - before)."""
    holders = [client.lock(name, ttl=60) for name in names]
    for holder in holders:
        assert await holder.acquire()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        waiters = [
            asyncio.create_task(client.lock(names[i % len(names)], ttl=60).acquire(timeout=300))
            for i in range(tasks)
        ]
        deadline = time.monotonic() + 300
        while await parked(client, names) < tasks:
            if time.monotonic() > deadline:
                raise RuntimeError("the waiters did not all park in 300 s")
            await asyncio.sleep(0.2)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    for task in waiters:
        task.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    for holder in holders:
        await holder.release()
    return (after - before) / tasks


async def parked(client: dcoord.aio.AsyncClient, names: list[str]) -> int:
    """Waiters parked now: on Redis registered on the notifier's channels, on etcd queue
    keys behind the holders'."""
    backend: Any = client.backend
    if backend.kind == "redis":
        return sum(channel.waiters for channel in backend.locks.notifier._channels.values())
    from pyetcd import etcdrpc
    from pyetcd.utils import prefix_range_end

    total = 0
    for name in names:
        prefix = f"{etcd_lock_prefix(client.namespace, name)}/".encode()
        request = etcdrpc.RangeRequest(
            key=prefix, range_end=prefix_range_end(prefix), count_only=True
        )
        reply = await backend.kv.Range(request, timeout=10)
        total += max(0, int(reply.count) - 1)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds per candidate")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved slices")
    parser.add_argument("--tasks", type=int, default=1000, help="contending tasks")
    parser.add_argument("--locks", type=int, default=10, help="locks they contend for")
    parser.add_argument("--grants", type=int, default=5000, help="grants in all")
    parser.add_argument("--repeat", type=int, default=1, help="uncontended runs")
    parser.add_argument(
        "--breakdown", action="store_true", help="also the raw commands, and server CPU"
    )
    parser.add_argument("--skip-uncontended", action="store_true")
    parser.add_argument("--skip-contended", action="store_true")
    args = parser.parse_args()
    print(
        f"dcoord {dcoord.__version__} asyncio locks: Python {platform.python_version()}, "
        f"redis-py {redis.__version__}, servers without persistence, one process"
    )
    if not args.skip_uncontended:
        overall: dict[str, list[float]] = collections.defaultdict(list)
        for run in range(1, args.repeat + 1):
            server = start_server("redis", using="processes", persistent=False)
            try:
                result, server_us = asyncio.run(
                    uncontended(server.url, args.seconds, args.rounds, args.breakdown)
                )
            finally:
                server.stop()
            print(
                f"uncontended, run {run}/{args.repeat}, one task, {args.rounds} rounds "
                "(rate: all / per round min med max; client CPU per cycle)"
            )
            for name, (rate, rounds, cpu) in result.items():
                spread = " ".join(
                    f"{r:6.0f}" for r in (min(rounds), statistics.median(rounds), max(rounds))
                )
                print(f"  {name:45s} {rate:7.0f} cycles/s  ({spread})  {cpu:5.0f} us CPU")
            if server_us:
                shown = ", ".join(f"{name} {us:.2f}" for name, us in server_us.items())
                print(f"  server CPU, us per call: {shown}")
            for name in DCOORD:
                rate, rounds, _ = result[name]
                for against in (BASELINE, LIKE_FOR_LIKE):
                    base, base_rounds, _ = result[against]
                    # A round's slices run one after the other: their ratio sees the
                    # same load, so its median is steadier than the overall ratio.
                    ratios = sorted(r / b for r, b in zip(rounds, base_rounds, strict=True))
                    print(
                        f"  {name} / {against}: {rate / base:.2f}x (per round median "
                        f"{statistics.median(ratios):.2f}x, {ratios[0]:.2f}x .. {ratios[-1]:.2f}x)"
                    )
                base, base_rounds, base_cpu = result[BASELINE]
                overall[name + ", cycles/s"].append(rate / base)
                overall[name + ", per round median"].append(
                    statistics.median(r / b for r, b in zip(rounds, base_rounds, strict=True))
                )
                # CPU per cycle inverted: above 1.0x means dcoord spends less.
                overall[name + ", client CPU"].append(base_cpu / result[name][2])
        if args.repeat > 1:
            print(f"over {args.repeat} runs, dcoord / {BASELINE}: median (min .. max)")
            for label, ratios in overall.items():
                print(
                    f"  {label:50s} {statistics.median(ratios):.2f}x "
                    f"({min(ratios):.2f}x .. {max(ratios):.2f}x)"
                )
    if not args.skip_contended:
        print(f"contended: {args.tasks} tasks, {args.locks} locks, {args.grants} grants")
        for kind in ("redis", "etcd"):
            server = start_server(kind, using="processes", persistent=False)
            try:
                figures = asyncio.run(contended(server.url, args.tasks, args.locks, args.grants))
            finally:
                server.stop()
            shown = ", ".join(f"{key} {value:.1f}" for key, value in figures.items())
            print(f"  {kind:5s} {shown}")


if __name__ == "__main__":
    main()
