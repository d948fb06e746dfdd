"""Benchmark a Redis Cluster of three primaries against one Redis primary, in one run.

    python bench/topologies.py [--quick] [--seconds S] [--processes N] [--threads T]
                               [--failovers K]

Starts a single redis server and a Cluster (tests/topologies/cluster.py: three primaries
with one replica each, the repository's redis.conf: AOF with appendfsync always) and
stops them at the end. On each it measures, with N client processes of T threads each
(every thread its own lock name, every process its own client):

* ``lock``: acquire + release cycles/s (two scripts per cycle);
* ``2pc``: commits/s of a coordinator with three participants that do nothing, so the
  number is the decision log's cost (``2pc-kv``: three KVParticipants adding to a key);

then how the keys and the script calls of the run spread over the Cluster's primaries,
and with ``--failovers K`` the follow time K times on a Cluster of its own: SIGKILL the
primary of a lock's slot, then acquire that lock in a loop through the same client
(kill -> first grant), the killed node restarted and the Cluster healthy in between.
Every server and client shares this machine's cores: on a small machine the Cluster
cannot show its scale-out, only what its routing costs; read the numbers with that.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dcoord
from dcoord.participants import KVParticipant
from tests.servers import Server, start_server
from tests.topologies.cluster import ClusterSet

PARTICIPANTS = ("p1", "p2", "p3")
WORKLOADS = ("lock", "2pc", "2pc-kv")


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


def _cycles(client: dcoord.Client, workload: str, worker: str) -> Callable[[], None]:
    """One unit of ``workload`` for thread ``worker``."""
    if workload == "lock":
        lock = client.lock(f"bench-{worker}", ttl=10)

        def cycle() -> None:
            lock.acquire()
            lock.release()

        return cycle
    parts: list[Any]
    if workload == "2pc-kv":
        parts = [KVParticipant(client, f"{n}-{worker}") for n in PARTICIPANTS]
    else:
        parts = [NullParticipant(n) for n in PARTICIPANTS]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dcoord.DurabilityWarning)
        coord = client.coordinator(participants=parts)
    names = [p.name for p in parts]

    def commit() -> None:
        tx = coord.begin(timeout=30)
        for name in names:
            tx.enlist(name, {"add": {"n": 1}} if workload == "2pc-kv" else None)
        tx.commit()

    return commit


def _process(
    url: str,
    namespace: str,
    workload: str,
    index: int,
    threads: int,
    seconds: float,
    start_at: float,
    out: Any,
) -> None:
    """One client process: ``threads`` threads run ``workload`` from ``start_at`` (wall
    clock, so every process starts together) for ``seconds``; puts (count, error)."""
    done = [0] * threads
    errors: list[str] = []
    with dcoord.connect(url, namespace=namespace) as client:
        try:
            cycles = [_cycles(client, workload, f"{index}-{t}") for t in range(threads)]
        except dcoord.DcoordError as exc:
            out.put((0, f"{type(exc).__name__}: {exc}"))
            return
        time.sleep(max(0.0, start_at - time.time()))
        stop = time.monotonic() + seconds

        def run(t: int) -> None:
            try:
                while time.monotonic() < stop:
                    cycles[t]()
                    done[t] += 1
            except dcoord.DcoordError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

        workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    out.put((sum(done), errors[0] if errors else None))


def measure(url: str, workload: str, processes: int, threads: int, seconds: float) -> str:
    """Units/s of ``workload`` with every process and thread at once, or why it failed."""
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    start_at = time.time() + 3.0  # spawning and connecting take a moment
    children = [
        context.Process(
            target=_process,
            args=(url, namespace, workload, i, threads, seconds, start_at, out),
        )
        for i in range(processes)
    ]
    for child in children:
        child.start()
    results = [out.get(timeout=seconds + 120) for _ in children]
    for child in children:
        child.join()
    problems = {error for _, error in results if error}
    if problems:
        return f"failed: {sorted(problems)[0][:150]}"
    return f"{sum(count for count, _ in results) / seconds:8.0f} /s"


def spread(cluster: ClusterSet) -> list[str]:
    """Per primary: its keys and the scripts (EVALSHA) it ran."""
    rows = []
    for node in cluster.live():
        admin = node.redis_admin()
        try:
            if admin.info("replication").get("role") != "master":
                continue
            calls = admin.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
            rows.append(f"  primary :{node.port}  keys {admin.dbsize():6d}  evalsha {calls:8d}")
        finally:
            admin.close()
    return rows


def follow_times(count: int) -> list[float]:
    """Seconds from killing the primary of a lock's slot to the next grant, ``count`` times."""
    cluster = ClusterSet(min_replicas_to_write=0)  # the promoted primary has no replica
    times = []
    try:
        cluster.start()
        with dcoord.connect(cluster.url, namespace="follow", request_timeout=2) as client:
            lock = client.lock("followed", ttl=2, timeout=1)
            for _ in range(count):
                with lock:
                    pass
                killed_at = time.monotonic()
                killed = cluster.kill_primary_of("{followed}")
                while True:
                    try:
                        with lock:
                            break
                    except dcoord.DcoordError:
                        if time.monotonic() - killed_at > 60:
                            raise
                times.append(time.monotonic() - killed_at)
                cluster.restart(killed)
                cluster.wait_healthy()
    finally:
        cluster.stop()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (about a minute)")
    parser.add_argument("--seconds", type=float, help="seconds per measurement")
    parser.add_argument("--processes", type=int, default=4, help="client processes")
    parser.add_argument("--threads", type=int, default=4, help="threads per client process")
    parser.add_argument("--failovers", type=int, default=0, help="follow-time measurements")
    args = parser.parse_args()
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    warnings.simplefilter("ignore", dcoord.DurabilityWarning)
    os.environ.setdefault("DCOORD_TEST_SERVERS", "processes")
    single: Server | None = None
    cluster = ClusterSet()
    try:
        single = start_server("redis")
        cluster.start()
        print(
            f"{os.cpu_count()} CPU(s); {args.processes} process(es) x {args.threads} thread(s)"
            f", {seconds:g} s each; single primary vs 3-primary Cluster (1 replica each)"
        )
        print(f"{'workload':10s} {'single':>14s} {'cluster':>14s}")
        for workload in WORKLOADS:
            row = [
                measure(url, workload, args.processes, args.threads, seconds)
                for url in (single.url, cluster.url)
            ]
            print(f"{workload:10s} {row[0]:>14s} {row[1]:>14s}")
        print("keys and script calls per Cluster primary after the run:")
        print("\n".join(spread(cluster)))
    finally:
        cluster.stop()
        if single is not None:
            single.stop()
    if args.failovers:
        times = sorted(follow_times(args.failovers))
        print(
            f"follow time after a primary kill ({len(times)} runs): "
            f"p50 {statistics.median(times):.2f} s, max {times[-1]:.2f} s "
            f"({', '.join(f'{t:.2f}' for t in times)})"
        )


if __name__ == "__main__":
    main()
