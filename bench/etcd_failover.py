"""Benchmark how fast a client follows an etcd leader failover (three members).

    python bench/etcd_failover.py [--rounds N] [--request-timeout S] [--servers processes]

The cluster is started by this script (tests.topologies.etcd) and stopped at the end.
Each round kills (SIGKILL) or pauses (SIGSTOP) the current leader while the client talks
to the leader itself or to a follower, and measures the time from the fault until a
fenced ``admit`` answers again; the member is restarted (or resumed) before the next.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dcoord  # noqa: E402
from tests.servers import HOST  # noqa: E402
from tests.topologies.etcd import EtcdCluster  # noqa: E402


def follow_time(cluster: EtcdCluster, client: dcoord.Client, fault: str, on_leader: bool) -> float:
    """One round: seconds from the fault until the client's fenced admit answers."""
    fence = client.fence("bench")
    leader = cluster.leader()
    member = leader if on_leader else next(m for m in cluster.members if m is not leader)
    # The client picks a member at random; a round needs a known one.
    client.backend.etcd._current_endpoint_label = f"{HOST}:{member.port}"  # type: ignore[attr-defined]
    token = int(time.time_ns())
    assert fence.admit(token)
    if fault == "kill":
        cluster.kill_leader()
    else:
        cluster.pause_leader()
    started = time.monotonic()
    while True:
        try:
            fence.admit(token + 1)
            took = time.monotonic() - started
            break
        except dcoord.BackendUnavailable:
            continue  # the call already waited its request_timeout
    cluster.heal()
    cluster.leader()
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--request-timeout", type=float, default=5.0)
    parser.add_argument("--servers", choices=("containers", "processes"), default=None)
    args = parser.parse_args()
    with EtcdCluster(args.servers) as cluster:
        cluster.start()
        url = f"{cluster.url}?request_timeout={args.request_timeout:g}"
        with dcoord.connect(url, namespace="bench-failover") as client:
            print(f"etcd, three members; request_timeout {args.request_timeout:g} s")
            for fault in ("kill", "pause"):
                for on_leader in (True, False):
                    times = [
                        follow_time(cluster, client, fault, on_leader) for _ in range(args.rounds)
                    ]
                    where = "leader" if on_leader else "a follower"
                    print(
                        f"{fault:5} the leader, client on {where:10}: median "
                        f"{statistics.median(times):.2f} s, max {max(times):.2f} s "
                        f"({args.rounds} rounds)",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
