"""The etcd log's page program (dcoord/backends/etcd/txlog.py, ``page_program``) against
a sorted key list that answers its range reads as etcd does (keys in [key, range_end),
ascending, or all of them sorted descending; then ``limit``): for any set of index
entries, any cursor and either order, a page is the next ``limit`` entries in
(created, txid) order, and no range it reads holds more than one bucket of the finished
index. tests/conformance/test_etcd_txlog_pages.py runs the same program on a real etcd.
"""

from __future__ import annotations

import bisect
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from pyetcd import etcdrpc
from pyetcd.utils import prefix_range_end

from dcoord.backends.etcd.txlog import FINISHED_STATES, LEVEL_DIGITS, Layout, page_program

LAYOUT = Layout("/dcoord/t/")
BASE = 1_700_000_000.0
STATES = ("started", "committed", "aborted")

# Creation offsets that land in one second, across seconds, 100 s and 10,000 s buckets.
offsets = st.one_of(
    st.integers(0, 3).map(lambda k: k * 0.25),
    st.integers(0, 400).map(float),
    st.integers(0, 40).map(lambda k: k * 9_999.5),
)
entries = st.lists(
    st.tuples(offsets, st.sampled_from(STATES), st.integers(0, 99)),
    max_size=60,
    unique_by=lambda e: e[2],
)


def server(log: list[tuple[float, str, str]]) -> list[bytes]:
    """The keys, sorted, of a store holding ``log`` ``(created, state, txid)``: entries
    and, for the finished states, their buckets' markers."""
    keys = set()
    for created, state, txid in log:
        keys.add(LAYOUT.entry(state, created, txid).encode())
        if state in FINISHED_STATES:
            keys.update(k.encode() for k in LAYOUT.bucket_markers(state, created))
    return sorted(keys)


def answer(keys: list[bytes], requests: list[Any], widths: list[int]) -> list[list[bytes]]:
    found = []
    for r in requests:
        inside = keys[bisect.bisect_left(keys, r.key) : bisect.bisect_left(keys, r.range_end)]
        widths.append(len(inside))  # what etcd 3.4 walks for this range
        if r.sort_order == etcdrpc.RangeRequest.DESCEND:
            inside = inside[::-1]
        found.append(inside[: r.limit] if r.limit else inside)
    return found


def run_page(
    keys: list[bytes], states: tuple[str, ...], after: Any, limit: int, newest_first: bool
) -> tuple[list[tuple[str, str, float]], list[Any], list[int]]:
    program = page_program(LAYOUT, states, after, limit, newest_first)
    asked: list[Any] = []
    widths: list[int] = []
    reply = None
    try:
        while True:
            requests = program.send(reply)  # type: ignore[arg-type]
            assert 0 < len(requests) <= 128  # etcd's --max-txn-ops
            asked += requests
            reply = answer(keys, requests, widths)
    except StopIteration as done:
        return done.value, asked, widths


@settings(max_examples=150, deadline=None)
@given(
    log=entries,
    states=st.sampled_from([STATES, ("committed",), ("started", "aborted")]),
    limit=st.integers(1, 12),
    newest_first=st.booleans(),
    start=st.integers(0, 70),
)
def test_a_page_is_the_next_entries_in_order_and_reads_one_bucket_per_range(
    log: list[tuple[float, str, int]],
    states: tuple[str, ...],
    limit: int,
    newest_first: bool,
    start: int,
) -> None:
    stored = [(BASE + offset, state, f"t{n:02d}") for offset, state, n in log]
    keys = server(stored)
    wanted = sorted(
        (round(created * 1e6) / 1e6, txid) for created, state, txid in stored if state in states
    )
    if newest_first:
        wanted.reverse()
    after = wanted[start - 1] if 0 < start <= len(wanted) else None
    rest = wanted[start:] if after is not None else wanted
    page, asked, _ = run_page(keys, states, after, limit, newest_first)
    assert [(created, txid) for _, txid, created in page] == rest[:limit]
    for r in asked:
        key = r.key.decode()
        if key.startswith(LAYOUT.finished):
            state, stamp = key[len(LAYOUT.finished) :].split("/")[:2]
            bucket = f"{LAYOUT.finished}{state}/{stamp[: LEVEL_DIGITS[-1]]}".encode()
            assert r.range_end <= prefix_range_end(bucket)


def test_a_page_of_a_long_log_walks_a_few_hundred_keys_not_the_history() -> None:
    # One record a second for 20,000 s (3 buckets of 10,000 s, 200 of 100 s), then a
    # burst of 200 in one second: etcd 3.4 walks every key of each range read, so the
    # keys in the ranges a page reads are its cost.
    stored = [(BASE + i, "committed", f"b{i:05d}") for i in range(20_000)]
    stored += [(BASE + 20_000 + i / 1000, "committed", f"c{i:03d}") for i in range(200)]
    keys = server(stored)
    for newest_first in (False, True):
        for after in (None, (BASE + 10_000.0, "b10000")):
            page, _, widths = run_page(keys, ("committed",), after, 50, newest_first)
            assert len(page) == 50
            assert max(widths) <= 200 and sum(widths) <= 1_000, widths  # of 40,000 keys
