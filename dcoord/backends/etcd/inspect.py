"""Inspection of etcd locks (see :mod:`dcoord.inspect`): one range read, one lease query
per held lock.

A lock's queue is every key under its mutex prefix; the holder is the key with the
lowest create revision (as for ``etcdctl lock`` and Go's ``concurrency.Mutex``), the
waiters are the others, and the TTL left is the holder's lease's. What a range read
means is the pure helpers here (:func:`queues`, :func:`lock_info`, :func:`group_names`),
which the async API's :mod:`.aio_inspect` shares.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ...inspect import LockInfo, name_of_segment, parse_identity_json
from ..base import key_segment
from ..etcd_names import etcd_lock_prefix

if TYPE_CHECKING:
    from . import EtcdBackend

_MEMBERS = "/members/"


def locks(backend: EtcdBackend, prefix: str) -> list[LockInfo]:
    """The held locks of the backend's namespace whose names start with ``prefix``."""
    return _held(backend, key_segment(prefix))


def info(backend: EtcdBackend, name: str) -> LockInfo | None:
    """Lock ``name`` if it is held (one range read of its queue only)."""
    return next(iter(_held(backend, key_segment(name) + "/")), None)


def _held(backend: EtcdBackend, start: str) -> list[LockInfo]:
    """The held locks whose queue keys start with ``<lock root>start``."""
    etcd: Any = backend.etcd
    root = lock_root(backend.settings.namespace)
    kvs = backend.call(
        lambda: list(etcd.get_prefix_response(root + start).kvs),
        what=f"list locks under {root}",
        retry=True,
    )
    found = []
    for segment, queue in queues(root, kvs).items():
        holder = queue[0]
        ttl_left = None
        if holder.lease:
            ttl = _lease_ttl(backend, holder.lease)
            if ttl < 0:
                continue  # expired since the read: the lock is no longer held by it
            ttl_left = float(ttl)
        found.append(lock_info(segment, queue, ttl_left))
    return found


def lock_root(namespace: str) -> str:
    """The prefix of every lock's queue in ``namespace``."""
    return etcd_lock_prefix(namespace, "")


def queues(root: str, kvs: Iterable[Any]) -> dict[str, list[Any]]:
    """The queue of each lock in a range read under ``root`` (etcd ``KeyValue``s, by
    lock segment), in create-revision order: the holder first."""
    found: dict[str, list[Any]] = {}
    for kv in kvs:
        segment, slash, _ = kv.key.decode().removeprefix(root).rpartition("/")
        if slash:
            found.setdefault(segment, []).append(kv)
    for queue in found.values():
        queue.sort(key=lambda kv: kv.create_revision)
    return found


def lock_info(segment: str, queue: list[Any], ttl_left: float | None) -> LockInfo:
    """The lock of key segment ``segment`` from its queue (as :func:`queues` gives it)
    and the TTL left of its holder's lease."""
    holder = queue[0]
    who, queued_at = parse_identity_json(holder.value)
    return LockInfo(
        name=name_of_segment(segment),
        holder=None if who is None else who.holder,
        label=None if who is None else who.label,
        fence=holder.create_revision,
        acquired_at=queued_at,
        ttl_left=ttl_left,
        waiters=len(queue) - 1,
    )


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
    root = groups_root(backend.prefix)
    kvs = backend.call(
        lambda: list(etcd.get_prefix_response(root, keys_only=True).kvs),
        what=f"list groups under {root}",
        retry=True,
    )
    return group_names(root, kvs)


def groups_root(namespace_prefix: str) -> str:
    """The prefix of every group's keys."""
    return f"{namespace_prefix}groups/"


def group_names(root: str, kvs: Iterable[Any]) -> set[str]:
    """The groups with member keys among ``kvs`` (a range read under ``root``)."""
    names = set()
    for kv in kvs:
        name, found, _ = kv.key.decode().removeprefix(root).rpartition(_MEMBERS)
        if found:
            names.add(name)
    return names
