"""Membership latencies on a real server: join, read, and how fast a change reaches a
live ring in another client (notification), including an expiry nobody reads.

    python -m bench.membership redis://127.0.0.1:6379   (or etcd://..., memory://)
"""

from __future__ import annotations

import statistics
import sys
import time
import uuid

import dcoord


def _ms(samples: list[float]) -> str:
    samples = sorted(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return f"median {statistics.median(samples) * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms"


def main(url: str, rounds: int = 200) -> None:
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    with (
        dcoord.connect(url, namespace=namespace) as a,
        dcoord.connect(url, namespace=namespace) as b,
    ):
        group, observer = a.group("bench"), b.group("bench")
        ring = observer.ring()
        joins, reads, seen_join, seen_leave = [], [], [], []
        for i in range(rounds):
            started = time.perf_counter()
            member = group.join(f"m{i}", ttl=30)
            joins.append(time.perf_counter() - started)
            assert ring.wait_for(lambda r, i=i: f"m{i}" in r, 10)
            seen_join.append(time.perf_counter() - started)
            started = time.perf_counter()
            observer.members()
            reads.append(time.perf_counter() - started)
            started = time.perf_counter()
            member.leave()
            assert ring.wait_for(lambda r, i=i: f"m{i}" not in r, 10)
            seen_leave.append(time.perf_counter() - started)
        print(f"{url}: {rounds} rounds, 2 clients in one process")
        print(f"  join                        {_ms(joins)}")
        print(f"  read members                {_ms(reads)}")
        print(f"  join seen by a live ring    {_ms(seen_join)}")
        print(f"  leave seen by a live ring   {_ms(seen_leave)}")
        ttl = 2.0 if url.startswith("etcd") else 1.0
        late = []
        for i in range(3):
            with dcoord.connect(url, namespace=namespace) as dying:
                member = dying.group("bench").join(f"dead{i}", ttl=ttl)
                assert ring.wait_for(lambda r, i=i: f"dead{i}" in r, 10)
                dying.scheduler.close()  # no more heart-beats or keep-alives
                stopped = time.perf_counter()
                assert ring.wait_for(lambda r, i=i: f"dead{i}" not in r, ttl + 10)
                late.append(time.perf_counter() - stopped - member.ttl)
        print(f"  expiry seen after its ttl   {', '.join(f'{x * 1000:+.0f} ms' for x in late)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "memory://")
