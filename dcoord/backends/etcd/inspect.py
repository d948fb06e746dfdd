"""Inspection of etcd locks (see :mod:`dcoord.inspect`): one range read, one lease query
per held lock.

A lock's queue is every key under its mutex prefix; the holder is the key with the
lowest create revision (as for ``etcdctl lock`` and Go's ``concurrency.Mutex``), the
waiters are the others, and the TTL left is the holder's lease's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...inspect import LockInfo, name_of_segment, parse_identity_json
from ..base import key_segment
from ..etcd_names import etcd_lock_prefix

if TYPE_CHECKING:
    from . import EtcdBackend


def locks(backend: EtcdBackend, prefix: str) -> list[LockInfo]:
    """The held locks of the backend's namespace whose names start with ``prefix``."""
    return _held(backend, key_segment(prefix))


def info(backend: EtcdBackend, name: str) -> LockInfo | None:
    """Lock ``name`` if it is held (one range read of its queue only)."""
    return next(iter(_held(backend, key_segment(name) + "/")), None)


def _held(backend: EtcdBackend, start: str) -> list[LockInfo]:
    """The held locks whose queue keys start with ``<lock root>start``."""
    etcd: Any = backend.etcd
    root = etcd_lock_prefix(backend.settings.namespace, "")
    queues: dict[str, list[tuple[bytes, Any]]] = {}
    kvs = backend.call(
        lambda: list(etcd.get_prefix(root + start)),
        what=f"list locks under {root}",
        retry=True,
    )
    for value, kv in kvs:
        segment, slash, _ = kv.key.decode().removeprefix(root).rpartition("/")
        if slash:
            queues.setdefault(segment, []).append((value, kv))
    found = []
    for segment, queue in queues.items():
        queue.sort(key=lambda pair: pair[1].create_revision)
        value, holder = queue[0]
        ttl_left = None
        if holder.lease_id:
            ttl = _lease_ttl(backend, holder.lease_id)
            if ttl < 0:
                continue  # expired since the read: the lock is no longer held by it
            ttl_left = float(ttl)
        who, queued_at = parse_identity_json(value)
        found.append(
            LockInfo(
                name=name_of_segment(segment),
                holder=None if who is None else who.holder,
                label=None if who is None else who.label,
                fence=holder.create_revision,
                acquired_at=queued_at,
                ttl_left=ttl_left,
                waiters=len(queue) - 1,
            )
        )
    return found


def _lease_ttl(backend: EtcdBackend, lease_id: int) -> int:
    """Whole seconds left of lease ``lease_id`` (-1: expired)."""
    etcd: Any = backend.etcd
    response = backend.call(
        lambda: etcd.get_lease_info(lease_id), what=f"read lease {lease_id:x}", retry=True
    )
    return int(response.TTL)


def groups(backend: EtcdBackend) -> set[str]:
    """The names of the groups with member keys in the backend's namespace."""
    etcd: Any = backend.etcd
    root = f"{backend.prefix}groups/"
    kvs = backend.call(
        lambda: [kv for _value, kv in etcd.get_prefix(root, keys_only=True)],
        what=f"list groups under {root}",
        retry=True,
    )
    names = set()
    for kv in kvs:
        name, found, _ = kv.key.decode().removeprefix(root).rpartition("/members/")
        if found:
            names.add(name)
    return names
