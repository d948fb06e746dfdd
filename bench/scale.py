"""Ring and membership at scale: HashRing build time, a live ring's CPU per change, expiry.

    python -m bench.scale [URL ...] [--members 10,100,1000,5000] [--restart 200]
                          [--expiry 1000] [--kill 100] [--ttl 5] [--followers 3] [--json PATH]
    python -m bench.scale [SERVER URL ...] --curves 10,100,1000,5000 [--restart 200] [--json PATH]

1. ``HashRing`` of N nodes x 160 vnodes, built from scratch (points not cached: every
   virtual node hashed) and again (points cached per node), and one node added to it
   with ``with_node`` - best of a few rounds each.
2. For each URL (default ``memory://``) and N: N members join a group (one client, ttl 30 s),
   a second client follows the group with a live ring, then a *rolling restart* makes
   ``--restart`` members leave and join again one after the other (2 changes each,
   paced so that the follower sees them one by one, as in a real rolling restart),
   again as one *burst* without pacing (the follower may coalesce), and paced again as
   a *replace*: each member replaced by one of a new id (pods of a new name), whose
   join a live ring cannot serve by stepping back to its ring before the leave; each
   ended by one marker member joining. Reported: the CPU time (the scheduler's, from /proc) of the
   follower's thread per membership change (epochs advanced, the marker included), and
   whether the ring ended equal to a ring built from scratch.
3. For each URL, a *burst of joins*: ``--burst`` members join as fast as one client can
   into a group nobody follows (the baseline), into one followed by a live ring in a
   second client (of this process: it competes for the GIL, as a ring in another
   process would not), and into one followed by a live ring in the joining client too.
   Reported: joins per second, and the seconds from the last join's return until each
   ring has them all.
4. For each server URL (not ``memory://``: its store lives in one process), *expiry at
   scale*: ``--expiry`` members (ttl ``--ttl``) joined by child processes of 100 members
   each, followed by ``--followers`` live rings (one client each, in this process); the
   children holding ``--kill`` of them are SIGKILLed at once. Reported: the seconds from
   the kill until every follower's ring has dropped all of them (the slowest follower;
   the bound is the TTL plus the time an expiry takes to be noticed), the ring updates
   the followers made meanwhile (views delivered, each one incremental
   ``with_changes``) against the epochs the group advanced by, their CPU, and whether
   every ring ended equal to a ring built from scratch.

``--curves SIZES`` runs only this, per size and server URL (with none given: on a Redis
and an etcd it starts as local processes and stops by their PID at the end): one client
joins N members (ttl 30 s) as fast as it can (the *join rate*), a *second process*
follows the group with a live ring, and the client restarts ``--restart`` members one
after the other as above. *Change-to-ring latency*: from a change's return in the
changing client to the first moment the live ring of the other process shows it (or a
later change: a coalesced one), both read from the machine's monotonic clock; p50 and
p99 over the restart's changes. *Follower CPU per change*: that process's follower
thread, as in 2. The second process stops by itself once it has seen every change (or
after WATCH_LIMIT seconds). ``bench/plot.py curves`` draws the rows.

Numbers depend on the machine's load; the machine these were taken on is shared, so run
it twice and compare. A text table is printed (no plotting dependency); ``--json PATH``
also writes the figures there, for ``bench/plot.py``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
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


def builds(sizes: list[int]) -> list[dict[str, float]]:
    print("1. HashRing build, 160 vnodes per node (best of rounds, ms)")
    print(f"   {'nodes':>6}{'points':>9}{'uncached':>10}{'cached':>9}{'with_node':>11}")
    rows = []
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
        rows.append({"nodes": n, "uncached_ms": cold * 1e3, "cached_ms": warm * 1e3,
                     "with_node_ms": add * 1e3})  # fmt: skip
    print()
    return rows


def _thread_cpu(thread: threading.Thread) -> float:
    """CPU seconds of ``thread`` so far, from /proc (Linux): the scheduler's run time in
    ns (schedstat), or where the kernel keeps none, user + system in clock ticks (10 ms:
    too coarse for a change's fraction of a millisecond but over hundreds of them)."""
    task = f"/proc/self/task/{thread.native_id}"
    try:
        with open(f"{task}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    with open(f"{task}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def follower(url: str, n: int, restart: int) -> list[dict[str, object]]:
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
        for mode, pace in (("rolling", PACE), ("burst", 0.0), ("replace", PACE)):
            epoch, cpu, started = live.epoch, _thread_cpu(thread), time.perf_counter()
            for i in range(min(restart, n)):
                member_id = f"m{i}"
                joined.pop(member_id).leave()
                time.sleep(pace)  # a restarting process is away for a moment
                if mode == "replace":
                    member_id = f"m{i}-new"
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
                f"   {url.split('://')[0]:<8}{n:>7}{mode:>9}{changes:>9}{wall:>8.1f}"
                f"{spent:>9.2f}{per:>12.3f}  {'yes' if exact else 'NO'}"
            )
        live.close()
    return [
        {"backend": url.split("://")[0], "members": n, "mode": mode, "changes": changes,
         "cpu_s": spent, "ms_per_change": spent / max(changes, 1) * 1e3, "exact": exact}
        for mode, changes, _, spent, exact in results
    ]  # fmt: skip


def burst(url: str, n: int, rounds: int = 1) -> None:
    """Joins/s of one client joining ``n`` members with no ring following the group, with
    a ring in another client of this process, and with a ring in the joining client too;
    and how soon after the last join each ring has them all. ``rounds`` > 1 repeats the
    three in alternating order (the machine's load drifts) and prints the median ratio
    of the joining client's rate with its own ring to its rate with none."""
    ratios = []
    with (
        dcoord.connect(url, namespace=f"bench-{uuid.uuid4().hex[:8]}") as joiner,
        dcoord.connect(url, namespace=joiner.namespace) as other,
    ):
        for r in range(rounds):
            rates = {}
            modes = (("none", 0), ("alone", 1), ("local", 2))
            for name, followers in modes if r % 2 == 0 else modes[::-1]:
                name = f"{name}-{r}"
                rings = [other.group(name).ring(), joiner.group(name).ring()][:followers]
                group = joiner.group(name)
                started = time.perf_counter()
                for i in range(n):
                    group.join(f"b{i}", ttl=60)
                ended = time.perf_counter()
                rates[followers] = rate = n / (ended - started)
                seen = []
                for ring in rings:
                    assert ring.wait_for(lambda r: len(r) == n, 120), f"ring saw {len(ring)}"
                    seen.append(time.perf_counter() - ended)
                where = ("none", "other client only", "this client too")[followers]
                times = "".join(f"{s:>10.3f}" for s in seen)
                print(f"   {url.split('://')[0]:<8}{n:>7}  {where:<18}{rate:>9.0f}{times}")
                for ring in rings:
                    ring.close()
            ratios.append(rates[2] / rates[0])
    if rounds > 1:
        print(
            f"   joins/s with this client's own ring / with none: median "
            f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}), "
            f"{rounds} rounds"
        )


PER_CHILD = 100  # members per child process of the expiry run


def child(url: str, namespace: str, name: str, first: int, count: int, ttl: float) -> None:
    """Join members ``m<first>``... (kept alive by this process's heart-beats), say
    ``ready``, and leave them when stdin closes (or die by SIGKILL, unannounced)."""
    with dcoord.connect(url, namespace=namespace) as client:
        group = client.group(name)
        for i in range(first, first + count):
            group.join(f"m{i}", ttl=ttl)
        print("ready", flush=True)
        sys.stdin.read()


def expiry(url: str, n: int, killed: int, ttl: float, followers: int) -> None:
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    name = "expiry"
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "bench.scale", url, "--child", namespace, name]
    children = [
        subprocess.Popen(
            [*command, str(first), str(min(PER_CHILD, n - first)), str(ttl)],
            cwd=root,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for first in range(0, n, PER_CHILD)
    ]
    clients = [dcoord.connect(url, namespace=namespace) for _ in range(followers)]
    try:
        for proc in children:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        rings, views = [], []
        for client in clients:
            group = client.group(name)
            rings.append(group.ring())
            seen: list[int] = []
            views.append(seen)
            group.watch(lambda view, seen=seen: seen.append(view.epoch))
        for ring in rings:
            assert ring.wait_for(lambda r: len(r) == n, 60), f"ring saw {len(ring)} of {n}"
        victims = children[: killed // PER_CHILD]
        gone = {f"m{i}" for i in range(len(victims) * PER_CHILD)}
        threads = [t for t in threading.enumerate() if t.name == f"dcoord-follow-{name}"]
        cpu = sum(_thread_cpu(t) for t in threads)
        epochs = [ring.epoch for ring in rings]
        counts = [len(seen) for seen in views]
        killed_at = time.monotonic()
        for proc in victims:
            os.kill(proc.pid, signal.SIGKILL)
        done = []
        for ring in rings:
            assert ring.wait_for(lambda r: not gone & set(r.members), ttl + 60), "not dropped"
            done.append(time.monotonic() - killed_at)
        cpu = sum(_thread_cpu(t) for t in threads) - cpu
        updates = sum(len(seen) - c for seen, c in zip(views, counts, strict=True))
        advanced = sum(ring.epoch - e for ring, e in zip(rings, epochs, strict=True))
        exact = all(r.ring == HashRing(r.members.weights()) for r in rings)
        print(
            f"   {url.split('://')[0]:<8}{n:>7}{len(gone):>7}{ttl:>6g}{max(done):>9.2f}"
            f"{max(done) - ttl:>10.2f}{updates / followers:>9.1f}{advanced / followers:>8.1f}"
            f"{cpu / followers * 1e3:>10.1f}  {'yes' if exact else 'NO'}"
        )
    finally:
        for client in clients:
            client.close()
        for proc in children:
            if proc.poll() is None:
                assert proc.stdin is not None
                proc.stdin.close()  # the survivors leave
        for proc in children:
            proc.wait(timeout=60)


WATCH_LIMIT = 300.0  # seconds a watcher process follows before it gives up by itself


def _restart_event_seen(view: dcoord.GroupView, j: int) -> bool:
    """Whether ``view`` shows change ``j`` of a rolling restart (or a later one): change
    2i is ``m<i>`` leaving, 2i + 1 it joining again with meta ``{"seq": 2i + 1}``."""
    member = view.get(f"m{j // 2}")
    seq = -1 if member is None else member.meta.get("seq", -1)
    return (member is None or seq > j) if j % 2 == 0 else seq >= j


def watcher(url: str, namespace: str, name: str, n: int, changes: int) -> None:
    """Follow the group with a live ring in this process; say ``ready`` once it has
    ``n`` members, then print as JSON the monotonic time at which the ring first showed
    each of the ``changes`` changes of the rolling restart (a coalesced change: when a
    later one showed), its follower thread's CPU and the epochs it advanced by. Gives
    up by itself after WATCH_LIMIT seconds."""
    deadline = time.monotonic() + WATCH_LIMIT
    with dcoord.connect(url, namespace=namespace) as client:
        live = client.group(name).ring()
        assert live.wait_for(lambda r: len(r) == n, 120), f"ring saw {len(live)} of {n}"
        thread = next(t for t in threading.enumerate() if t.name == f"dcoord-follow-{name}")
        epoch, cpu = live.epoch, _thread_cpu(thread)
        print("ready", flush=True)
        seen: list[float] = []
        last = live.epoch
        while len(seen) < changes and time.monotonic() < deadline:
            if not live.wait_for(lambda r, e=last: r.epoch != e, deadline - time.monotonic()):
                break
            now, view = time.monotonic(), live.members
            last = view.epoch
            while len(seen) < changes and _restart_event_seen(view, len(seen)):
                seen.append(now)
        report = {
            "seen": seen,
            "cpu_s": _thread_cpu(thread) - cpu,
            "changes": live.epoch - epoch,
            "exact": live.ring == HashRing(live.members.weights()),
        }
        print(json.dumps(report), flush=True)
        live.close()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def curve_point(url: str, n: int, restart: int) -> dict[str, object]:
    """One size of the curves: join rate of one client, then a rolling restart of
    ``restart`` members watched by a live ring in a second process (see watcher())."""
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    name = "curve"
    restart = min(restart, n)
    root = Path(__file__).resolve().parents[1]
    with dcoord.connect(url, namespace=namespace) as members:
        group = members.group(name)
        started = time.perf_counter()
        joined = {f"m{i}": group.join(f"m{i}", ttl=30) for i in range(n)}
        rate = n / (time.perf_counter() - started)
        command = [sys.executable, "-m", "bench.scale", url, "--watcher", namespace, name]
        proc = subprocess.Popen(
            [*command, str(n), str(2 * restart)],
            cwd=root,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
            returned = []
            for i in range(restart):
                member_id = f"m{i}"
                joined[member_id].leave()
                returned.append(time.monotonic())
                time.sleep(PACE)  # a restarting process is away for a moment
                joined[member_id] = group.join(member_id, ttl=30, meta={"seq": 2 * i + 1})
                returned.append(time.monotonic())
                time.sleep(PACE)
            report = json.loads(proc.stdout.readline() or "{}")
            proc.wait(timeout=WATCH_LIMIT)
        finally:
            if proc.poll() is None:  # it stops by itself; this is for a bench that failed
                proc.kill()
                proc.wait()
    seen = report.get("seen", [])
    assert len(seen) == len(returned), f"watcher saw {len(seen)} of {len(returned)} changes"
    latency = [(t - r) * 1e3 for t, r in zip(seen, returned, strict=True)]
    row = {
        "backend": url.split("://")[0],
        "members": n,
        "join_per_s": rate,
        "latency_p50_ms": _percentile(latency, 0.5),
        "latency_p99_ms": _percentile(latency, 0.99),
        "latency_max_ms": max(latency),
        "changes": report["changes"],
        "cpu_ms_per_change": report["cpu_s"] / max(report["changes"], 1) * 1e3,
        "exact": report["exact"],
    }
    print(
        f"   {row['backend']:<8}{n:>7}{rate:>9.0f}{row['latency_p50_ms']:>9.1f}"
        f"{row['latency_p99_ms']:>9.1f}{row['latency_max_ms']:>9.1f}{report['changes']:>9}"
        f"{row['cpu_ms_per_change']:>12.3f}  {'yes' if row['exact'] else 'NO'}",
        flush=True,
    )
    return row


def curves(urls: list[str], sizes: list[int], restart: int) -> list[dict[str, object]]:
    """The curves over group sizes, on each server URL (or on a Redis and an etcd
    started here, and stopped by their PID, when none is given)."""
    from tests.servers import Server, start_server

    started: list[Server] = []
    try:
        if not urls:
            started = [start_server(kind, using="processes") for kind in ("redis", "etcd")]
            urls = [server.url for server in started]
        print(
            f"curves: join rate, change-to-ring latency in a second process, restarting {restart}"
        )
        print(
            f"   {'backend':<8}{'members':>7}{'joins/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
            f"{'max ms':>9}{'changes':>9}{'ms cpu/chg':>12}  ring exact"
        )
        return [curve_point(url, n, restart) for url in urls for n in sizes]
    finally:
        for server in started:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("urls", nargs="*", default=["memory://"])
    ap.add_argument("--members", default="10,100,1000,5000", help="group sizes, comma-separated")
    ap.add_argument("--builds", default="10,100,500,1000,2000,5000", help="ring sizes")
    ap.add_argument("--restart", type=int, default=200, help="members restarted (2 changes each)")
    ap.add_argument("--burst", type=int, default=1000, help="members of the join burst (0: none)")
    ap.add_argument("--burst-rounds", type=int, default=1, help="rounds of the burst")
    ap.add_argument("--expiry", type=int, default=1000, help="members of the expiry run (0: none)")
    ap.add_argument("--kill", type=int, default=100, help="of which SIGKILLed (x 100)")
    ap.add_argument("--ttl", type=float, default=5.0, help="their ttl")
    ap.add_argument("--followers", type=int, default=3, help="live rings following them")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--watcher", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--curves", help="only the curves, at these group sizes (comma-separated)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    if args.child:
        namespace, name, first, count, ttl = args.child
        child(args.urls[0], namespace, name, int(first), int(count), float(ttl))
        return 0
    if args.watcher:
        namespace, name, n, changes = args.watcher
        watcher(args.urls[0], namespace, name, int(n), int(changes))
        return 0
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, load average {os.getloadavg()[0]:.2f}\n"
    )
    if args.curves:
        servers = [url for url in args.urls if not url.startswith("memory:")]
        sizes = [int(x) for x in args.curves.split(",")]
        rows = curves(servers, sizes, args.restart)
        print(f"load average at the end {os.getloadavg()[0]:.2f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"curves": rows}, f, indent=1)
        return 0
    rows = builds([int(x) for x in args.builds.split(",") if x])
    print(f"2. live ring follower: CPU of its thread per change, restarting {args.restart}")
    print(
        f"   {'backend':<8}{'members':>7}{'mode':>9}{'changes':>9}{'wall s':>8}"
        f"{'cpu s':>9}{'ms/change':>12}  ring exact"
    )
    followers = [
        row
        for url in args.urls
        for n in (int(x) for x in args.members.split(",") if x)
        for row in follower(url, n, args.restart)
    ]
    if args.burst:
        print(f"\n3. a burst of {args.burst} joins by one client")
        print(
            f"   {'backend':<8}{'members':>7}  {'live rings in':<18}{'joins/s':>9}"
            f"{'other s':>10}{'this s':>10}  (s: after the last join)"
        )
        for url in args.urls:
            burst(url, args.burst, args.burst_rounds)
    servers = [url for url in args.urls if not url.startswith("memory:")]
    if args.expiry and servers:
        print(
            f"\n4. expiry: {args.kill} of {args.expiry} members SIGKILLed at once "
            f"({PER_CHILD} per process), {args.followers} followers"
        )
        print(
            f"   {'backend':<8}{'members':>7}{'killed':>7}{'ttl':>6}{'all gone':>9}"
            f"{'after ttl':>10}{'updates':>9}{'epochs':>8}{'cpu ms':>10}  ring exact"
        )
        print("   (updates, epochs, cpu: per follower)")
        for url in servers:
            expiry(url, args.expiry, args.kill, args.ttl, args.followers)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"builds": rows, "followers": followers}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
