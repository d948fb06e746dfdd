"""Read-write locks: many readers or one writer, writers not starved, every grant fenced.

:meth:`ReadWriteLock.read` and :meth:`ReadWriteLock.write` return handles that are
:class:`~dcoord.lock.Lock` s over a read or write slot of the backend's rwlock store
(``backend.rwlocks.slot(name, write, ttl, auto_renew)``, see
:class:`~dcoord.backends.base.RWLockStore`), so held deadlines, auto-renewal,
``on_lost``, ``with`` and the errors are the lock's, written once.

Admission (every backend): a writer is admitted when nobody holds the lock; a reader
when no writer holds it *and no writer is waiting* (kazoo's rule: readers queue only
behind earlier writers), so a stream of readers cannot starve a writer. A writer's fence
is greater than the fence of every grant (read or write) made before it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import LockTimeout
from .lock import DEFAULT_TTL, OnLost, validate_name, validate_timeout, validate_ttl
from .semaphore import RecipeLock

if TYPE_CHECKING:
    from .client import Client


class ReadWriteLock:
    """The read-write lock ``name``: make a :meth:`read` or :meth:`write` handle per holder.

    Made by :meth:`dcoord.Client.rwlock`. Nothing is written until a handle acquires.
    """

    def __init__(
        self, client: Client, name: str, *, ttl: float = DEFAULT_TTL, timeout: float | None = None
    ) -> None:
        self.name = validate_name("rwlock name", name)
        self.ttl = validate_ttl(ttl)
        self.timeout = None if timeout is None else validate_timeout("timeout", timeout)
        self._client = client

    def read(self, *, auto_renew: bool = True, on_lost: OnLost | None = None) -> ReadLock:
        """A new reader handle: shares the lock with other readers, excludes writers."""
        self._client.check_open()
        return ReadLock(self, auto_renew=auto_renew, on_lost=on_lost)

    def write(self, *, auto_renew: bool = True, on_lost: OnLost | None = None) -> WriteLock:
        """A new writer handle: excludes every other reader and writer."""
        self._client.check_open()
        return WriteLock(self, auto_renew=auto_renew, on_lost=on_lost)

    def __repr__(self) -> str:
        return f"<dcoord.ReadWriteLock {self.name!r} ttl={self.ttl:g}>"


class _Side(RecipeLock):
    """One holder of a read-write lock, reading or writing (see :class:`~dcoord.Lock`)."""

    write_mode = False
    mode = "read"

    def __init__(self, rwlock: ReadWriteLock, *, auto_renew: bool, on_lost: OnLost | None) -> None:
        client = rwlock._client
        super().__init__(
            client,
            rwlock.name,
            ttl=rwlock.ttl,
            timeout=rwlock.timeout,
            auto_renew=auto_renew,
            on_lost=on_lost,
        )
        # The lock's machinery drives any LockSlot: swap the lock slot (it wrote nothing)
        # for a read or write slot of the rwlock.
        self._slot = client.backend.rwlocks.slot(self.name, self.write_mode, self.ttl, auto_renew)

    def __enter__(self) -> _Side:
        if not self.acquire():
            raise LockTimeout(
                f"rwlock {self.name!r}: {self.mode} not acquired within {self.timeout} s"
            )
        return self

    def __repr__(self) -> str:
        state = "held" if self.held else "not held"
        return (
            f"<dcoord.{type(self).__name__} {self.name!r} ttl={self.ttl:g} {state} "
            f"fence={self._last_fence}>"
        )


class ReadLock(_Side):
    """A reader's handle on a :class:`ReadWriteLock`."""


class WriteLock(_Side):
    """A writer's handle on a :class:`ReadWriteLock`."""

    write_mode = True
    mode = "write"
