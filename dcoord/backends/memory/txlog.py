"""The 2PC decision log in the embedded store; the server's lock makes every step atomic."""

from __future__ import annotations

import heapq
import itertools
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..base import LogEntry

if TYPE_CHECKING:
    from . import MemoryServer


@dataclass
class _Log:
    records: dict[str, LogEntry] = field(default_factory=dict)
    unfinished: dict[str, float] = field(default_factory=dict)
    """txid -> deadline."""
    expiries: list[tuple[float, str, int | bytes]] = field(default_factory=list)
    """Heap of (monotonic expiry, txid, version) of finished records."""


# One log per (server, namespace); it lives as long as its MemoryServer, like its keys.
_logs: weakref.WeakKeyDictionary[MemoryServer, dict[str, _Log]] = weakref.WeakKeyDictionary()
_versions = itertools.count(1)


class MemoryTxLog:
    def __init__(self, server: MemoryServer, prefix: str) -> None:
        self._server = server
        with server.cond:
            self._log = _logs.setdefault(server, {}).setdefault(prefix, _Log())

    def create(self, txid: str, data: bytes, deadline: float) -> LogEntry | None:
        with self._server.cond:
            self._expire()
            if txid in self._log.records:
                return None
            entry = self._log.records[txid] = LogEntry(bytes(data), next(_versions))
            self._log.unfinished[txid] = deadline
            return entry

    def cas(
        self, txid: str, expected: LogEntry, data: bytes, *, finished: bool, retention: float
    ) -> LogEntry | None:
        with self._server.cond:
            self._expire()
            current = self._log.records.get(txid)
            if current is None or current.version != expected.version:
                return None
            entry = self._log.records[txid] = LogEntry(bytes(data), next(_versions))
            if finished:
                self._log.unfinished.pop(txid, None)
                expiry = (time.monotonic() + retention, txid, entry.version)
                heapq.heappush(self._log.expiries, expiry)
            return entry

    def get(self, txid: str) -> LogEntry | None:
        with self._server.cond:
            self._expire()
            return self._log.records.get(txid)

    def unfinished(self, limit: int | None = None) -> list[tuple[str, LogEntry | None]]:
        with self._server.cond:
            self._expire()
            order = sorted(self._log.unfinished.items(), key=lambda item: (item[1], item[0]))
            return [(txid, self._log.records.get(txid)) for txid, _ in order[:limit]]

    def scan(self) -> dict[str, LogEntry]:
        with self._server.cond:
            self._expire()
            return dict(self._log.records)

    def now(self) -> float:
        # Every client of an embedded store lives in this process: one clock for all.
        return time.time()

    def durability(self) -> str | None:
        return "the embedded log lives in this process's memory and ends with it"

    def _expire(self) -> None:
        now = time.monotonic()
        heap = self._log.expiries
        while heap and heap[0][0] <= now:
            _, txid, version = heapq.heappop(heap)
            entry = self._log.records.get(txid)
            if entry is not None and entry.version == version:
                del self._log.records[txid]
