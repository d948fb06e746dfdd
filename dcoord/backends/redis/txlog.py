"""The 2PC decision log on Redis; every change is one Lua script, so it is atomic.

Keys::

    dcoord:<ns>:tx:r:<txid>     the record (JSON); finished ones expire (PX retention)
    dcoord:<ns>:tx:unfinished   sorted set of unfinished txids, scored by deadline

Compare-and-set compares the record's exact bytes (the record only grows along the
state machine, so equal bytes mean no change). How durable a record is depends on the
server's persistence: see :meth:`RedisTxLog.durability`.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import TYPE_CHECKING, cast

from ...errors import BackendError
from ..base import LogEntry

if TYPE_CHECKING:
    from . import RedisBackend

_GLOB_SPECIALS = re.compile(r"([*?\[\]\\])")


def _script(name: str) -> str:
    return resources.files(__package__).joinpath(f"{name}.lua").read_text()


class RedisTxLog:
    def __init__(self, backend: RedisBackend, prefix: str) -> None:
        self._backend = backend
        self._redis = backend.redis
        self._records = f"{prefix}tx:r:"
        self._unfinished = f"{prefix}tx:unfinished"
        self._create = self._redis.register_script(_script("txlog_create"))
        self._cas = self._redis.register_script(_script("txlog_cas"))

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

    def durability(self) -> str | None:
        def read() -> dict[str, str]:
            found: dict[str, str] = {}
            for name in ("appendonly", "appendfsync"):
                found.update({str(k): str(v) for k, v in self._redis.config_get(name).items()})
            return found

        try:
            config = self._backend.call(read, what="read redis persistence settings", retry=True)
        except BackendError as exc:  # CONFIG renamed, disabled or denied by ACL
            return f"its persistence settings cannot be checked (CONFIG GET refused: {exc})"
        if config.get("appendonly") != "yes":
            return "redis has appendonly off: a server crash loses recent decisions"
        if config.get("appendfsync") != "always":
            return (
                f"redis has appendfsync {config.get('appendfsync')}, not always: "
                "a server crash can lose the last second of decisions"
            )
        return None
