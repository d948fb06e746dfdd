"""Inspection of the embedded store's locks (see :mod:`dcoord.inspect`).

:func:`held` and :func:`group_names` read the store itself (short critical sections,
never waiting), so the async API (:mod:`.aio_inspect`) calls them as they are.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ...inspect import LockInfo

if TYPE_CHECKING:
    from . import MemoryBackend, MemoryServer
    from .locks import MemoryLocks


def info(backend: MemoryBackend, name: str) -> LockInfo | None:
    """Lock ``name`` if it is held."""
    return named(held(backend.locks, name), name)


def locks(backend: MemoryBackend, prefix: str) -> list[LockInfo]:
    """The held locks of the backend's namespace whose names start with ``prefix``."""
    return held(backend.locks, prefix)


def groups(backend: MemoryBackend) -> set[str]:
    """The names of the groups stored in the backend's namespace."""
    return group_names(backend.server, backend.prefix)


def named(found: list[LockInfo], name: str) -> LockInfo | None:
    """The lock called ``name`` among ``found`` (a listing by the prefix ``name``)."""
    return next((i for i in found if i.name == name), None)


def held(store: MemoryLocks, prefix: str) -> list[LockInfo]:
    """The held locks of ``store`` (one namespace's) whose names start with ``prefix``."""
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


def group_names(server: MemoryServer, namespace_prefix: str) -> set[str]:
    """The names of the groups stored in ``server`` under ``namespace_prefix``."""
    prefix = f"{namespace_prefix}groups/"
    with server.cond:
        return {key[len(prefix) :] for key in server.data if key.startswith(prefix)}
