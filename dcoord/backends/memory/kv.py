"""Plain keys in the embedded store."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from . import MemoryServer


class MemoryKV:
    def __init__(self, server: MemoryServer, prefix: str) -> None:
        self._server = server
        self._prefix = f"{prefix}kv/"

    def get(self, key: str) -> bytes | None:
        with self._server.cond:
            return self._server.data.get(self._prefix + key)

    def put(self, key: str, value: bytes) -> None:
        with self._server.cond:
            self._server.data[self._prefix + key] = bytes(value)

    def delete(self, key: str) -> bool:
        with self._server.cond:
            return self._server.data.pop(self._prefix + key, None) is not None

    def scan(self, prefix: str) -> dict[str, bytes]:
        full = self._prefix + prefix
        cut = len(self._prefix)
        with self._server.cond:
            return {k[cut:]: v for k, v in self._server.data.items() if k.startswith(full)}

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
        data = self._server.data
        conditions = only_if or {}
        with self._server.cond:
            current = {key: data.get(self._prefix + key) for key in conditions}
            if any(current[key] != expected for key, expected in conditions.items()):
                return current
            for key in deletes:
                data.pop(self._prefix + key, None)
            for key, value in puts.items():
                data[self._prefix + key] = bytes(value)
            return None
