"""Benchmark the 2PC log at scale: bytes per record, the first page of a listing and
``recover()`` with a small log and with a log of a million finished records.

    python bench/scale_txlog.py [--records N] [--etcd-records N] [--repeat R] [--quick]

Starts its own Redis (no AOF, so that the bulk load is quick; memory is the same) and
etcd (tests.servers) and stops them at the end, which deletes the bulk records.

* bytes per record: 2,000 transactions of 3 participants run through a coordinator to
  ``committed``; Redis: growth of ``used_memory`` per record (record, its entries in the
  state index and the expiry index) and MEMORY USAGE of one record key; etcd: growth of
  the database size per record (an upper bound: etcd's bbolt file grows in pages and
  keeps old revisions until compaction).
* the bulk: N finished (``committed``) records written straight in the store's layout
  with pipelines (Redis) or batched transactions (etcd: records, entries and their time
  buckets' markers, 1,000 records per second of creation time), plus 100 unfinished
  (``started``, deadline in an hour) through the store's own create.
* for a log of 1,000 and of N records: the median over R runs of the first page (50
  records) oldest first, newest first, of the ``committed`` state and of the ``started``
  state (100 records among N), a page deep in the log by its cursor, and ``recover()``
  (which reads the 100 unfinished records and finds them pending).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dcoord
from dcoord import txlog
from dcoord.backends.redis.slots import bucket
from dcoord.txlog import TxRecord
from tests.servers import Server, start_server

PAGE = 50
UNFINISHED = 100
PARTICIPANTS = ("p1", "p2", "p3")
SMALL = 1_000


class NullParticipant:
    """Votes yes and does nothing."""

    def __init__(self, name: str) -> None:
        self.name = name

    def prepare(self, txid: str, payload: Any) -> bool:
        return True

    def commit(self, txid: str) -> None:
        pass

    def abort(self, txid: str) -> None:
        pass


def coordinator(client: dcoord.Client, **options: Any) -> dcoord.Coordinator:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dcoord.DurabilityWarning)
        return client.coordinator([NullParticipant(p) for p in PARTICIPANTS], **options)


def finished(txid: str, created: float) -> TxRecord:
    """A committed record of 3 participants, as the coordinator leaves it."""
    payloads = {p: {"amount": 10} for p in PARTICIPANTS}
    record = txlog.new_record(txid, payloads, now=created, timeout=30, coordinator="bench:1")
    record = txlog.decide(record, "committed", now=created + 0.01)
    return txlog.acknowledge(record, PARTICIPANTS)


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


# -- bulk loads ---------------------------------------------------------------------


def load_redis(client: dcoord.Client, start: int, count: int, now: float) -> None:
    log: Any = client.backend.txlog
    redis = client.backend.redis  # type: ignore[attr-defined]
    batch = 5_000
    for first in range(start, start + count, batch):
        pipe = redis.pipeline(transaction=False)
        for i in range(first, min(first + batch, start + count)):
            txid = f"bulk-{i:08d}"
            created = now - 3_000 + i * 1e-3
            number = bucket(txid)
            pipe.set(log.record_key(txid), txlog.encode(finished(txid, created)), px=3_600_000)
            pipe.zadd(log.state_key(number, "committed"), {txid: created})
            done = log.state_key(number, "committed").rsplit(":s:", 1)[0] + ":done"
            pipe.zadd(done, {txid: (now + 3_600) * 1000})
        pipe.execute()


def load_etcd(client: dcoord.Client, start: int, count: int, now: float) -> None:
    from pyetcd import transactions as ops

    layout = client.backend.txlog.layout  # type: ignore[attr-defined]
    etcd = client.backend.etcd  # type: ignore[attr-defined]
    batch = 50  # two keys each, plus the few bucket markers: etcd's 128 operations
    for first in range(start, start + count, batch):
        puts = []
        markers: set[str] = set()  # a transaction may not put one key twice
        for i in range(first, min(first + batch, start + count)):
            txid = f"bulk-{i:08d}"
            created = now - 3_000 + i * 1e-3
            puts.append(ops.Put(layout.records + txid, txlog.encode(finished(txid, created))))
            puts.append(ops.Put(layout.entry("committed", created, txid), b""))
            markers.update(layout.bucket_markers("committed", created))
        puts += [ops.Put(key, b"") for key in sorted(markers)]
        etcd.transaction(compare=[], success=puts, failure=[])


def load_memory(client: dcoord.Client, start: int, count: int, now: float) -> None:
    store = client.backend.txlog
    for i in range(start, start + count):
        txid = f"bulk-{i:08d}"
        record = finished(txid, now - 3_000 + i * 1e-3)
        entry = store.create(txid, b"{}", record.deadline, record.created)
        assert entry is not None
        store.cas(
            txid,
            entry,
            txlog.encode(record),
            finished=True,
            retention=3_600,
            state="committed",
            created=record.created,
        )


LOADERS = {"memory": load_memory, "redis": load_redis, "etcd": load_etcd}


# -- measurements -------------------------------------------------------------------


def bytes_per_record(client: dcoord.Client, kind: str) -> str:
    coord = coordinator(client)

    def size() -> int:
        if kind == "redis":
            return int(client.backend.redis.info("memory")["used_memory"])  # type: ignore[attr-defined]
        return int(client.backend.etcd.status().db_size)  # type: ignore[attr-defined]

    before = size()
    txids = []
    for _ in range(2_000):
        with coord.transaction() as tx:
            for p in PARTICIPANTS:
                tx.enlist(p, {"amount": 10})
        txids.append(tx.txid)
    coord.close()  # the background "done" writes are in
    grown = (size() - before) / 2_000
    if kind == "etcd":
        return f"etcd: {grown:.0f} bytes/record of db size (2,000 committed records)"
    key = client.backend.txlog.record_key(txids[0])  # type: ignore[attr-defined]
    usage = client.backend.redis.memory_usage(key)  # type: ignore[attr-defined]
    return (
        f"redis: {grown:.0f} bytes/record of used_memory (2,000 committed records, "
        f"indexes included); MEMORY USAGE of one record key: {usage} bytes"
    )


def measure(client: dcoord.Client, repeat: int) -> dict[str, float]:
    coord = coordinator(client)
    deep = coord.transactions(limit=PAGE, newest_first=True)
    for _ in range(3):  # a few pages in: the cost must not grow with the position either
        deep = coord.transactions(limit=PAGE, cursor=deep.cursor, newest_first=True)
    cursor = deep.cursor
    found = {
        "first page, oldest first": median_ms(lambda: coord.transactions(limit=PAGE), repeat),
        "first page, newest first": median_ms(
            lambda: coord.transactions(limit=PAGE, newest_first=True), repeat
        ),
        "first page of committed": median_ms(
            lambda: coord.transactions("committed", limit=PAGE), repeat
        ),
        "first page of started": median_ms(
            lambda: coord.transactions("started", limit=PAGE), repeat
        ),
        "5th page by cursor, newest first": median_ms(
            lambda: coord.transactions(limit=PAGE, cursor=cursor, newest_first=True), repeat
        ),
    }
    report = coord.recover()
    assert len(report.pending) == UNFINISHED, report
    found[f"recover() ({UNFINISHED} unfinished)"] = median_ms(coord.recover, repeat)
    return found


def run(kind: str, url: str, records: int, repeat: int) -> None:
    print(f"\n== {kind}: log of {SMALL:,} vs {records:,} finished records")
    if kind != "memory":
        with dcoord.connect(url, namespace=f"b{uuid.uuid4().hex[:8]}") as client:
            print("  " + bytes_per_record(client, kind))
    with dcoord.connect(url, namespace=f"b{uuid.uuid4().hex[:8]}") as client:
        now = time.time()
        store = client.backend.txlog
        for i in range(UNFINISHED):
            record = txlog.new_record(
                f"open-{i:04d}", {p: None for p in PARTICIPANTS}, now=now - 1_500, timeout=5_000
            )
            store.create(record.txid, txlog.encode(record), record.deadline, record.created)
        start = time.perf_counter()
        LOADERS[kind](client, 0, SMALL, now)
        small = measure(client, repeat)
        LOADERS[kind](client, SMALL, records - SMALL, now)
        loaded = time.perf_counter() - start
        print(f"  loaded {records:,} records in {loaded:.0f} s")
        large = measure(client, repeat)
    print(f"  {'median of ' + str(repeat) + ' runs, ms':<36} {SMALL:>9,} {records:>11,}  ratio")
    for name, small_ms in small.items():
        print(f"  {name:<36} {small_ms:9.2f} {large[name]:11.2f}  {large[name] / small_ms:5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000, help="Redis and memory")
    parser.add_argument("--etcd-records", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="20,000 records, 3 runs")
    parser.add_argument("--backends", default="memory,redis,etcd", help="comma-separated")
    args = parser.parse_args()
    if args.quick:
        args.records = args.etcd_records = 20_000
        args.repeat = 3
    print(
        f"dcoord {dcoord.__version__} txlog scale benchmark: Python "
        f"{platform.python_version()}, {os.cpu_count()} cores; page {PAGE} records"
    )
    backends = args.backends.split(",")
    servers: list[Server] = []
    try:
        if "memory" in backends:
            run("memory", "memory://", args.records, args.repeat)
        if "redis" in backends:
            servers.append(start_server("redis", persistent=False))
            run("redis", servers[-1].url, args.records, args.repeat)
        if "etcd" in backends:
            servers.append(start_server("etcd"))
            run("etcd", servers[-1].url, args.etcd_records, args.repeat)
    finally:
        for server in servers:
            server.stop()


if __name__ == "__main__":
    main()
