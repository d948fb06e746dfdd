"""The 2PC decision log on etcd; every change is one transaction compared on mod_revision.

Keys::

    /dcoord/<ns>/tx/r/<txid>      the record (JSON)
    /dcoord/<ns>/tx/open/<txid>   present while unfinished; its value is the deadline
    /dcoord/<ns>/tx/s/<state>/<created>/<txid>
                                  the listing's index: empty, one per record, in the
                                  directory of its state; <created> is fixed-width
                                  (microseconds) so that keys sort by creation time

A finished record is attached to a lease of the retention period, so etcd deletes it by
its own clock. Records finished within one bucket share a lease (one grant per bucket,
not per transaction): each lives between ``retention`` and ``retention + bucket``. A
finished record's index entry is on the same lease, so it goes with the record.

A page of the listing is one range read per state (``limit`` keys each, ascending by
key from the cursor; newest first reads descending, which etcd 3.4 serves by sorting the
range past the cursor: see docs/transactions.md), then one transaction of reads for the
page's records.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from pyetcd import transactions as ops
from pyetcd.utils import prefix_range_end

from ..base import TX_STATES, LogEntry

if TYPE_CHECKING:
    from . import EtcdBackend
    from .leases import Lease

# etcd caps the operations of one transaction (--max-txn-ops, 128 by default).
_BATCH = 100


def index_key(states: str, state: str, created: float, txid: str) -> str:
    """``txid``'s entry in the index of ``state``, under ``states`` (``<prefix>tx/s/``);
    shared by the sync and the async log."""
    return f"{states}{state}/{_sortable(created)}/{txid}"


def moved_from(
    states: str, txid: str, state: str, created: float, previous: str | None
) -> list[str]:
    """The index entries a compare-and-set to ``state`` deletes: the one of ``previous``
    (the state the record was read in; None: not known, so any), never the one it puts
    (a transaction may not touch one key twice)."""
    return [
        index_key(states, s, created, txid)
        for s in ((previous,) if previous else TX_STATES)
        if s != state
    ]


def run_bounds(
    directory: str, after: tuple[float, str] | None, newest_first: bool
) -> tuple[bytes, bytes]:
    """The key range of one state's index (``directory``) strictly past ``after`` in the
    listing's order."""
    low, high = directory.encode(), prefix_range_end(directory.encode())
    if after is not None:
        cursor = f"{directory}{_sortable(after[0])}/{after[1]}".encode()
        if newest_first:
            high = cursor
        else:
            low = cursor + b"\0"  # the first key after the cursor's
    return low, high


def parse_run(directory: str, keys: Iterable[bytes]) -> list[tuple[str, str, float]]:
    """Index keys of ``directory`` as ``(sort key, txid, created)``."""
    cut = len(directory)
    run = []
    for key in keys:
        rest = key.decode()[cut:]
        when, txid = rest.split("/", 1)
        run.append((rest, txid, int(when) / 1e6))
    return run


def merge_runs(
    runs: Iterable[list[tuple[str, str, float]]], limit: int, newest_first: bool
) -> list[tuple[str, str, float]]:
    """The first ``limit`` entries of the states' runs, in the listing's order."""
    return list(itertools.islice(heapq.merge(*runs, reverse=newest_first), limit))


class EtcdTxLog:
    def __init__(self, backend: EtcdBackend, prefix: str) -> None:
        self._backend = backend
        self._etcd = backend.etcd
        self._records = f"{prefix}tx/r/"
        self._open = f"{prefix}tx/open/"
        self._states = f"{prefix}tx/s/"
        self._retention_lease: tuple[float, float, Lease] | None = None  # retention, until
        self._mutex = threading.Lock()

    def index_prefix(self, state: str) -> str:
        """The prefix of the keys of ``state``'s index."""
        return f"{self._states}{state}/"

    def create(
        self, txid: str, data: bytes, deadline: float, created: float | None = None
    ) -> LogEntry | None:
        key = self._records + txid
        when = deadline if created is None else created
        succeeded, responses = self._backend.call(
            lambda: self._etcd.transaction(
                compare=[ops.Version(key) == 0],
                success=[
                    ops.Put(key, data),
                    ops.Put(self._open + txid, repr(deadline)),
                    ops.Put(index_key(self._states, TX_STATES[0], when, txid), b""),
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
        key = self._records + txid
        lease = None if not finished else self._lease_for(retention).id
        success = [ops.Put(key, data, lease=lease)]
        if finished:
            success.append(ops.Delete(self._open + txid))
        # Move the entry from the state it was in to the new one.
        success += [ops.Delete(k) for k in moved_from(self._states, txid, state, created, previous)]
        success.append(ops.Put(index_key(self._states, state, created, txid), b"", lease=lease))
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
            lambda: self._etcd.get(self._records + txid),
            what=f"read transaction record {txid!r}",
            retry=True,
        )
        return None if value is None else LogEntry(bytes(value), int(meta.mod_revision))

    def unfinished(self, limit: int | None = None) -> list[tuple[str, LogEntry | None]]:
        cut = len(self._open)
        index = self._backend.call(
            lambda: list(self._etcd.get_prefix(self._open)),
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
        reads = [ops.Get(self._records + t) for t in txids]
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
        def read() -> list[tuple[float, str, LogEntry | None]]:
            runs = [self._run(state, after, limit, newest_first) for state in states]
            entries = merge_runs(runs, limit, newest_first)
            found: dict[str, LogEntry] = {}
            txids = [txid for _, txid, _ in entries]
            for start in range(0, len(txids), _BATCH):
                batch = txids[start : start + _BATCH]
                for txid, response in zip(batch, self._read_batch(batch), strict=True):
                    for value, meta in response:
                        found[txid] = LogEntry(bytes(value), int(meta.mod_revision))
            return [(created, txid, found.get(txid)) for _, txid, created in entries]

        return self._backend.call(read, what="list transactions", retry=True)

    def _run(
        self, state: str, after: tuple[float, str] | None, limit: int, newest_first: bool
    ) -> list[tuple[str, str, float]]:
        """Up to ``limit`` entries ``(sort key, txid, created)`` of ``state``'s index past
        ``after``, in the listing's order: one range read of keys only.

        Only ``limit`` keys come back, but etcd 3.4 walks every key of the range in its
        in-memory index to count them (and sorts them all for a descending read): the
        server's cost grows with the state's index past the cursor. See
        docs/transactions.md, "Listing", for the measured cost.
        """
        directory = self.index_prefix(state)
        low, high = run_bounds(directory, after, newest_first)
        # Ascending is the order etcd keeps keys in: asking no order spares the server a
        # sort of the whole range, which a descending read cannot avoid.
        order = "descend" if newest_first else None
        pairs = self._etcd.get_range(low, high, limit=limit, sort_order=order, keys_only=True)
        return parse_run(directory, (meta.key for _, meta in pairs))

    def now(self) -> None:
        return None  # etcd has no clock API; leases count durations, not wall time

    def durability(self) -> str | None:
        return None  # a write is acknowledged once a Raft quorum has it in its fsynced WAL

    def _lease_for(self, retention: float) -> Lease:
        """A lease nobody keeps alive that expires no earlier than ``retention`` from now."""
        bucket = max(1.0, retention / 10)
        now = time.monotonic()
        with self._mutex:
            current = self._retention_lease
            if current is not None and current[0] == retention and now < current[1]:
                return current[2]
            lease = self._backend.leases.grant(retention + bucket)
            self._retention_lease = (retention, now + bucket, lease)
            return lease


def _sortable(created: float) -> str:
    """``created`` as fixed-width microseconds: string order is time order (to year 5138)."""
    return f"{round(created * 1e6):017d}"
