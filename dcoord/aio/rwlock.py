"""Async read-write locks: :class:`dcoord.ReadWriteLock`'s semantics on the caller's loop.

:meth:`AsyncReadWriteLock.read` and :meth:`AsyncReadWriteLock.write` return handles that
are :class:`~dcoord.aio.AsyncLock` s over a read or write slot of the backend's async
rwlock store (``backend.rwlocks.slot(name, write, ttl, auto_renew)``, see
:class:`~dcoord.backends.aio_base.AsyncRWLockStore`), on the sync stores' keys and
scripts: sync and async readers and writers of one name share one lock. Admission is the
sync one's (:mod:`dcoord.rwlock`): a writer when nobody holds the lock, a reader when no
writer holds it and none waits; a writer's fence exceeds that of every earlier grant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import LockTimeout
from ..lock import DEFAULT_TTL, validate_name, validate_timeout, validate_ttl
from .lock import OnLost
from .semaphore import AsyncRecipeLock

if TYPE_CHECKING:
    from .client import AsyncClient


class AsyncReadWriteLock:
    """The read-write lock ``name``: make a :meth:`read` or :meth:`write` handle per holder.

    Made by :meth:`AsyncClient.rwlock`. Nothing is written until a handle acquires.
    """

    def __init__(
        self,
        client: AsyncClient,
        name: str,
        *,
        ttl: float = DEFAULT_TTL,
        timeout: float | None = None,
    ) -> None:
        self.name = validate_name("rwlock name", name)
        self.ttl = validate_ttl(ttl)
        self.timeout = None if timeout is None else validate_timeout("timeout", timeout)
        self._client = client

    def read(self, *, auto_renew: bool = True, on_lost: OnLost | None = None) -> AsyncReadLock:
        """A new reader handle: shares the lock with other readers, excludes writers."""
        self._client.check_open()
        return AsyncReadLock(self, auto_renew=auto_renew, on_lost=on_lost)

    def write(self, *, auto_renew: bool = True, on_lost: OnLost | None = None) -> AsyncWriteLock:
        """A new writer handle: excludes every other reader and writer."""
        self._client.check_open()
        return AsyncWriteLock(self, auto_renew=auto_renew, on_lost=on_lost)

    def __repr__(self) -> str:
        return f"<dcoord.aio.AsyncReadWriteLock {self.name!r} ttl={self.ttl:g}>"


class _AsyncSide(AsyncRecipeLock):
    """One holder of a read-write lock, reading or writing (see :class:`AsyncLock`)."""

    write_mode = False
    mode = "read"

    def __init__(
        self, rwlock: AsyncReadWriteLock, *, auto_renew: bool, on_lost: OnLost | None
    ) -> None:
        client = rwlock._client
        super().__init__(
            client,
            rwlock.name,
            ttl=rwlock.ttl,
            timeout=rwlock.timeout,
            auto_renew=auto_renew,
            on_lost=on_lost,
        )
        # The lock's machinery drives any slot: swap the lock slot (it wrote nothing)
        # for a read or write slot of the rwlock.
        self._slot = client.backend.rwlocks.slot(self.name, self.write_mode, self.ttl, auto_renew)

    async def __aenter__(self) -> _AsyncSide:
        if not await self.acquire():
            raise LockTimeout(
                f"rwlock {self.name!r}: {self.mode} not acquired within {self.timeout} s"
            )
        return self

    def __repr__(self) -> str:
        state = "held" if self.held else "not held"
        return (
            f"<dcoord.aio.{type(self).__name__} {self.name!r} ttl={self.ttl:g} {state} "
            f"fence={self._last_fence}>"
        )


class AsyncReadLock(_AsyncSide):
    """A reader's handle on an :class:`AsyncReadWriteLock`."""


class AsyncWriteLock(_AsyncSide):
    """A writer's handle on an :class:`AsyncReadWriteLock`."""

    write_mode = True
    mode = "write"
