"""Async counting semaphores: :class:`dcoord.Semaphore`'s semantics on the caller's loop.

An :class:`AsyncSemaphore` is an :class:`~dcoord.aio.AsyncLock` whose backend slot is a
*permit* of the semaphore instead of the single holder (as the sync
:class:`~dcoord.Semaphore` is a :class:`~dcoord.Lock`): validation, the held deadline,
renewal, ``on_lost``, cancellation, ``async with`` and the errors are the lock's,
written once. Backends provide ``backend.semaphores.slot(name, limit, ttl, auto_renew)``
(see :class:`~dcoord.backends.aio_base.AsyncSemaphoreStore`), on the sync stores' keys
and scripts: a sync and an async handle of one name share its permits.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ..errors import ClientClosed, LockTimeout
from ..lock import DEFAULT_TTL, validate_name
from ..semaphore import validate_limit
from .lock import AsyncLock, OnLost

if TYPE_CHECKING:
    from .client import AsyncClient


class AsyncRecipeLock(AsyncLock):
    """An :class:`~dcoord.aio.AsyncLock` whose slot is another primitive's (a permit, a
    read or write side): subclasses swap ``_slot`` after ``AsyncLock.__init__`` (which
    wrote nothing)."""

    async def acquire(self, timeout: float | None = None) -> bool:
        """As :meth:`dcoord.aio.AsyncLock.acquire`; a wait cut short by closing this
        handle's client raises :class:`~dcoord.ClientClosed`, whatever the closed
        connection raised (as the sync recipes do)."""
        try:
            return await super().acquire(timeout)
        except asyncio.CancelledError as exc:
            # A closing client's channels cancel the calls in flight (grpc.aio): that is
            # no cancellation of this task, which would otherwise end as if cancelled.
            task = asyncio.current_task()
            if self._client.closed and task is not None and not task.cancelling():
                raise self._closed_while_waiting() from exc
            raise
        except Exception as exc:
            if self._client.closed and not isinstance(exc, ClientClosed):
                raise self._closed_while_waiting() from exc
            raise

    def _closed_while_waiting(self) -> ClientClosed:
        return ClientClosed(
            f"{self!r}: client {self._client.url} is closed (it closed while waiting)"
        )


class AsyncSemaphore(AsyncRecipeLock):
    """A distributed counting semaphore: at most ``limit`` handles hold it at once.

    Made by :meth:`AsyncClient.semaphore`; the semantics are :class:`dcoord.Semaphore`'s
    (one permit per handle, a fence per grant, waiters woken by releases and expiries,
    every handle of one name uses the same ``limit``). Acquire, release, :attr:`held`,
    ``on_lost``, ``async with``, cancellation and the errors are those of
    :class:`~dcoord.aio.AsyncLock`.
    """

    def __init__(
        self,
        client: AsyncClient,
        name: str,
        limit: int,
        *,
        ttl: float = DEFAULT_TTL,
        timeout: float | None = None,
        auto_renew: bool = True,
        on_lost: OnLost | None = None,
    ) -> None:
        # Validated here first so that the messages name the semaphore, not a lock.
        validate_name("semaphore name", name)
        self.limit = validate_limit(limit)
        super().__init__(
            client, name, ttl=ttl, timeout=timeout, auto_renew=auto_renew, on_lost=on_lost
        )
        # The lock's machinery drives any slot: swap the lock slot (it wrote nothing)
        # for a permit of this semaphore.
        self._slot = client.backend.semaphores.slot(self.name, self.limit, self.ttl, auto_renew)

    async def __aenter__(self) -> AsyncSemaphore:
        if not await self.acquire():
            raise LockTimeout(
                f"semaphore {self.name!r} (limit {self.limit}): no permit within {self.timeout} s"
            )
        return self

    def __repr__(self) -> str:
        state = "held" if self.held else "not held"
        return (
            f"<dcoord.aio.AsyncSemaphore {self.name!r} limit={self.limit} ttl={self.ttl:g} "
            f"{state} fence={self._last_fence}>"
        )
