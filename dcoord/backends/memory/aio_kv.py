"""Async plain keys of the embedded store: the sync store's steps (never waiting), awaited."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .kv import MemoryKV


class AsyncMemoryKV:
    def __init__(self, kv: MemoryKV) -> None:
        self._kv = kv

    async def get(self, key: str) -> bytes | None:
        return self._kv.get(key)

    async def scan(self, prefix: str) -> dict[str, bytes]:
        return self._kv.scan(prefix)

    async def swap(
        self,
        puts: Mapping[str, bytes],
        deletes: Iterable[str] = (),
        only_if: Mapping[str, bytes | None] | None = None,
    ) -> dict[str, bytes | None] | None:
        return self._kv.swap(puts, deletes, only_if)
