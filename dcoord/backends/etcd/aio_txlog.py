"""The 2PC decision log on etcd through ``grpc.aio``: the sync log's keys and transactions.

Keys and steps as :mod:`.txlog` (``tx/r/<txid>``, ``tx/open/<txid>``, the state index
``tx/s/<state>/<created>/<txid>``; every change one transaction compared on the record's
mod revision; finished records and their index entries on a shared lease of the
retention period, one per bucket), so a sync and an async coordinator share one log
and list each other's records. Requests are built here from pyetcd's protobuf
messages, as :mod:`.aio_locks` does.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pyetcd import etcdrpc
from pyetcd.utils import prefix_range_end

from ..base import TX_STATES, LogEntry
from .locks import _range
from .txlog import _BATCH, index_key, merge_runs, moved_from, parse_run, run_bounds

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
        self._records = f"{backend.prefix}tx/r/"
        self._open = f"{backend.prefix}tx/open/"
        self._states = f"{backend.prefix}tx/s/"
        self._retention_lease: tuple[float, float, int] | None = None  # retention, until, id

    async def create(
        self, txid: str, data: bytes, deadline: float, created: float | None = None
    ) -> LogEntry | None:
        key = self._records + txid
        when = deadline if created is None else created
        success = [
            put(key, data),
            put(self._open + txid, repr(deadline)),
            put(index_key(self._states, TX_STATES[0], when, txid), b""),
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
        key = self._records + txid
        lease = await self._lease_for(retention) if finished else 0
        success = [put(key, data, lease)]
        if finished:
            success.append(delete(self._open + txid))
        success += [delete(k) for k in moved_from(self._states, txid, state, created, previous)]
        success.append(put(index_key(self._states, state, created, txid), b"", lease))
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
        request = etcdrpc.RangeRequest(key=(self._records + txid).encode())
        reply = await backend.call(
            lambda: backend.kv.Range(request, timeout=backend.timeout, metadata=backend.metadata),
            what=f"read transaction record {txid!r}",
            retry=True,
        )
        if not reply.kvs:
            return None
        return LogEntry(bytes(reply.kvs[0].value), int(reply.kvs[0].mod_revision))

    async def unfinished(self, limit: int | None = None) -> list[tuple[str, LogEntry | None]]:
        cut = len(self._open)
        index = await read_prefix(self._backend, self._open, "list unfinished transactions")
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
                success=[_range((self._records + t).encode()) for t in batch]
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
        backend = self._backend
        runs = []
        for state in states:
            directory = f"{self._states}{state}/"
            low, high = run_bounds(directory, after, newest_first)
            # As the sync log: ascending asks no order, so etcd stops at the limit.
            request = etcdrpc.RangeRequest(key=low, range_end=high, limit=limit, keys_only=True)
            if newest_first:
                request.sort_order = etcdrpc.RangeRequest.DESCEND
                request.sort_target = etcdrpc.RangeRequest.KEY
            reply = await backend.call(
                functools.partial(
                    backend.kv.Range, request, timeout=backend.timeout, metadata=backend.metadata
                ),
                what="list transactions",
                retry=True,
            )
            runs.append(parse_run(directory, (kv.key for kv in reply.kvs)))
        entries = merge_runs(runs, limit, newest_first)
        found = await self._records_of([txid for _, txid, _ in entries], "read transaction records")
        return [(created, txid, found.get(txid)) for _, txid, created in entries]

    async def now(self) -> None:
        return None  # etcd has no clock API; leases count durations, not wall time

    async def durability(self) -> str | None:
        return None  # a write is acknowledged once a Raft quorum has it in its fsynced WAL

    async def _lease_for(self, retention: float) -> int:
        """As :meth:`.txlog.EtcdTxLog._lease_for`: a lease nobody keeps alive, shared by
        the records finished within one bucket of time."""
        bucket = max(1.0, retention / 10)
        now = time.monotonic()
        current = self._retention_lease
        if current is not None and current[0] == retention and now < current[1]:
            return current[2]
        lease, _, _ = await self._backend.locks.grant(retention + bucket)
        self._retention_lease = (retention, now + bucket, lease)
        return lease
