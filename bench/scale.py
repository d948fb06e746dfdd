"""Ring and membership at scale: HashRing build time and a live ring's CPU per change.

    python -m bench.scale [URL ...] [--members 10,100,1000,5000] [--restart 200]

1. ``HashRing`` of N nodes x 160 vnodes, built from scratch (points not cached: every
   virtual node hashed) and again (points cached per node), and one node added to it
   with ``with_node`` - best of a few rounds each.
2. For each URL (default ``memory://``) and N: N members join a group (one client, ttl 30 s),
   a second client follows the group with a live ring, then a *rolling restart* makes
   ``--restart`` members leave and join again one after the other (2 changes each,
   paced so that the follower sees them one by one, as in a real rolling restart), and
   again as one *burst* without pacing (the follower may coalesce), each ended by one
   marker member joining. Reported: the CPU time (user + system, from /proc) of the
   follower's thread per membership change (epochs advanced, the marker included), and
   whether the ring ended equal to a ring built from scratch.

Numbers depend on the machine's load; the machine these were taken on is shared, so run
it twice and compare. A text table is printed (no plotting dependency).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dcoord
from dcoord import ring as ring_module
from dcoord.ring import HashRing

PACE = 0.02  # seconds between changes of the rolling restart


def _best(fn: Callable[[], object], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        gc.collect()
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def builds(sizes: list[int]) -> None:
    print("1. HashRing build, 160 vnodes per node (best of rounds, ms)")
    print(f"   {'nodes':>6}{'points':>9}{'uncached':>10}{'cached':>9}{'with_node':>11}")
    for n in sizes:
        nodes = [f"member-{i}" for i in range(n)]

        def uncached(nodes: list[str] = nodes) -> None:
            # (getattr: the bench also runs against versions without the cache, or with
            # it under its former name.)
            for cache in ("_node_keys", "_node_points"):
                getattr(getattr(ring_module, cache, None), "cache_clear", lambda: None)()
            HashRing(nodes)

        rounds = 5 if n <= 1000 else 3
        cold = _best(uncached, rounds)
        warm = _best(lambda nodes=nodes: HashRing(nodes), rounds)  # type: ignore[misc]
        ring = HashRing(nodes)
        add = _best(lambda ring=ring: ring.with_node("joiner"), rounds)  # type: ignore[misc]
        print(f"   {n:>6}{n * 160:>9,}{cold * 1e3:>10.1f}{warm * 1e3:>9.1f}{add * 1e3:>11.2f}")
    print()


def _thread_cpu(thread: threading.Thread) -> float:
    """CPU seconds (user + system) of ``thread`` so far, from /proc (Linux)."""
    with open(f"/proc/self/task/{thread.native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def follower(url: str, n: int, restart: int) -> None:
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    name = "scale"
    with (
        dcoord.connect(url, namespace=namespace) as members,
        dcoord.connect(url, namespace=namespace) as observer,
    ):
        group = members.group(name)
        joined = {f"m{i}": group.join(f"m{i}", ttl=30) for i in range(n)}
        live = observer.group(name).ring()
        assert live.wait_for(lambda r: len(r) == n, 60), f"ring saw {len(live)} of {n}"
        thread = next(t for t in threading.enumerate() if t.name == f"dcoord-follow-{name}")
        results = []
        for mode, pace in (("rolling", PACE), ("burst", 0.0)):
            epoch, cpu, started = live.epoch, _thread_cpu(thread), time.perf_counter()
            for i in range(min(restart, n)):
                member_id = f"m{i}"
                joined[member_id].leave()
                time.sleep(pace)  # a restarting process is away for a moment
                joined[member_id] = group.join(member_id, ttl=30)
                time.sleep(pace)
            # One more change marks the end: when the ring has it, it has all before it
            # (a burst may coalesce to no change at all, so the epoch alone cannot tell).
            marker = group.join(f"end-{mode}", ttl=30)
            assert live.wait_for(lambda r, m=marker.id: m in r, 60), "ring fell behind"
            changes = live.epoch - epoch
            spent = _thread_cpu(thread) - cpu
            exact = live.ring == HashRing(live.members.weights())
            results.append((mode, changes, time.perf_counter() - started, spent, exact))
            marker.leave()
        for mode, changes, wall, spent, exact in results:
            per = spent / max(changes, 1) * 1e3
            print(
                f"   {url.split('://')[0]:<7}{n:>7}{mode:>9}{changes:>9}{wall:>8.1f}"
                f"{spent:>9.2f}{per:>12.3f}  {'yes' if exact else 'NO'}"
            )
        live.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("urls", nargs="*", default=["memory://"])
    ap.add_argument("--members", default="10,100,1000,5000", help="group sizes, comma-separated")
    ap.add_argument("--builds", default="10,100,500,1000,2000,5000", help="ring sizes")
    ap.add_argument("--restart", type=int, default=200, help="members restarted (2 changes each)")
    args = ap.parse_args(argv)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, load average {os.getloadavg()[0]:.2f}\n"
    )
    builds([int(x) for x in args.builds.split(",")])
    print(f"2. live ring follower: CPU of its thread per change, restarting {args.restart}")
    print(
        f"   {'backend':<7}{'members':>7}{'mode':>9}{'changes':>9}{'wall s':>8}"
        f"{'cpu s':>9}{'ms/change':>12}  ring exact"
    )
    for url in args.urls:
        for n in (int(x) for x in args.members.split(",")):
            follower(url, n, args.restart)
    return 0


if __name__ == "__main__":
    sys.exit(main())
