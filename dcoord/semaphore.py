"""Counting semaphores: at most ``limit`` handles hold a name at once, each grant fenced.

A :class:`Semaphore` handle is a :class:`~dcoord.lock.Lock` whose backend slot is a
*permit* instead of the single holder: everything else (validation, the conservative
client-side deadline behind :attr:`held`, auto-renewal by the client's watchdog,
``on_lost``, the context manager, the errors) is the lock's, written once. Backends
provide ``backend.semaphores.slot(name, limit, ttl, auto_renew)``, a
:class:`~dcoord.backends.base.LockSlot` (see :class:`~dcoord.backends.base.SemaphoreStore`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ClientClosed, ConfigError, LockTimeout
from .lock import DEFAULT_TTL, Lock, OnLost, validate_name

if TYPE_CHECKING:
    from .client import Client

MAX_LIMIT = 1_000_000


def validate_limit(limit: object) -> int:
    """A semaphore limit: an int in [1, 1,000,000] (not a bool)."""
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise ConfigError(f"semaphore limit must be an int >= 1, got {limit!r}")
    if not 1 <= limit <= MAX_LIMIT:
        raise ConfigError(f"semaphore limit must be an int in [1, {MAX_LIMIT}], got {limit!r}")
    return limit


class RecipeLock(Lock):
    """A :class:`~dcoord.Lock` whose slot is another primitive's (a permit, a read or
    write side): subclasses swap ``_slot`` after ``Lock.__init__`` (which wrote nothing)."""

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """As :meth:`dcoord.Lock.acquire`; a wait cut short by closing this handle's client
        raises :class:`~dcoord.ClientClosed`, whatever the closed connection raised."""
        try:
            return super().acquire(blocking, timeout)
        except Exception as exc:
            if self._client.closed and not isinstance(exc, ClientClosed):
                raise ClientClosed(
                    f"{self!r}: client {self._client.url} is closed (it closed while waiting)"
                ) from exc
            raise


class Semaphore(RecipeLock):
    """A distributed counting semaphore: at most ``limit`` handles hold it at once.

    Made by :meth:`dcoord.Client.semaphore`. One handle holds at most one permit; make
    one handle per concurrent holder. Every grant gets a fencing token (:attr:`fence`)
    that is unique to it and greater than that of every grant of this semaphore name
    completed before the acquire began. A holder that stops renewing (a crash, a pause)
    frees its permit within ``ttl``; waiters are woken by releases and expiries, not by
    polling. Every handle of one name must use the same ``limit``: each acquire counts
    the holders against its own limit.

    Acquire, release, :attr:`held`, ``on_lost``, ``with`` and the errors are those of
    :class:`~dcoord.Lock` (``LockTimeout``, ``LockNotOwned``, ``LockLost``).
    """

    def __init__(
        self,
        client: Client,
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
        # The lock's machinery drives any LockSlot: swap the lock slot (it wrote nothing)
        # for a permit of this semaphore.
        self._slot = client.backend.semaphores.slot(self.name, self.limit, self.ttl, auto_renew)

    def __enter__(self) -> Semaphore:
        if not self.acquire():
            raise LockTimeout(
                f"semaphore {self.name!r} (limit {self.limit}): no permit within {self.timeout} s"
            )
        return self

    def __repr__(self) -> str:
        state = "held" if self.held else "not held"
        return (
            f"<dcoord.Semaphore {self.name!r} limit={self.limit} ttl={self.ttl:g} {state} "
            f"fence={self._last_fence}>"
        )
