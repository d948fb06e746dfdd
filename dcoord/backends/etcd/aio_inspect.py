"""Inspection of etcd locks for :mod:`dcoord.aio`: the sync module's readings
(:mod:`.inspect`) through ``grpc.aio``: one range read, then one lease query per held
lock (concurrently)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from pyetcd import etcdrpc
from pyetcd.utils import prefix_range_end

from ...inspect import LockInfo
from ..base import key_segment
from .inspect import group_names, groups_root, lock_info, lock_root, queues

if TYPE_CHECKING:
    from .aio_locks import AsyncEtcdBackend


async def locks(backend: AsyncEtcdBackend, prefix: str) -> list[LockInfo]:
    """The held locks of the backend's namespace whose names start with ``prefix``."""
    return await _held(backend, key_segment(prefix))


async def info(backend: AsyncEtcdBackend, name: str) -> LockInfo | None:
    """Lock ``name`` if it is held (one range read of its queue only)."""
    return next(iter(await _held(backend, key_segment(name) + "/")), None)


async def groups(backend: AsyncEtcdBackend) -> set[str]:
    """The names of the groups with member keys in the backend's namespace."""
    root = groups_root(backend.prefix)
    return group_names(root, await _range(backend, root, f"list groups under {root}", True))


async def _held(backend: AsyncEtcdBackend, start: str) -> list[LockInfo]:
    """The held locks whose queue keys start with ``<lock root>start``."""
    root = lock_root(backend.settings.namespace)
    kvs = await _range(backend, root + start, f"list locks under {root}", False)
    held = list(queues(root, kvs).items())
    ttls = await asyncio.gather(*(_ttl_left(backend, queue[0].lease) for _, queue in held))
    return [
        lock_info(segment, queue, ttl_left)
        for (segment, queue), (expired, ttl_left) in zip(held, ttls, strict=True)
        if not expired  # the holder's lease expired since the read: not held by it
    ]


async def _range(backend: AsyncEtcdBackend, prefix: str, what: str, keys_only: bool) -> list[Any]:
    key = prefix.encode()
    request = etcdrpc.RangeRequest(key=key, range_end=prefix_range_end(key), keys_only=keys_only)
    reply = await backend.call(
        lambda: backend.kv.Range(request, timeout=backend.timeout, metadata=backend.metadata),
        what=what,
        retry=True,
    )
    return list(reply.kvs)


async def _ttl_left(backend: AsyncEtcdBackend, lease: int) -> tuple[bool, float | None]:
    """Whether lease ``lease`` expired, and its whole seconds left (None: no lease)."""
    if not lease:
        return False, None
    reply = await backend.call(
        lambda: backend.lease.LeaseTimeToLive(
            etcdrpc.LeaseTimeToLiveRequest(ID=lease),
            timeout=backend.timeout,
            metadata=backend.metadata,
        ),
        what=f"read lease {lease:x}",
        retry=True,
    )
    ttl = int(reply.TTL)
    return ttl < 0, None if ttl < 0 else float(ttl)
