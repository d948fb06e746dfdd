"""The async 2PC log of the embedded store: the sync log's own steps, awaited.

Every step of :class:`.txlog.MemoryTxLog` is a short critical section under the
server's lock that never waits, so the async log calls it directly (no thread hand-off)
and a sync and an async coordinator of one ``memory://`` store share one log.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..base import LogEntry
from .txlog import MemoryTxLog


class AsyncMemoryTxLog:
    def __init__(self, log: MemoryTxLog) -> None:
        self._log = log

    async def create(
        self, txid: str, data: bytes, deadline: float, created: float | None = None
    ) -> LogEntry | None:
        return self._log.create(txid, data, deadline, created)

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
        return self._log.cas(
            txid,
            expected,
            data,
            finished=finished,
            retention=retention,
            state=state,
            created=created,
            previous=previous,
        )

    async def get(self, txid: str) -> LogEntry | None:
        return self._log.get(txid)

    async def unfinished(self, limit: int | None = None) -> list[tuple[str, LogEntry | None]]:
        return self._log.unfinished(limit)

    async def page(
        self,
        states: Sequence[str],
        *,
        after: tuple[float, str] | None,
        limit: int,
        newest_first: bool,
    ) -> list[tuple[float, str, LogEntry | None]]:
        return self._log.page(states, after=after, limit=limit, newest_first=newest_first)

    async def now(self) -> float:
        return self._log.now()

    async def durability(self) -> str | None:
        return self._log.durability()
