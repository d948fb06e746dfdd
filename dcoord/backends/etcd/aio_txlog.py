"""The 2PC decision log on etcd through ``grpc.aio``: the sync log's keys and transactions.

Keys and steps as :mod:`.txlog`, from its :class:`.txlog.Layout` (``tx/r/<txid>``,
``tx/open/<txid>``, the state indexes and the time-bucket markers of the finished ones;
every change one transaction compared on the record's mod revision; finished records
and their index entries on a shared lease of the retention period, one per bucket, the
markers on one two buckets longer), and pages run the sync log's :func:`.txlog.page_program`,
so a sync and an async coordinator share one log and list each other's records.
Requests are built here from pyetcd's protobuf messages, as :mod:`.aio_locks` does.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pyetcd import etcdrpc
from pyetcd.utils import prefix_range_end

from ...aio.participants import drive
from ..base import TX_STATES, LogEntry
from .locks import _range
from .txlog import (
    _BATCH,
    MARKER_BUCKETS,
    Layout,
    page_program,
    range_keys,
    read_ranges,
    retention_bucket,
)

if TYPE_CHECKING:
    from .aio_locks import AsyncEtcdBackend


def put(key: str, value: bytes | str, lease: int = 0) -> Any:
    """A txn operation writing ``key``."""
    data = value.encode() if isinstance(value, str) else value
    return etcdrpc.RequestOp(
        request_put=etcdrpc.PutRequest(key=key.encode(), value=data, lease=lease)
    )


def delete(key: str) -> Any:
    """A txn operation deleting ``key``."""
    return etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=key.encode()))


def absent(key: str) -> Any:
    """A txn compare: ``key`` does not exist."""
    return etcdrpc.Compare(
        key=key.encode(), target=etcdrpc.Compare.VERSION, result=etcdrpc.Compare.EQUAL, version=0
    )


def holds(key: str, value: bytes) -> Any:
    """A txn compare: ``key`` holds exactly ``value``."""
    return etcdrpc.Compare(
        key=key.encode(), target=etcdrpc.Compare.VALUE, result=etcdrpc.Compare.EQUAL, value=value
    )


async def read_prefix(backend: AsyncEtcdBackend, prefix: str, what: str) -> list[Any]:
    """Every key-value under ``prefix`` (one Range, retried: it only reads)."""
    key = prefix.encode()
    request = etcdrpc.RangeRequest(key=key, range_end=prefix_range_end(key))
    reply = await backend.call(
        lambda: backend.kv.Range(request, timeout=backend.timeout, metadata=backend.metadata),
        what=what,
        retry=True,
    )
    return list(reply.kvs)


class AsyncEtcdTxLog:
    def __init__(self, backend: AsyncEtcdBackend) -> None:
        self._backend = backend
        self.layout = Layout(backend.prefix)
        # (retention, extra buckets) -> (until, lease id): the records' and the markers'.
        self._leases: dict[tuple[float, int], tuple[float, int]] = {}

    async def create(
        self, txid: str, data: bytes, deadline: float, created: float | None = None
    ) -> LogEntry | None:
        key = self.layout.records + txid
        when = deadline if created is None else created
        success = [
            put(key, data),
            put(self.layout.open + txid, repr(deadline)),
            put(self.layout.entry(TX_STATES[0], when, txid), b""),
        ]
        request = etcdrpc.TxnRequest(compare=[absent(key)], success=success)
        reply = await self._backend.txn(request, what=f"create transaction record {txid!r}")
        if not reply.succeeded:
            return None
        return LogEntry(bytes(data), int(reply.responses[0].response_put.header.revision))

    async def cas(
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
        lease = await self._lease_for(retention, 1) if finished else 0
        marker_lease = await self._lease_for(retention, MARKER_BUCKETS) if finished else 0
        success = [put(key, data, lease)]
        if finished:
            success.append(delete(self.layout.open + txid))
        success += [delete(k) for k in self.layout.moved_from(txid, state, created, previous)]
        success += [
            put(k, b"", on)
            for k, on in self.layout.index_puts(txid, state, created, lease, marker_lease)
        ]
        compare = etcdrpc.Compare(
            key=key.encode(),
            target=etcdrpc.Compare.MOD,
            result=etcdrpc.Compare.EQUAL,
            mod_revision=int(expected.version),
        )
        request = etcdrpc.TxnRequest(compare=[compare], success=success)
        reply = await self._backend.txn(request, what=f"update transaction record {txid!r}")
        if not reply.succeeded:
            return None
        return LogEntry(bytes(data), int(reply.responses[0].response_put.header.revision))

    async def get(self, txid: str) -> LogEntry | None:
        backend = self._backend
        request = etcdrpc.RangeRequest(key=(self.layout.records + txid).encode())
        reply = await backend.call(
            lambda: backend.kv.Range(request, timeout=backend.timeout, metadata=backend.metadata),
            what=f"read transaction record {txid!r}",
            retry=True,
        )
        if not reply.kvs:
            return None
        return LogEntry(bytes(reply.kvs[0].value), int(reply.kvs[0].mod_revision))

    async def unfinished(self, limit: int | None = None) -> list[tuple[str, LogEntry | None]]:
        cut = len(self.layout.open)
        index = await read_prefix(self._backend, self.layout.open, "list unfinished transactions")
        order = sorted((float(kv.value), kv.key.decode()[cut:]) for kv in index)[:limit]
        txids = [txid for _, txid in order]
        found = await self._records_of(txids, "read unfinished transactions")
        return [(txid, found.get(txid)) for txid in txids]

    async def _records_of(self, txids: list[str], what: str) -> dict[str, LogEntry]:
        """The records of ``txids`` that exist, by txid (a transaction of reads per batch)."""
        found: dict[str, LogEntry] = {}
        for start in range(0, len(txids), _BATCH):
            batch = txids[start : start + _BATCH]
            request = etcdrpc.TxnRequest(
                success=[_range((self.layout.records + t).encode()) for t in batch]
            )
            reply = await self._backend.txn(request, what=what, retry=True)
            for txid, response in zip(batch, reply.responses, strict=True):
                for kv in response.response_range.kvs:
                    found[txid] = LogEntry(bytes(kv.value), int(kv.mod_revision))
        return found

    async def page(
        self,
        states: Sequence[str],
        *,
        after: tuple[float, str] | None,
        limit: int,
        newest_first: bool,
    ) -> list[tuple[float, str, LogEntry | None]]:
        async def ranges(requests: list[Any]) -> list[list[bytes]]:
            reply = await self._backend.txn(
                read_ranges(requests), what="list transactions", retry=True
            )
            return range_keys(reply)

        entries = await drive(page_program(self.layout, states, after, limit, newest_first), ranges)
        found = await self._records_of([txid for _, txid, _ in entries], "read transaction records")
        return [(created, txid, found.get(txid)) for _, txid, created in entries]

    async def now(self) -> None:
        return None  # etcd has no clock API; leases count durations, not wall time

    async def durability(self) -> str | None:
        return None  # a write is acknowledged once a Raft quorum has it in its fsynced WAL

    async def _lease_for(self, retention: float, buckets: int) -> int:
        """As :meth:`.txlog.EtcdTxLog._lease_for`: a lease nobody keeps alive, shared by
        the writes within one bucket of time, of ``retention`` plus ``buckets`` buckets."""
        bucket = retention_bucket(retention)
        now = time.monotonic()
        current = self._leases.get((retention, buckets))
        if current is not None and now < current[0]:
            return current[1]
        lease, _, _ = await self._backend.locks.grant(retention + buckets * bucket)
        self._leases[(retention, buckets)] = (now + bucket, lease)
        return lease
