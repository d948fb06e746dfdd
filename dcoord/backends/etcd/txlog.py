"""The 2PC decision log on etcd; every change is one transaction compared on mod_revision.

Keys::

    /dcoord/<ns>/tx/r/<txid>      the record (JSON)
    /dcoord/<ns>/tx/open/<txid>   present while unfinished; its value is the deadline

A finished record is attached to a lease of the retention period, so etcd deletes it by
its own clock. Records finished within one bucket share a lease (one grant per bucket,
not per transaction): each lives between ``retention`` and ``retention + bucket``.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from pyetcd import transactions as ops

from ..base import LogEntry

if TYPE_CHECKING:
    from . import EtcdBackend
    from .leases import Lease

# etcd caps the operations of one transaction (--max-txn-ops, 128 by default).
_BATCH = 100


class EtcdTxLog:
    def __init__(self, backend: EtcdBackend, prefix: str) -> None:
        self._backend = backend
        self._etcd = backend.etcd
        self._records = f"{prefix}tx/r/"
        self._open = f"{prefix}tx/open/"
        self._retention_lease: tuple[float, float, Lease] | None = None  # retention, until
        self._mutex = threading.Lock()

    def create(self, txid: str, data: bytes, deadline: float) -> LogEntry | None:
        key = self._records + txid
        succeeded, responses = self._backend.call(
            lambda: self._etcd.transaction(
                compare=[ops.Version(key) == 0],
                success=[ops.Put(key, data), ops.Put(self._open + txid, repr(deadline))],
                failure=[],
            ),
            what=f"create transaction record {txid!r}",
        )
        if not succeeded:
            return None
        return LogEntry(bytes(data), int(responses[0].response_put.header.revision))

    def cas(
        self, txid: str, expected: LogEntry, data: bytes, *, finished: bool, retention: float
    ) -> LogEntry | None:
        key = self._records + txid
        lease = self._lease_for(retention) if finished else None
        success = [ops.Put(key, data, lease=None if lease is None else lease.id)]
        if finished:
            success.append(ops.Delete(self._open + txid))
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
            what="read unfinished transactions",
            retry=True,
        )
        return list(responses)

    def scan(self) -> dict[str, LogEntry]:
        cut = len(self._records)
        pairs = self._backend.call(
            lambda: list(self._etcd.get_prefix(self._records)),
            what="list transactions",
            retry=True,
        )
        return {
            meta.key.decode()[cut:]: LogEntry(bytes(value), int(meta.mod_revision))
            for value, meta in pairs
        }

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
