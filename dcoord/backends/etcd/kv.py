"""Plain keys on etcd: ``/dcoord/<namespace>/kv/<key>``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from pyetcd import transactions as ops

if TYPE_CHECKING:
    from . import EtcdBackend


class EtcdKV:
    def __init__(self, backend: EtcdBackend, prefix: str) -> None:
        self._backend = backend
        self._etcd = backend.etcd
        self._prefix = f"{prefix}kv/"

    def get(self, key: str) -> bytes | None:
        value, _ = self._backend.call(
            lambda: self._etcd.get(self._prefix + key), what=f"get {key!r}", retry=True
        )
        return None if value is None else bytes(value)

    def put(self, key: str, value: bytes) -> None:
        self._backend.call(
            lambda: self._etcd.put(self._prefix + key, value), what=f"put {key!r}", retry=True
        )

    def delete(self, key: str) -> bool:
        return bool(
            self._backend.call(
                lambda: self._etcd.delete(self._prefix + key), what=f"delete {key!r}"
            )
        )

    def scan(self, prefix: str) -> dict[str, bytes]:
        cut = len(self._prefix)
        pairs = self._backend.call(
            lambda: list(self._etcd.get_prefix(self._prefix + prefix)),
            what=f"scan {prefix!r}",
            retry=True,
        )
        return {meta.key.decode()[cut:]: bytes(value) for value, meta in pairs}

    def apply(
        self,
        puts: Mapping[str, bytes],
        deletes: Iterable[str] = (),
        only_if: Mapping[str, bytes | None] | None = None,
    ) -> bool:
        return self.swap(puts, deletes, only_if) is None

    def swap(
        self,
        puts: Mapping[str, bytes],
        deletes: Iterable[str] = (),
        only_if: Mapping[str, bytes | None] | None = None,
    ) -> dict[str, bytes | None] | None:
        conditions = dict(only_if or {})
        compare = [
            ops.Version(self._prefix + key) == 0
            if expected is None
            else ops.Value(self._prefix + key) == expected
            for key, expected in conditions.items()
        ]
        success = [ops.Put(self._prefix + key, value) for key, value in puts.items()]
        success += [ops.Delete(self._prefix + key) for key in deletes]
        # On failure the same transaction reads the condition keys: no second round trip.
        failure = [ops.Get(self._prefix + key) for key in conditions]
        succeeded, responses = self._backend.call(
            lambda: self._etcd.transaction(compare=compare, success=success, failure=failure),
            what=f"apply to {len(success)} keys",
        )
        if succeeded:
            return None
        return {
            key: bytes(found[0][0]) if found else None
            for key, found in zip(conditions, responses, strict=True)
        }
