"""Benchmark dcoord.HashRing against uhashring: lookup speed, balance, movement, bounded load.

    python bench/ring.py [--keys N] [--quick] [--png docs/ring-load.png]
    python bench/ring.py --builds 10,100,500,1000,2000,5000

``--builds`` prints only how long dcoord's rings of N nodes x 160 vnodes take to build,
uncached (every virtual node hashed) and cached (each node's points hashed by an earlier
ring), and ``with_node`` on them: CPU ms of the process, median (min-max) of 7 rounds, 3
past 1,000 nodes. CPU, not wall time: on a shared machine the wall time of a build
measures the scheduler more than the build (on an idle one the two agree).

Both libraries get the same nodes (node-0 .. node-9), the same vnodes and the same keys
(user:0 .. user:N-1), in the same run. uhashring is used as its users would: its default
hash (md5 of str(key), whole 128-bit digest as the point) and its default 160 vnodes,
overridden only where the table says which vnodes it uses. The full run (1M keys) takes
about a minute on 2 cores; --quick (100k keys) about ten seconds.
"""

from __future__ import annotations

import argparse
import gc
import math
import platform
import statistics
import sys
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import mmh3
import uhashring

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dcoord import ring as ring_module
from dcoord.ring import HashRing

NODES = [f"node-{i}" for i in range(10)]
VNODES = (40, 160, 640)
PLOT_CAPACITY = 1.1  # the bounded-load series in the plot
RATIO_ROUNDS = 21  # paired rounds for the ratio to the plain loop
Lookup = Callable[[str], str]


def lookups_per_s(fn: Lookup, keys: Sequence[str]) -> float:
    gc.collect()
    t = time.perf_counter()
    for _ in map(fn, keys):
        pass
    return len(keys) / (time.perf_counter() - t)


def batch_per_s(fn: Callable[[Sequence[str]], list[str]], keys: Sequence[str]) -> float:
    gc.collect()
    t = time.perf_counter()
    fn(keys)
    return len(keys) / (time.perf_counter() - t)


def _quartiles(values: Sequence[float]) -> str:
    q1, _, q3 = statistics.quantiles(values, n=4)
    return f"{q1:.2f}-{q3:.2f}"


def plain_lookup(ring: HashRing) -> Lookup:
    """The baseline of goal 6: mmh3 and bisect over the ring's points, nothing else."""
    pairs = ring.points()
    points = [p for p, _ in pairs]
    owners = [n for _, n in pairs] + [pairs[0][1]]
    hash32 = mmh3.hash

    def plain(key: str) -> str:
        return owners[bisect_left(points, hash32(key, 0, False))]

    return plain


def place(fn: Lookup, keys: Sequence[str]) -> list[str]:
    return list(map(fn, keys))


def max_mean(owners: Sequence[str], nodes: Sequence[str]) -> tuple[float, dict[str, float]]:
    counts = Counter(owners)
    mean = len(owners) / len(nodes)
    loads = {n: counts[n] / mean for n in nodes}
    return max(loads.values()), loads


def moved(a: Sequence[str], b: Sequence[str]) -> int:
    return sum(1 for x, y in zip(a, b, strict=True) if x != y)


def stray(a: Sequence[str], b: Sequence[str], changed: str) -> int:
    """Moves that neither come from nor go to the node that was added or removed."""
    return sum(1 for x, y in zip(a, b, strict=True) if x != y and changed not in (x, y))


def uh_ring(nodes: Sequence[str], vnodes: int) -> uhashring.HashRing:
    return uhashring.HashRing(list(nodes), vnodes=vnodes)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=1_000_000, help="keys (default 1,000,000)")
    ap.add_argument("--quick", action="store_true", help="100,000 keys, fewer rounds")
    ap.add_argument("--png", type=Path, help="write the load-per-node plot here (matplotlib)")
    ap.add_argument("--builds", help="only build times, for these ring sizes (comma-separated)")
    args = ap.parse_args(argv)
    if args.builds:
        builds([int(n) for n in args.builds.split(",")])
        return 0
    n_keys = 100_000 if args.quick else args.keys
    rounds = 3 if args.quick else 5
    keys = [f"user:{i}" for i in range(n_keys)]
    started = time.perf_counter()

    print(
        f"machine: {platform.machine()}, {_cpus()} CPUs, Python {platform.python_version()}, "
        f"mmh3 {_version('mmh3')}, uhashring {_version('uhashring')}"
    )
    print(f"nodes: {len(NODES)}, keys: {n_keys:,} (user:0 ..)\n")

    # -- 1. lookup speed -----------------------------------------------------------------
    lk = keys[: min(n_keys, 200_000)]
    d_ring = HashRing(NODES, vnodes=160)
    u_ring = uh_ring(NODES, 160)
    lk_bytes = [k.encode() for k in lk]
    plain = plain_lookup(d_ring)
    rates: dict[str, list[float]] = {
        "dcoord": [],
        "dcoord bytes": [],
        "node_for_many": [],
        "plain loop": [],
        "uhashring": [],
    }
    for _ in range(rounds):  # interleaved, so drift in machine load hits all alike
        rates["dcoord"].append(lookups_per_s(d_ring.node_for, lk))
        rates["dcoord bytes"].append(
            lookups_per_s(d_ring.node_for, lk_bytes)  # type: ignore[arg-type]
        )
        rates["node_for_many"].append(batch_per_s(d_ring.node_for_many, lk))
        rates["plain loop"].append(lookups_per_s(plain, lk))
        rates["uhashring"].append(lookups_per_s(u_ring.get_node, lk))
    build = {
        "dcoord": _best(lambda: HashRing(NODES, vnodes=160)),
        "uhashring": _best(lambda: uh_ring(NODES, 160)),
    }
    print(f"1. lookups (vnodes=160, {len(lk):,} keys, best and median of {rounds} rounds)")
    print(f"   {'library':<14}{'best/s':>12}{'median/s':>12}{'build ms':>10}")
    for name, r in rates.items():
        b = build.get(name)
        print(
            f"   {name:<14}{max(r):>12,.0f}{statistics.median(r):>12,.0f}"
            f"{'' if b is None else f'{b * 1e3:.2f}':>10}"
        )
    ratio = max(rates["dcoord"]) / max(rates["uhashring"])
    ratio_med = statistics.median(rates["dcoord"]) / statistics.median(rates["uhashring"])
    print(f"   dcoord / uhashring: {ratio:.2f}x best, {ratio_med:.2f}x median (goal >= 3x)")
    # The ratio to the plain loop is close to 1, so the machine's noise matters more:
    # many short rounds, each timing both back to back in alternating order.
    pairs: dict[str, list[float]] = {"dcoord": [], "node_for_many": []}
    short = lk[:50_000]
    for i in range(RATIO_ROUNDS):
        if i % 2:
            rate = lookups_per_s(d_ring.node_for, short)
            base = lookups_per_s(plain, short)
        else:
            base = lookups_per_s(plain, short)
            rate = lookups_per_s(d_ring.node_for, short)
        pairs["dcoord"].append(rate / base)
        pairs["node_for_many"].append(batch_per_s(d_ring.node_for_many, short) / base)
    for name, ratios in pairs.items():
        print(
            f"   {name} / plain mmh3+bisect loop: {statistics.median(ratios):.2f}x, median of "
            f"{len(ratios)} paired rounds of {len(short):,} keys "
            f"(quartiles {_quartiles(ratios)}; goal >= 0.95x)"
        )
    print()

    # -- 2. balance, 3. movement ---------------------------------------------------------
    loads: dict[str, dict[str, float]] = {}
    print(f"2. load max/mean over {len(NODES)} nodes, {n_keys:,} keys")
    print(f"   {'vnodes':>6}{'dcoord':>10}{'(exact)':>10}{'uhashring':>11}")
    movement: list[tuple[str, int, str, float, float, int]] = []
    add_node, rm_node = "node-10", "node-0"
    for v in VNODES:
        rings: dict[str, tuple[Lookup, Lookup, Lookup]] = {}
        d = HashRing(NODES, vnodes=v)
        rings["dcoord"] = (
            d.node_for,
            d.with_node(add_node).node_for,
            d.without_node(rm_node).node_for,
        )
        u_add = uh_ring(NODES, v)
        u_add.add_node(add_node)
        u_rm = uh_ring(NODES, v)
        u_rm.remove_node(rm_node)
        rings["uhashring"] = (uh_ring(NODES, v).get_node, u_add.get_node, u_rm.get_node)
        row = {}
        for lib, (base_fn, add_fn, rm_fn) in rings.items():
            base = place(base_fn, keys)
            row[lib], loads[f"{lib} v{v}"] = max_mean(base, NODES)
            added = place(add_fn, keys)
            movement.append(
                (lib, v, "add", moved(base, added) / n_keys, 1 / 11, stray(base, added, add_node))
            )
            removed = place(rm_fn, keys)
            movement.append(
                (
                    lib,
                    v,
                    "remove",
                    moved(base, removed) / n_keys,
                    1 / 10,
                    stray(base, removed, rm_node),
                )
            )
            del base, added, removed
        exact = max(d.shares().values()) * len(NODES)
        print(f"   {v:>6}{row['dcoord']:>10.3f}{exact:>10.3f}{row['uhashring']:>11.3f}")
    print("   (exact: dcoord's share of the hash space, i.e. the limit for infinitely many keys)\n")

    print(f"3. keys moved: add {add_node} (ideal 1/11) / remove {rm_node} (ideal 1/10)")
    print(
        f"   {'library':<10}{'vnodes':>6}  {'change':<7}{'moved':>9}{'ideal':>9}"
        f"{'ratio':>7}{'stray':>7}"
    )
    for lib, v, what, frac, ideal, n_stray in movement:
        print(
            f"   {lib:<10}{v:>6}  {what:<7}{frac:>9.4f}{ideal:>9.4f}"
            f"{frac / ideal:>7.3f}{n_stray:>7}"
        )
    print("   stray = keys that moved between two nodes that did not change (0 = minimal)")
    # The moved fraction is the changed node's share, so it varies with the node's name;
    # show the spread over candidate names instead of trusting one draw.
    d = HashRing(NODES, vnodes=160)
    add_shares = [d.with_node(f"extra-{i}").shares()[f"extra-{i}"] * 11 for i in range(20)]
    rm_shares = [s * 10 for s in d.shares().values()]
    print(
        f"   dcoord vnodes=160, ratio over node names: adding one of 20 candidates "
        f"{min(add_shares):.3f}..{max(add_shares):.3f}, removing one of the 10 "
        f"{min(rm_shares):.3f}..{max(rm_shares):.3f}\n"
    )

    # -- 4. bounded load -----------------------------------------------------------------
    print(f"4. bounded load (assign), {n_keys:,} keys")
    print(f"   {'vnodes':>6}{'c':>6}{'max/mean':>10}{'cap/mean':>10}{'off-ring':>10}{'seconds':>9}")
    for v, c in ((40, 1.25), (160, 1.25), (40, PLOT_CAPACITY), (160, 1.05)):
        d = HashRing(NODES, vnodes=v)
        t = time.perf_counter()
        placed = d.assign(keys, capacity=c)
        secs = time.perf_counter() - t
        mm, bl = max_mean(list(placed.values()), NODES)
        if (v, c) == (40, PLOT_CAPACITY):
            loads[f"dcoord v{v} bounded c={c}"] = bl
        cap = math.ceil(c * n_keys / len(NODES))
        off = sum(1 for k, node in placed.items() if d.node_for(k) != node) / n_keys
        mean = n_keys / len(NODES)
        print(f"   {v:>6}{c:>6}{mm:>10.3f}{cap / mean:>10.3f}{off:>10.4f}{secs:>9.2f}")
        del placed
    print("   off-ring = fraction of keys not on their plain node_for node\n")

    if args.png:
        _plot(loads, args.png, n_keys)
    print(f"total {time.perf_counter() - started:.1f} s")
    return 0


def builds(sizes: Sequence[int]) -> None:
    """Print build and ``with_node`` times of rings of ``sizes`` nodes x 160 vnodes."""
    print(f"machine: {platform.machine()}, {_cpus()} CPUs, Python {platform.python_version()}")
    print("HashRing build, 160 vnodes per node: CPU ms, median (min-max) of rounds")
    print(f"   {'nodes':>6}{'points':>9}  {'uncached':<22}{'cached':<22}with_node")
    for n in sizes:
        nodes = [f"member-{i}" for i in range(n)]

        def uncached(nodes: list[str] = nodes) -> HashRing:
            # (The cache's former name too: the bench also runs against older versions.)
            for cache in ("_node_keys", "_node_points"):
                getattr(getattr(ring_module, cache, None), "cache_clear", lambda: None)()
            return HashRing(nodes)

        rounds = 7 if n <= 1000 else 3
        cold = _cpu_times(uncached, rounds)
        warm = _cpu_times(lambda nodes=nodes: HashRing(nodes), rounds)  # type: ignore[misc]
        ring = HashRing(nodes)
        add = _cpu_times(lambda ring=ring: ring.with_node("joiner"), rounds)  # type: ignore[misc]
        print(f"   {n:>6}{n * 160:>9,}  {_ms(cold):<22}{_ms(warm):<22}{_ms(add)}")


def _cpu_times(fn: Callable[[], object], rounds: int) -> list[float]:
    """CPU seconds of this process for each of ``rounds`` calls of ``fn``. What a call
    returns is dropped after the clock stops: freeing the ring built before is not part
    of building this one."""
    times = []
    for _ in range(rounds):
        gc.collect()
        started = time.process_time()
        result = fn()
        times.append(time.process_time() - started)
        del result
    return times


def _ms(times: Sequence[float]) -> str:
    """Median and range in ms, e.g. ``41.2 (39.8-47.0)``."""
    return f"{statistics.median(times) * 1e3:.1f} ({min(times) * 1e3:.1f}-{max(times) * 1e3:.1f})"


def _best(fn: Callable[[], object], n: int = 5) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "?"


def _plot(loads: dict[str, dict[str, float]], path: Path, n_keys: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: {path} not written")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    panels = [
        ("dcoord (mmh3)", [k for k in loads if k.startswith("dcoord")]),
        ("uhashring (md5, defaults)", [k for k in loads if k.startswith("uhashring")]),
    ]
    width = 0.8 / max(len(series) for _, series in panels)
    for ax, (title, series) in zip(axes, panels, strict=True):
        for j, name in enumerate(series):
            xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(NODES))]
            label = name.split(" ", 1)[1].replace("v", "vnodes=", 1)
            ax.bar(xs, [loads[name][n] for n in NODES], width, label=label)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(PLOT_CAPACITY, color="grey", linewidth=0.8, linestyle="--")
        ax.set_title(title)
        ax.set_xticks(range(len(NODES)), [n.removeprefix("node-") for n in NODES])
        ax.set_xlabel("node")
        ax.legend(fontsize=8, loc="upper center", ncol=2)
    axes[0].set_ylabel("keys / mean")
    axes[0].set_ylim(0.6, 1.5)
    fig.suptitle(
        f"Load per node, 10 nodes, {n_keys:,} keys (dashed: bounded-load cap c={PLOT_CAPACITY})"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
