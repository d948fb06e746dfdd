"""The 2PC decision log on etcd; every change is one transaction compared on mod_revision.

Keys::

    /dcoord/<ns>/tx/r/<txid>      the record (JSON)
    /dcoord/<ns>/tx/open/<txid>   present while unfinished; its value is the deadline
    /dcoord/<ns>/tx/s/<state>/<stamp>/<txid>
                                  the listing's index of the unfinished states (started,
                                  committing, aborting): empty, one per record; <stamp>
                                  is the creation time in fixed-width microseconds, so
                                  keys sort by creation time
    /dcoord/<ns>/tx/f/<state>/<stamp>/<txid>
                                  the same for the finished states (committed, aborted)
    /dcoord/<ns>/tx/m/<state>/<level>/<stamp[:digits]>
                                  time buckets of the finished index that hold entries:
                                  level 0 of 10,000 s, 1 of 100 s, 2 of 1 s (the leading
                                  7, 9 and 11 digits of the stamp)

A finished record is attached to a lease of the retention period, so etcd deletes it by
its own clock. Records finished within one bucket of time share a lease (one grant per
bucket, not per transaction): each lives between ``retention`` and ``retention +
bucket``. A finished record's index entry is on the same lease, so it goes with the
record. Its bucket markers are put again by every finishing write, on a lease two
buckets longer (:data:`MARKER_BUCKETS`), so a marker outlives every entry in its bucket,
whichever process wrote last.

Why the buckets: etcd 3.4 answers a range read by collecting every key of the range from
its in-memory index (to count them) and, for a descending read, by reading and sorting
them all; a ``limit`` only trims the reply. So no read may span the history. A page of a
finished state walks the marker tree in the listing's order (a node's children are at
most 100 keys), and reads the entries of a 1-second leaf bucket at a time: every range
it reads is bounded by the fan-out or by one second of the log, whatever its size. The
unfinished states hold only the unfinished records and keep a single range each.

A page is a sans-I/O program (:func:`page_program`) that yields batches of range reads;
the sync and the async log run each batch as one etcd transaction. The finished index
of the layout before the buckets (``tx/s/committed/``, ``tx/s/aborted/``) is still read
by every page, merged in, so those records stay listed until their lease ends them;
once they are gone (and compacted) that read costs one empty range.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyetcd import etcdrpc
from pyetcd import transactions as ops
from pyetcd.utils import prefix_range_end

from ...core.twopc_state import run
from ..base import TX_STATES, LogEntry

if TYPE_CHECKING:
    from . import EtcdBackend
    from .leases import Lease

# etcd caps the operations of one transaction (--max-txn-ops, 128 by default).
_BATCH = 100

#: The states whose index is kept in time buckets: the ones the history piles up in.
FINISHED_STATES = ("committed", "aborted")

#: How many leading digits of a 17-digit microsecond stamp name a marker of each level:
#: buckets of 10,000 s, 100 s and 1 s, so that a node has at most 100 children.
LEVEL_DIGITS = (7, 9, 11)

#: Per state, round of a page and level, the buckets read at most: a level starts with
#: one and takes twice as many each time it is read again (a sparse log), up to this.
#: Both finished states together stay under etcd's 128 operations per transaction.
_MAX_WIDTH = 16

#: Retention buckets a marker's lease runs past the retention (a record's: 1). Each
#: writer hands a lease out for one bucket after its grant, so the last writer's may be
#: a bucket older than an earlier writer's record lease: one more bucket covers that,
#: and another the time a write takes after its lease was picked (retries included).
MARKER_BUCKETS = 3

Run = list[tuple[str, str, float]]
"""Index entries ``(sort key, txid, created)`` in the listing's order; the sort key is
``<stamp>/<txid>``."""

Ranges = Generator[list[Any], list[list[bytes]], Run]
"""A page program: yields lists of ``etcdrpc.RangeRequest`` (one etcd transaction
each), is sent the keys each range found, returns its run."""


class Layout:
    """The log's keys under ``prefix`` (``/dcoord/<ns>/``): one definition for the sync
    and the async log, so that both read and write the same layout."""

    def __init__(self, prefix: str) -> None:
        self.records = f"{prefix}tx/r/"
        self.open = f"{prefix}tx/open/"
        self.states = f"{prefix}tx/s/"
        self.finished = f"{prefix}tx/f/"
        self.markers = f"{prefix}tx/m/"

    def directory(self, state: str) -> str:
        """The prefix of the keys of ``state``'s index."""
        head = self.finished if state in FINISHED_STATES else self.states
        return f"{head}{state}/"

    def legacy_directory(self, state: str) -> str:
        """Where the layout before the time buckets kept ``state``'s entries."""
        return f"{self.states}{state}/"

    def entry(self, state: str, created: float, txid: str) -> str:
        """``txid``'s entry in the index of ``state``."""
        return f"{self.directory(state)}{_sortable(created)}/{txid}"

    def bucket_markers(self, state: str, created: float) -> list[str]:
        """The markers of the time buckets (every level) an entry of ``state`` is in."""
        stamp = _sortable(created)
        return [
            f"{self.markers}{state}/{level}/{stamp[:digits]}"
            for level, digits in enumerate(LEVEL_DIGITS)
        ]

    def moved_from(self, txid: str, state: str, created: float, previous: str | None) -> list[str]:
        """The index entries a compare-and-set to ``state`` deletes: the one of
        ``previous`` (the state the record was read in; None: not known, so any), in
        either layout, never the one it puts (a transaction may not touch one key
        twice)."""
        put = self.entry(state, created, txid)
        keys = []
        for s in (previous,) if previous else TX_STATES:
            keys.append(self.entry(s, created, txid))
            if s in FINISHED_STATES:
                keys.append(f"{self.legacy_directory(s)}{_sortable(created)}/{txid}")
        return [key for key in keys if key != put]

    def index_puts(
        self, txid: str, state: str, created: float, lease: int, marker_lease: int
    ) -> list[tuple[str, int]]:
        """The index keys a compare-and-set to ``state`` puts (besides deleting
        :meth:`moved_from`), each with its lease (0: none): the entry, and for a
        finished state its buckets' markers."""
        puts = [(self.entry(state, created, txid), lease)]
        if state in FINISHED_STATES:
            puts += [(key, marker_lease) for key in self.bucket_markers(state, created)]
        return puts


def page_program(
    layout: Layout,
    states: Sequence[str],
    after: tuple[float, str] | None,
    limit: int,
    newest_first: bool,
) -> Ranges:
    """Up to ``limit`` index entries of ``states`` strictly past ``after`` in the
    listing's order: every state's walk advanced together, one transaction per round."""
    walks: list[Ranges] = []
    for state in states:
        if state in FINISHED_STATES:
            walks.append(_bucket_walk(layout, state, after, limit, newest_first))
            walks.append(_flat_walk(layout.legacy_directory(state), after, limit, newest_first))
        else:
            walks.append(_flat_walk(layout.directory(state), after, limit, newest_first))
    runs = yield from _lockstep(walks)
    return merge_runs(runs, limit, newest_first)


def _lockstep(walks: list[Ranges]) -> Generator[list[Any], list[list[bytes]], list[Run]]:
    """Run ``walks`` side by side: each round sends every unfinished walk's ranges as
    one list (one transaction), then hands each walk its share of the answers."""
    runs: list[Run] = [[] for _ in walks]
    asked: dict[int, list[Any]] = {}

    def advance(i: int, answer: list[list[bytes]] | None) -> None:
        try:
            asked[i] = walks[i].send(answer)  # type: ignore[arg-type]
        except StopIteration as done:
            runs[i] = done.value
            asked.pop(i, None)

    for i in range(len(walks)):
        advance(i, None)
    while asked:
        round_ = list(asked.items())
        answers = yield [request for _, requests in round_ for request in requests]
        at = 0
        for i, requests in round_:
            advance(i, answers[at : at + len(requests)])
            at += len(requests)
    return runs


def _flat_walk(
    directory: str, after: tuple[float, str] | None, limit: int, newest_first: bool
) -> Ranges:
    """One range of ``directory`` past ``after``: an index that holds only unfinished
    records (or the finished ones of the old layout, until they expire)."""
    cursor = None if after is None else f"{directory}{_sortable(after[0])}/{after[1]}"
    span = _span(directory, cursor, newest_first, inclusive=False)
    if span is None:
        return []
    (keys,) = yield [range_request(span, limit, newest_first)]
    return parse_run(directory, keys)


@dataclass(frozen=True)
class _Node:
    """A time bucket with entries: ``digits`` of its ``level`` (-1: the root)."""

    level: int
    digits: str


def _bucket_walk(
    layout: Layout,
    state: str,
    after: tuple[float, str] | None,
    limit: int,
    newest_first: bool,
) -> Ranges:
    """The entries of a finished state past ``after``, read bucket by bucket.

    ``frontier`` holds, in the listing's order, buckets not read yet and entries read;
    each round replaces some buckets by what they hold (marker nodes by their children,
    leaves by their entries), and entries at its head are done. Every range read stays
    inside one bucket, so none costs more than 100 markers or one second of the log.
    """
    directory = layout.directory(state)
    markers = f"{layout.markers}{state}/"
    stamp = None if after is None else _sortable(after[0])
    last = len(LEVEL_DIGITS) - 1
    found: Run = []
    frontier: list[_Node | tuple[str, str, float]] = [_Node(-1, "")]
    width = dict.fromkeys(range(-1, len(LEVEL_DIGITS)), 1)

    def request(node: _Node) -> Any | None:
        if node.level == last:  # a leaf: its entries past the cursor
            cursor = None if after is None else f"{directory}{stamp}/{after[1]}"
            span = _span(directory + node.digits, cursor, newest_first, inclusive=False)
            return None if span is None else range_request(span, limit - len(found), newest_first)
        below = f"{markers}{node.level + 1}/"
        # The child bucket the cursor is in comes too: it may hold entries past it.
        cursor = None if stamp is None else below + stamp[: LEVEL_DIGITS[node.level + 1]]
        span = _span(below + node.digits, cursor, newest_first, inclusive=True)
        return None if span is None else range_request(span, 0, newest_first)

    def expand(node: _Node, keys: list[bytes]) -> list[_Node | tuple[str, str, float]]:
        if node.level == last:
            return list(parse_run(directory, keys))
        cut = len(f"{markers}{node.level + 1}/")
        return [_Node(node.level + 1, key.decode()[cut:]) for key in keys]

    while frontier and len(found) < limit:
        while frontier and not isinstance(head := frontier[0], _Node):
            found.append(head)
            del frontier[0]
        if not frontier or len(found) >= limit:
            break
        # Read the buckets at the head, as many per level as that level's width, and
        # none that ``limit`` items (each bucket holds at least one entry) precede.
        chosen: dict[int, Any | None] = {}
        taken = dict.fromkeys(width, 0)
        ahead = len(found)
        for i, item in enumerate(frontier):
            if ahead >= limit:
                break
            if isinstance(item, _Node) and taken[item.level] < width[item.level]:
                taken[item.level] += 1
                chosen[i] = request(item)
            ahead += 1
        for level, count in taken.items():
            if count:
                width[level] = min(2 * width[level], _MAX_WIDTH)
        sent = [r for r in chosen.values() if r is not None]
        answers = iter((yield sent) if sent else [])
        grown: list[_Node | tuple[str, str, float]] = []
        for i, item in enumerate(frontier):
            if i not in chosen:
                grown.append(item)
            elif isinstance(item, _Node):
                grown += expand(item, [] if chosen[i] is None else next(answers))
        frontier = grown
    return found[:limit]


def range_request(span: tuple[bytes, bytes], limit: int, newest_first: bool) -> Any:
    """A keys-only range read of ``span``, at most ``limit`` keys (0: all), in the
    listing's order. Ascending asks no order: it is the one etcd keeps, so no sort."""
    request = etcdrpc.RangeRequest(key=span[0], range_end=span[1], limit=limit, keys_only=True)
    if newest_first:
        request.sort_order = etcdrpc.RangeRequest.DESCEND
        request.sort_target = etcdrpc.RangeRequest.KEY
    return request


def read_ranges(requests: list[Any]) -> Any:
    """The TxnRequest that reads ``requests`` (RangeRequests) at one revision."""
    return etcdrpc.TxnRequest(
        success=[etcdrpc.RequestOp(request_range=request) for request in requests]
    )


def range_keys(reply: Any) -> list[list[bytes]]:
    """The keys each range of a :func:`read_ranges` transaction found."""
    return [[kv.key for kv in r.response_range.kvs] for r in reply.responses]


def _span(
    prefix: str, cursor: str | None, newest_first: bool, *, inclusive: bool
) -> tuple[bytes, bytes] | None:
    """The keys under ``prefix`` from ``cursor`` on in the listing's order (None: none)."""
    low, high = prefix.encode(), prefix_range_end(prefix.encode())
    if cursor is not None:
        # The first key after ``cursor`` is ``cursor + NUL``: ascending starts there
        # unless the cursor's own key is wanted; descending ends there if it is.
        edge = cursor.encode() + (b"\0" if inclusive == newest_first else b"")
        if newest_first:
            high = min(high, edge)
        else:
            low = max(low, edge)
    return (low, high) if low < high else None


def parse_run(directory: str, keys: Iterable[bytes]) -> Run:
    """Index keys of ``directory`` as ``(sort key, txid, created)``."""
    cut = len(directory)
    found = []
    for key in keys:
        rest = key.decode()[cut:]
        when, txid = rest.split("/", 1)
        found.append((rest, txid, int(when) / 1e6))
    return found


def merge_runs(runs: Iterable[Run], limit: int, newest_first: bool) -> Run:
    """The first ``limit`` entries of the states' runs, in the listing's order (once
    each: a record an older dcoord moved again may have an entry in both layouts)."""
    merged = heapq.merge(*runs, reverse=newest_first)
    unique = (next(group) for _, group in itertools.groupby(merged, key=lambda e: e[0]))
    return list(itertools.islice(unique, limit))


class EtcdTxLog:
    def __init__(self, backend: EtcdBackend, prefix: str) -> None:
        self._backend = backend
        self._etcd = backend.etcd
        self.layout = Layout(prefix)
        # (retention, extra buckets) -> (until, lease): the records' and the markers'.
        self._leases: dict[tuple[float, int], tuple[float, Lease]] = {}
        self._mutex = threading.Lock()

    def index_prefix(self, state: str) -> str:
        """The prefix of the keys of ``state``'s index."""
        return self.layout.directory(state)

    def create(
        self, txid: str, data: bytes, deadline: float, created: float | None = None
    ) -> LogEntry | None:
        key = self.layout.records + txid
        when = deadline if created is None else created
        succeeded, responses = self._backend.call(
            lambda: self._etcd.transaction(
                compare=[ops.Version(key) == 0],
                success=[
                    ops.Put(key, data),
                    ops.Put(self.layout.open + txid, repr(deadline)),
                    ops.Put(self.layout.entry(TX_STATES[0], when, txid), b""),
                ],
                failure=[],
            ),
            what=f"create transaction record {txid!r}",
        )
        if not succeeded:
            return None
        return LogEntry(bytes(data), int(responses[0].response_put.header.revision))

    def cas(
        self,
        txid: str,
        expected: LogEntry,
        data: bytes,
        *,
        finished: bool,
        retention: float,
        state: str,
        created: float,
        previous: str | None = None,
    ) -> LogEntry | None:
        key = self.layout.records + txid
        lease = self._lease_for(retention, 1).id if finished else None
        marker_lease = self._lease_for(retention, MARKER_BUCKETS).id if finished else 0
        success = [ops.Put(key, data, lease=lease)]
        if finished:
            success.append(ops.Delete(self.layout.open + txid))
        # Move the entry from the state it was in to the new one.
        success += [ops.Delete(k) for k in self.layout.moved_from(txid, state, created, previous)]
        success += [
            ops.Put(k, b"", lease=on or None)
            for k, on in self.layout.index_puts(txid, state, created, lease or 0, marker_lease)
        ]
        succeeded, responses = self._backend.call(
            lambda: self._etcd.transaction(
                compare=[ops.Mod(key) == int(expected.version)], success=success, failure=[]
            ),
            what=f"update transaction record {txid!r}",
        )
        if not succeeded:
            return None
        return LogEntry(bytes(data), int(responses[0].response_put.header.revision))

    def get(self, txid: str) -> LogEntry | None:
        value, meta = self._backend.call(
            lambda: self._etcd.get(self.layout.records + txid),
            what=f"read transaction record {txid!r}",
            retry=True,
        )
        return None if value is None else LogEntry(bytes(value), int(meta.mod_revision))

    def unfinished(self, limit: int | None = None) -> list[tuple[str, LogEntry | None]]:
        cut = len(self.layout.open)
        index = self._backend.call(
            lambda: list(self._etcd.get_prefix(self.layout.open)),
            what="list unfinished transactions",
            retry=True,
        )
        order = sorted(
            ((float(value), meta.key.decode()[cut:]) for value, meta in index),
        )[:limit]
        txids = [txid for _, txid in order]
        found: dict[str, LogEntry] = {}
        for start in range(0, len(txids), _BATCH):
            batch = txids[start : start + _BATCH]
            responses = self._read_batch(batch)
            for txid, response in zip(batch, responses, strict=True):
                for value, meta in response:
                    found[txid] = LogEntry(bytes(value), int(meta.mod_revision))
        return [(txid, found.get(txid)) for txid in txids]

    def _read_batch(self, txids: list[str]) -> list[Any]:
        reads = [ops.Get(self.layout.records + t) for t in txids]
        _, responses = self._backend.call(
            lambda: self._etcd.transaction(compare=[], success=reads, failure=[]),
            what="read transaction records",
            retry=True,
        )
        return list(responses)

    def page(
        self,
        states: Sequence[str],
        *,
        after: tuple[float, str] | None,
        limit: int,
        newest_first: bool,
    ) -> list[tuple[float, str, LogEntry | None]]:
        entries = run(page_program(self.layout, states, after, limit, newest_first), self._ranges)
        found: dict[str, LogEntry] = {}
        txids = [txid for _, txid, _ in entries]
        for start in range(0, len(txids), _BATCH):
            batch = txids[start : start + _BATCH]
            for txid, response in zip(batch, self._read_batch(batch), strict=True):
                for value, meta in response:
                    found[txid] = LogEntry(bytes(value), int(meta.mod_revision))
        return [(created, txid, found.get(txid)) for _, txid, created in entries]

    def _ranges(self, requests: list[Any]) -> list[list[bytes]]:
        """One round of a page program: its range reads in one transaction."""
        reply = self._backend.call(
            lambda: self._backend.rpc(
                lambda etcd: etcd.kvstub.Txn(
                    read_ranges(requests),
                    etcd.timeout,
                    credentials=etcd.call_credentials,
                    metadata=etcd.metadata,
                )
            ),
            what="list transactions",
            retry=True,
        )
        return range_keys(reply)

    def now(self) -> None:
        return None  # etcd has no clock API; leases count durations, not wall time

    def durability(self) -> str | None:
        return None  # a write is acknowledged once a Raft quorum has it in its fsynced WAL

    def _lease_for(self, retention: float, buckets: int) -> Lease:
        """A lease nobody keeps alive that expires no earlier than ``retention`` plus
        ``buckets - 1`` buckets from now (records: 1; bucket markers: :data:`MARKER_BUCKETS`)."""
        bucket = retention_bucket(retention)
        now = time.monotonic()
        with self._mutex:
            current = self._leases.get((retention, buckets))
            if current is not None and now < current[0]:
                return current[1]
            lease = self._backend.leases.grant(retention + buckets * bucket)
            self._leases[(retention, buckets)] = (now + bucket, lease)
            return lease


def retention_bucket(retention: float) -> float:
    """How long one retention lease is handed out (so records live up to this longer)."""
    return max(1.0, retention / 10)


def _sortable(created: float) -> str:
    """``created`` as fixed-width microseconds: string order is time order (to year 5138)."""
    return f"{round(created * 1e6):017d}"
