"""etcd only: the 2PC log's finished states are indexed in time buckets (see
dcoord/backends/etcd/txlog.py), so that a page never reads a range spanning the history.

Checked here: pages across buckets of every level (and across gaps) list every record
once, in order, by either API; no range a page reads holds more than one bucket of the
finished index; entries of the layout before the buckets stay listed, and leave it when
their record moves; bucket markers outlive the entries in their bucket.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from typing import Any

import pytest
from pyetcd import transactions as ops
from pyetcd.utils import prefix_range_end

import dcoord
import dcoord.aio
from dcoord import txlog
from dcoord.backends.etcd.txlog import LEVEL_DIGITS, EtcdTxLog, _sortable
from dcoord.txlog import TxRecord, TxState
from tests.conformance.test_txlog_paging import coordinator, walk, write

BASE = 1_700_000_000.0


@pytest.fixture
def etcd_client(servers: Any, namespace: str) -> Iterator[dcoord.Client]:
    """A client of the session's shared etcd."""
    client = dcoord.connect(str(servers.url("etcd")), namespace=namespace)
    yield client
    client.close()


@pytest.fixture
def spread_log(etcd_client: dcoord.Client) -> dict[str, TxRecord]:
    """40 records in every state, created in bursts within one second, seconds apart,
    minutes apart, hours and days apart, so pages cross buckets of every level."""
    rng = random.Random(16)
    offsets = [0.0, 0.25, 0.25, 0.5, 1.0, 3.0, 99.5, 100.0, 101.0, 250.0]
    offsets += [10_000.0 * k + rng.choice([0.0, 0.5, 40.0, 7_000.0]) for k in range(1, 16)]
    offsets += [86_400.0 * 3 + rng.uniform(0, 3) for _ in range(10)]
    offsets += [86_400.0 * 9 + 0.125 * k for k in range(5)]
    states = list(TxState) + [TxState.COMMITTED] * 3 + [TxState.ABORTED] * 2
    records = {}
    for i, offset in enumerate(offsets):
        txid = f"s{rng.randrange(10**6):06d}-{i:02d}"
        records[txid] = write(etcd_client, txid, BASE + offset, states[i % len(states)])
    return records


def in_order(records: dict[str, TxRecord], state: TxState | None = None) -> list[str]:
    chosen = [r for r in records.values() if state is None or r.state is state]
    return [r.txid for r in sorted(chosen, key=lambda r: (r.created, r.txid))]


@pytest.mark.parametrize("limit", [1, 3, 7, 50])
def test_pages_cross_time_buckets_of_every_level_in_either_order(
    etcd_client: dcoord.Client, spread_log: dict[str, TxRecord], limit: int
) -> None:
    coord = coordinator(etcd_client)
    assert walk(coord, limit) == in_order(spread_log)
    assert walk(coord, limit, newest_first=True) == in_order(spread_log)[::-1]
    for state in (TxState.COMMITTED, TxState.ABORTED, TxState.STARTED):
        wanted = in_order(spread_log, state)
        assert walk(coord, limit, state=state.value) == wanted
        assert walk(coord, limit, state=state.value, newest_first=True) == wanted[::-1]


def test_the_async_api_pages_the_same_buckets(
    servers: Any, namespace: str, spread_log: dict[str, TxRecord]
) -> None:
    async def pages(newest_first: bool) -> list[str]:
        async with dcoord.aio.connect(str(servers.url("etcd")), namespace=namespace) as client:
            coord = client.coordinator()
            txids: list[str] = []
            cursor = None
            while True:
                page = await coord.transactions(limit=4, cursor=cursor, newest_first=newest_first)
                txids += [r.txid for r in page]
                if page.cursor is None:
                    return txids
                cursor = page.cursor

    assert asyncio.run(pages(False)) == in_order(spread_log)
    assert asyncio.run(pages(True)) == in_order(spread_log)[::-1]


def test_no_range_a_page_reads_spans_more_than_one_bucket(
    etcd_client: dcoord.Client, spread_log: dict[str, TxRecord], monkeypatch: pytest.MonkeyPatch
) -> None:
    # etcd 3.4 walks every key of a range (a limit trims only the reply), so a range
    # over the whole finished index costs the whole history: none may be read.
    log = etcd_client.backend.txlog
    assert isinstance(log, EtcdTxLog)
    spans: list[tuple[bytes, bytes]] = []
    ranges = log._ranges

    def spy(requests: list[Any]) -> list[list[bytes]]:
        spans.extend((r.key, r.range_end) for r in requests)
        return ranges(requests)

    monkeypatch.setattr(log, "_ranges", spy)
    coord = coordinator(etcd_client)
    for newest_first in (False, True):
        for state in (None, "committed"):
            walk(coord, 5, state=state, newest_first=newest_first)
    layout = log.layout
    checked = 0
    for low, high in spans:
        key = low.decode()
        if key.startswith(layout.finished):
            # Entries: inside the 1-second leaf bucket the range starts in.
            state, stamp = key[len(layout.finished) :].split("/")[:2]
            bucket = f"{layout.finished}{state}/{stamp[: LEVEL_DIGITS[-1]]}".encode()
        elif key.startswith(layout.markers):
            # Markers below the root: the children of one node.
            state, level = key[len(layout.markers) :].split("/")[:2]
            if level == "0":
                continue  # the root's children: one per 10,000 s of history
            digits = key.rsplit("/", 1)[1][: LEVEL_DIGITS[int(level) - 1]]
            bucket = f"{layout.markers}{state}/{level}/{digits}".encode()
        else:
            continue  # the unfinished states and the old layout: flat, as before
        assert low.startswith(bucket) and high <= prefix_range_end(bucket), (low, high)
        checked += 1
    assert checked > 10


def test_finished_records_of_the_layout_before_buckets_stay_listed(
    etcd_client: dcoord.Client,
) -> None:
    log = etcd_client.backend.txlog
    assert isinstance(log, EtcdTxLog)
    etcd = etcd_client.backend.etcd  # type: ignore[attr-defined]
    new = {
        txid: write(etcd_client, txid, BASE + offset, TxState.COMMITTED)
        for txid, offset in (("n1", 0.5), ("n2", 20_000.0))
    }
    old: dict[str, TxRecord] = {}
    for txid, offset in (("o1", 0.25), ("o2", 5_000.0), ("o3", 30_000.0)):
        # As a dcoord before the buckets left them: record and flat entry, no markers.
        record = txlog.acknowledge(
            txlog.decide(
                txlog.new_record(txid, {"a": None}, now=BASE + offset, timeout=60),
                "committed",
                now=BASE + offset,
            ),
            ["a"],
        )
        old_key = f"{log.layout.states}committed/{_sortable(record.created)}/{txid}"
        etcd.transaction(
            compare=[],
            success=[
                ops.Put(log.layout.records + txid, txlog.encode(record)),
                ops.Put(old_key, b""),
            ],
            failure=[],
        )
        old[txid] = record
    everything = {**new, **old}
    coord = coordinator(etcd_client)
    for limit in (1, 2, 50):
        assert walk(coord, limit) == in_order(everything)
        assert (
            walk(coord, limit, state="committed", newest_first=True) == (in_order(everything)[::-1])
        )
    # A record moved again (here: an acknowledgement nobody knew the state before)
    # leaves the old index for the new one: listed once.
    entry = log.get("o2")
    assert entry is not None
    moved = log.cas(
        "o2",
        entry,
        entry.data,
        finished=True,
        retention=3600,
        state="committed",
        created=old["o2"].created,
    )
    assert moved is not None
    old_key = f"{log.layout.states}committed/{_sortable(old['o2'].created)}/o2"
    assert etcd.get(old_key)[0] is None
    assert walk(coord, 2) == in_order(everything)


def test_bucket_markers_outlive_the_entries_in_their_bucket(
    etcd_client: dcoord.Client,
) -> None:
    # Two processes finishing records of one second each put its markers: whichever
    # writes last, its lease must end after every entry of the bucket, so markers get
    # a lease two retention buckets longer than the records' (MARKER_BUCKETS).
    log = etcd_client.backend.txlog
    assert isinstance(log, EtcdTxLog)
    etcd = etcd_client.backend.etcd  # type: ignore[attr-defined]
    write(etcd_client, "m1", BASE, TxState.COMMITTED, retention=100)
    _, entry_meta = etcd.get(log.layout.entry("committed", BASE, "m1"))

    def granted(lease_id: int) -> int:
        return int(etcd.get_lease_info(lease_id).grantedTTL)

    entry_ttl = granted(entry_meta.lease_id)
    for key in log.layout.bucket_markers("committed", BASE):
        _, meta = etcd.get(key)
        assert meta is not None, key
        assert granted(meta.lease_id) >= entry_ttl + 20  # retention / 10 per bucket
