"""Plain keys on Redis: ``dcoord:<namespace>:kv:<key>``.

The prefix holds no ``{``, so a key's own hash tag decides its Redis Cluster slot: keys
that one :meth:`RedisKV.apply` touches must share one (``{orders}balance`` and
``{orders}limit``) on a Cluster, where a step across slots is refused with a
ConfigError naming the keys. One server runs any such step. With ``min_replicas``,
:meth:`RedisKV.apply` and :meth:`RedisKV.swap` are forced writes (see :mod:`.replication`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, cast

from .locks import LuaScript
from .scripts import lua
from .slots import mget, require_one_slot

if TYPE_CHECKING:
    from . import RedisBackend

_GLOB_SPECIALS = re.compile(r"([*?\[\]\\])")
APPLY = LuaScript(lua("kv_apply", checked=True))


def apply_call(
    prefix: str,
    puts: Mapping[str, bytes],
    deletes: Iterable[str],
    conditions: Mapping[str, bytes | None],
) -> tuple[list[str], list[bytes | str | int]]:
    """The keys and arguments of :data:`APPLY` for one swap (sync and async stores)."""
    keys = [prefix + k for k in (*conditions, *puts, *deletes)]
    args: list[bytes | str | int] = [len(conditions), len(puts)]
    for expected in conditions.values():
        args += ["0", ""] if expected is None else ["1", expected]
    args += list(puts.values())
    return keys, args


class RedisKV:
    def __init__(self, backend: RedisBackend, prefix: str) -> None:
        self._backend = backend
        self._redis = backend.redis
        self._prefix = f"{prefix}kv:"
        self._cluster = backend.settings.topology == "cluster"

    def get(self, key: str) -> bytes | None:
        value = self._backend.call(
            lambda: self._redis.get(self._prefix + key), what=f"get {key!r}", retry=True
        )
        return cast("bytes | None", value)

    def put(self, key: str, value: bytes) -> None:
        self._backend.call(
            lambda: self._redis.set(self._prefix + key, value), what=f"put {key!r}", retry=True
        )

    def delete(self, key: str) -> bool:
        return bool(
            self._backend.call(
                lambda: self._redis.delete(self._prefix + key), what=f"delete {key!r}"
            )
        )

    def scan(self, prefix: str) -> dict[str, bytes]:
        pattern = _GLOB_SPECIALS.sub(r"\\\1", self._prefix + prefix) + "*"
        cut = len(self._prefix)

        def scan() -> dict[str, bytes]:
            keys = [k.decode() for k in self._redis.scan_iter(match=pattern, count=1000)]
            values = mget(self._redis, keys)
            return {k[cut:]: v for k, v in zip(keys, values, strict=True) if v is not None}

        return self._backend.call(scan, what=f"scan {prefix!r}", retry=True)

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
        keys, args = apply_call(self._prefix, puts, deletes, conditions)
        if self._cluster:
            require_one_slot(keys, f"apply to {len(keys)} keys")
        what = f"apply to {len(keys)} keys"
        if puts or deletes:
            # A forced write (with min_replicas, WAIT for replicas): KVParticipant stages
            # its "yes" and applies its commit with it; neither may rest on the primary
            # alone.
            result = self._backend.call(
                lambda: self._backend.replication.write(APPLY, keys, args, what=what), what=what
            )
        else:  # only reads the conditions: nothing to wait for
            result = self._backend.call(lambda: APPLY(self._redis, keys, args), what=what)
        if not isinstance(result, list):
            return None
        return dict(zip(conditions, cast("list[bytes | None]", result), strict=True))
