"""The 2PC decision log on Redis; every change is one Lua script, so it is atomic.

Keys::

    dcoord:<ns>:tx:r:<txid>     the record (JSON); finished ones expire (PX retention)
    dcoord:<ns>:tx:unfinished   sorted set of unfinished txids, scored by deadline

Compare-and-set compares the record's exact bytes (the record only grows along the
state machine, so equal bytes mean no change). How durable a record is depends on the
server's persistence and eviction policy: see :mod:`.persistence`.
"""

from __future__ import annotations

import re
import threading
import time
from typing import TYPE_CHECKING, cast

from ..base import LogEntry
from . import persistence
from .scripts import lua

if TYPE_CHECKING:
    from . import RedisBackend

_GLOB_SPECIALS = re.compile(r"([*?\[\]\\])")
# The server clock is read with TIME at most this often and carried forward on the local
# monotonic clock in between, so that TIME is not a round trip on every commit's path.
_CLOCK_REREAD = 5.0


class RedisTxLog:
    def __init__(self, backend: RedisBackend, prefix: str) -> None:
        self._backend = backend
        self._redis = backend.redis
        self._records = f"{prefix}tx:r:"
        self._unfinished = f"{prefix}tx:unfinished"
        self._create = self._redis.register_script(lua("txlog_create", checked=True))
        self._cas = self._redis.register_script(lua("txlog_cas", checked=True))
        self._clock_mutex = threading.Lock()
        self._clock: tuple[float, float] | None = None  # (server time, monotonic at reply)

    def create(self, txid: str, data: bytes, deadline: float) -> LogEntry | None:
        created = self._backend.call(
            lambda: self._create(
                keys=[self._records + txid, self._unfinished], args=[data, repr(deadline), txid]
            ),
            what=f"create transaction record {txid!r}",
        )
        return LogEntry(bytes(data), bytes(data)) if created else None

    def cas(
        self, txid: str, expected: LogEntry, data: bytes, *, finished: bool, retention: float
    ) -> LogEntry | None:
        args = [expected.data, data, "1" if finished else "0", max(1, int(retention * 1000)), txid]
        changed = self._backend.call(
            lambda: self._cas(keys=[self._records + txid, self._unfinished], args=args),
            what=f"update transaction record {txid!r}",
        )
        return LogEntry(bytes(data), bytes(data)) if changed else None

    def get(self, txid: str) -> LogEntry | None:
        data = self._backend.call(
            lambda: cast("bytes | None", self._redis.get(self._records + txid)),
            what=f"read transaction record {txid!r}",
            retry=True,
        )
        return None if data is None else LogEntry(data, data)

    def unfinished(self, limit: int | None = None) -> list[tuple[str, LogEntry | None]]:
        def read() -> list[tuple[str, LogEntry | None]]:
            end = -1 if limit is None else limit - 1
            found = cast("list[bytes]", self._redis.zrange(self._unfinished, 0, end))
            txids = [t.decode() for t in found]
            keys = [self._records + t for t in txids]
            values = cast("list[bytes | None]", self._redis.mget(keys) if keys else [])
            return [
                (t, None if v is None else LogEntry(v, v))
                for t, v in zip(txids, values, strict=True)
            ]

        return self._backend.call(read, what="list unfinished transactions", retry=True)

    def scan(self) -> dict[str, LogEntry]:
        pattern = _GLOB_SPECIALS.sub(r"\\\1", self._records) + "*"
        cut = len(self._records)

        def read() -> dict[str, LogEntry]:
            keys = list(self._redis.scan_iter(match=pattern, count=1000))
            values = cast("list[bytes | None]", self._redis.mget(keys) if keys else [])
            return {
                k.decode()[cut:]: LogEntry(v, v)
                for k, v in zip(keys, values, strict=True)
                if v is not None
            }

        return self._backend.call(read, what="list transactions", retry=True)

    def now(self) -> float:
        with self._clock_mutex:
            clock = self._clock
        local = time.monotonic()
        if clock is not None and local - clock[1] < _CLOCK_REREAD:
            # Counted from when the reply *arrived*, the estimate is at or behind the
            # server's clock: a deadline set by it is never later than the server's own.
            return clock[0] + (local - clock[1])
        seconds, micros = self._backend.call(
            lambda: self._redis.time(),
            what="read the redis server clock",
            retry=True,
        )
        clock = (seconds + micros / 1e6, time.monotonic())
        with self._clock_mutex:
            self._clock = clock
        return clock[0]

    def durability(self) -> str | None:
        return persistence.log_problem(persistence.read(self._backend))
