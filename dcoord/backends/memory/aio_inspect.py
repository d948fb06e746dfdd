"""Inspection of the embedded store's locks for :mod:`dcoord.aio`: the sync functions
(:mod:`.inspect`) on the same store, which never wait."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...inspect import LockInfo
from .inspect import group_names, held, named

if TYPE_CHECKING:
    from .aio_locks import AsyncMemoryBackend


async def locks(backend: AsyncMemoryBackend, prefix: str) -> list[LockInfo]:
    """The held locks of the backend's namespace whose names start with ``prefix``."""
    return held(backend.locks.store, prefix)


async def info(backend: AsyncMemoryBackend, name: str) -> LockInfo | None:
    """Lock ``name`` if it is held."""
    return named(held(backend.locks.store, name), name)


async def groups(backend: AsyncMemoryBackend) -> set[str]:
    """The names of the groups stored in the backend's namespace."""
    return group_names(backend.server, backend.prefix)
