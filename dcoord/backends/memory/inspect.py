"""Inspection of the embedded store's locks (see :mod:`dcoord.inspect`)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ...inspect import LockInfo

if TYPE_CHECKING:
    from . import MemoryBackend


def info(backend: MemoryBackend, name: str) -> LockInfo | None:
    """Lock ``name`` if it is held."""
    return next((i for i in locks(backend, name) if i.name == name), None)


def locks(backend: MemoryBackend, prefix: str) -> list[LockInfo]:
    """The held locks of the backend's namespace whose names start with ``prefix``."""
    store = backend.locks
    start = store.lock_prefix + prefix
    found = []
    with store.table.mutex:
        now = time.monotonic()
        for key, entry in store.table.entries.items():
            if not key.startswith(start) or entry.free(now):
                continue
            holder = entry.holder
            found.append(
                LockInfo(
                    name=key.removeprefix(store.lock_prefix),
                    holder=None if holder is None else holder.holder,
                    label=None if holder is None else holder.label,
                    fence=entry.fence,
                    acquired_at=entry.acquired_at,
                    ttl_left=entry.expires_at - now,
                    waiters=entry.waiters,
                )
            )
    return found


def groups(backend: MemoryBackend) -> set[str]:
    """The names of the groups stored in the backend's namespace."""
    prefix = f"{backend.prefix}groups/"
    with backend.server.cond:
        return {key[len(prefix) :] for key in backend.server.data if key.startswith(prefix)}
