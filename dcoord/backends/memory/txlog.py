"""The 2PC decision log in the embedded store; the server's lock makes every step atomic."""

from __future__ import annotations

import bisect
import heapq
import itertools
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..base import TX_STATES, LogEntry

if TYPE_CHECKING:
    from . import MemoryServer


@dataclass
class _Log:
    records: dict[str, LogEntry] = field(default_factory=dict)
    unfinished: dict[str, float] = field(default_factory=dict)
    """txid -> deadline."""
    expiries: list[tuple[float, str, int | bytes]] = field(default_factory=list)
    """Heap of (monotonic expiry, txid, version) of finished records."""
    by_state: dict[str, list[tuple[float, str]]] = field(
        default_factory=lambda: {state: [] for state in TX_STATES}
    )
    """State -> sorted (created, txid) of its records: the listing's index."""
    indexed: dict[str, tuple[str, float]] = field(default_factory=dict)
    """txid -> (state, created): where its entry in ``by_state`` is."""


# One log per (server, namespace); it lives as long as its MemoryServer, like its keys.
_logs: weakref.WeakKeyDictionary[MemoryServer, dict[str, _Log]] = weakref.WeakKeyDictionary()
_versions = itertools.count(1)


class MemoryTxLog:
    def __init__(self, server: MemoryServer, prefix: str) -> None:
        self._server = server
        with server.cond:
            self._log = _logs.setdefault(server, {}).setdefault(prefix, _Log())

    def create(
        self, txid: str, data: bytes, deadline: float, created: float | None = None
    ) -> LogEntry | None:
        # Made before taking the store's lock, to hold it for as short as can be: a
        # thread switched out while holding it makes the others wait (convoyfree.py).
        entry = LogEntry(bytes(data), next(_versions))
        with self._server.cond:
            self._expire()
            if txid in self._log.records:
                return None
            self._log.records[txid] = entry
            self._log.unfinished[txid] = deadline
            self._index(txid, TX_STATES[0], deadline if created is None else created)
            return entry

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
        previous: str | None = None,  # not needed: ``indexed`` says where each entry is
    ) -> LogEntry | None:
        entry = LogEntry(bytes(data), next(_versions))  # (as in create)
        expiry = (time.monotonic() + retention, txid, entry.version)
        with self._server.cond:
            self._expire()
            current = self._log.records.get(txid)
            if current is None or current.version != expected.version:
                return None
            self._log.records[txid] = entry
            self._index(txid, state, created)
            if finished:
                self._log.unfinished.pop(txid, None)
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

    def page(
        self,
        states: Sequence[str],
        *,
        after: tuple[float, str] | None,
        limit: int,
        newest_first: bool,
    ) -> list[tuple[float, str, LogEntry | None]]:
        with self._server.cond:
            self._expire()
            runs = []
            for state in states:
                index = self._log.by_state[state]
                # Each index is sorted: bisect to the cursor, take at most ``limit``.
                if newest_first:
                    end = len(index) if after is None else bisect.bisect_left(index, after)
                    runs.append(index[max(0, end - limit) : end][::-1])
                else:
                    start = 0 if after is None else bisect.bisect_right(index, after)
                    runs.append(index[start : start + limit])
            merged = heapq.merge(*runs, reverse=newest_first)
            return [
                (created, txid, self._log.records.get(txid))
                for created, txid in itertools.islice(merged, limit)
            ]

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
                self._unindex(txid)

    def _index(self, txid: str, state: str, created: float) -> None:
        """Move ``txid``'s listing entry to ``state`` (at ``created``)."""
        self._unindex(txid)
        # A sorted list: insertion moves O(n) pointers, which is fast at the sizes an
        # embedded store holds, and needs no dependency for a sorted container.
        bisect.insort(self._log.by_state[state], (created, txid))
        self._log.indexed[txid] = (state, created)

    def _unindex(self, txid: str) -> None:
        found = self._log.indexed.pop(txid, None)
        if found is not None:
            index = self._log.by_state[found[0]]
            del index[bisect.bisect_left(index, (found[1], txid))]
