"""Read-write locks on etcd: the queue of :mod:`.semaphore` with two kinds of keys.

Keys of rwlock ``NAME``: writers under ``/dcoord/<ns>/rw/NAME/w/``, readers under
``.../rw/NAME/r/``, each ``<lease>-<serial>`` on a lease as locks are. A writer is
admitted when no key at all (``rw/NAME/``) was created before its own; a reader when no
*writer* key was (kazoo's rule, #649/#650: count lower create revisions only). A waiting
writer's key therefore blocks every reader that queues after it, and the queue is FIFO.
The fence is the key's create revision: a writer's exceeds every earlier grant's, since
everything created before it is gone when it is admitted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..base import key_segment
from .semaphore import EtcdQueueSlot, Queue

if TYPE_CHECKING:
    from . import EtcdBackend


def rwlock_queue(prefix: str, name: str, write: bool) -> tuple[str, Queue]:
    """What the read or write side of rwlock ``name`` is called in messages, and its
    queue (see the module doc)."""
    base = f"{prefix}rw/{key_segment(name)}/"
    writers = f"{base}w/".encode()
    if write:
        own, counted = writers, base.encode()
    else:
        own, counted = f"{base}r/".encode(), writers
    return f"rwlock {name!r} ({'write' if write else 'read'})", Queue(own, counted, 1)


class EtcdRWLocks:
    """The read-write lock store of one etcd backend."""

    def __init__(self, backend: EtcdBackend) -> None:
        self._locks = backend.locks
        self._prefix = backend.prefix

    def slot(self, name: str, write: bool, ttl: float, auto_renew: bool) -> EtcdQueueSlot:
        what, queue = rwlock_queue(self._prefix, name, write)
        return EtcdQueueSlot(self._locks, what, queue, ttl, auto_renew)
