"""Async plain keys on etcd: ``/dcoord/<namespace>/kv/<key>``, as the sync store's."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from pyetcd import etcdrpc

from .aio_txlog import absent, delete, holds, put, read_prefix
from .locks import _range

if TYPE_CHECKING:
    from .aio_locks import AsyncEtcdBackend


class AsyncEtcdKV:
    def __init__(self, backend: AsyncEtcdBackend) -> None:
        self._backend = backend
        self._prefix = f"{backend.prefix}kv/"

    async def get(self, key: str) -> bytes | None:
        backend = self._backend
        request = etcdrpc.RangeRequest(key=(self._prefix + key).encode())
        reply = await backend.call(
            lambda: backend.kv.Range(request, timeout=backend.timeout, metadata=backend.metadata),
            what=f"get {key!r}",
            retry=True,
        )
        return bytes(reply.kvs[0].value) if reply.kvs else None

    async def scan(self, prefix: str) -> dict[str, bytes]:
        cut = len(self._prefix)
        pairs = await read_prefix(self._backend, self._prefix + prefix, f"scan {prefix!r}")
        return {kv.key.decode()[cut:]: bytes(kv.value) for kv in pairs}

    async def swap(
        self,
        puts: Mapping[str, bytes],
        deletes: Iterable[str] = (),
        only_if: Mapping[str, bytes | None] | None = None,
    ) -> dict[str, bytes | None] | None:
        conditions = dict(only_if or {})
        compare = [
            absent(self._prefix + key) if expected is None else holds(self._prefix + key, expected)
            for key, expected in conditions.items()
        ]
        success = [put(self._prefix + key, value) for key, value in puts.items()]
        success += [delete(self._prefix + key) for key in deletes]
        # On failure the same transaction reads the condition keys: no second round trip.
        failure = [_range((self._prefix + key).encode()) for key in conditions]
        request = etcdrpc.TxnRequest(compare=compare, success=success, failure=failure)
        reply = await self._backend.txn(request, what=f"apply to {len(success)} keys")
        if reply.succeeded:
            return None
        return {
            key: bytes(found.response_range.kvs[0].value) if found.response_range.kvs else None
            for key, found in zip(conditions, reply.responses, strict=True)
        }
