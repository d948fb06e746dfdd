"""Async semaphores on Redis: the sync slots' :class:`.semaphore.Recipe` (script, keys,
channel, operations) run through ``redis.asyncio``, so sync and async handles of one
name share its permits; read-write locks (:mod:`.aio_rwlock`) use the same slot.

A waiter wakes on a release message through the async lock store's one notifier per
client (:class:`.aio_locks._Notifier`), or at the script's hint (a holder's expiry, at
most a third of the TTL), whichever comes first. A semaphore's release frees one permit
and wakes one waiter (a waiter that does not use a wake-up passes it on); an rwlock's
wakes them all (:attr:`.semaphore.Recipe.wakes_all`: a writer's release admits every
waiting reader). Cancellation leaves nothing behind: an attempt cancelled while
its script is in flight is undone by a task of the lock store (the script may still
run), and a waiting writer's claim is withdrawn by one (it would block readers).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import TYPE_CHECKING, Any

from ...errors import BackendUnavailable
from ..base import LockGrant
from .aio_locks import run_script
from .locks import answered
from .semaphore import Recipe, semaphore_recipe

if TYPE_CHECKING:
    from .aio_locks import AsyncRedisBackend, AsyncRedisLocks


class AsyncScriptSlot:
    """One async handle's grant of a semaphore or rwlock side (an
    :class:`~dcoord.backends.aio_base.AsyncLockSlot`); see :class:`.semaphore.ScriptSlot`."""

    def __init__(self, locks: AsyncRedisLocks, recipe: Recipe, ttl: float) -> None:
        self._locks = locks
        self._call = locks.backend.call
        self._recipe = recipe
        self.keys = list(recipe.keys)
        self.channel = recipe.channel
        self._ttl = ttl
        self._token: str | None = None
        self._fence = 0

    async def _eval(self, op: str, token: str, ttl: float) -> int:
        """One run of the script, redis errors raw (for the backend's ``call``)."""
        args = self._recipe.args(op, token, ttl)
        return int(await run_script(self._recipe.script, self._locks.redis, self.keys, args))

    async def _undo(self, token: str) -> int:
        """Release what an attempt of ``token`` may hold and withdraw its claim."""
        released = await self._eval(self._recipe.release_op, token, self._ttl)
        if self._recipe.give_up is not None:
            await self._eval(self._recipe.give_up, token, self._ttl)
        return released

    def _undo_later(self, token: str, what: str, sure_after: float) -> None:
        """:meth:`_undo` in a task of the lock store (retried until ``sure_after``); not
        once the client closed: nobody would stop the task, and the TTL covers it."""
        if not self._locks.notifier._closed:
            self._locks.undo(lambda: self._undo(token), what, sure_after)

    async def acquire(self, deadline: float | None) -> LockGrant | None:
        token = secrets.token_hex(16)  # one id per grant: an old one can never act
        try:
            result, sent = await self._try(token)
            if result <= 0 and (deadline is None or time.monotonic() < deadline):
                result, sent = await self._wait(token, deadline)
        except BaseException:
            if self._recipe.give_up is not None:
                # Cancelled or failed while waiting: a writer's claim would block the
                # readers until its TTL; withdraw it (a task: we may be cancelled).
                self._undo_later(token, f"withdraw {self._recipe.what}", 0.0)
            raise
        if result <= 0:
            if self._recipe.give_up is not None:
                await self._call(
                    lambda: self._eval(self._recipe.give_up or "", token, self._ttl),
                    what=f"{self._recipe.give_up} {self._recipe.what}",
                    retry=True,
                )
            return None
        self._token, self._fence = token, result
        return LockGrant(result, sent + self._ttl)

    async def _try(self, token: str) -> tuple[int, float]:
        sent = time.monotonic()
        op = self._recipe.acquire_op
        try:
            result = await self._call(
                lambda: self._eval(op, token, self._ttl), what=f"{op} {self._recipe.what}"
            )
        except BaseException as exc:
            # Not an error reply (a lost reply, or a cancellation while the script was
            # in flight): it may have run or run yet. Undo it rather than leave a permit
            # nobody knows of until its TTL.
            if not answered(exc):
                what = f"undo the acquire of {self._recipe.what} whose reply was lost"
                self._undo_later(token, what, sent + self._ttl)
            raise
        return result, sent

    async def _wait(self, token: str, deadline: float | None) -> tuple[int, float]:
        notifier = self._locks.notifier
        async with notifier.interest(self.channel, broadcast=self._recipe.wakes_all) as channel:
            while True:
                # A closed notifier (the client is closing) wakes no one any more: stop
                # rather than try on a closed connection at every hint.
                if notifier._closed:
                    raise BackendUnavailable(f"wait for {self._recipe.what}: the client is closing")
                # Park before trying: a release published after the try then wakes us,
                # so the wait below cannot miss it.
                woken = channel.park()
                try:
                    result, sent = await self._try(token)
                except BaseException:
                    channel.leave(woken)
                    raise
                now = time.monotonic()
                if result > 0 or (deadline is not None and now >= deadline):
                    # A wake-up got meanwhile may be for a permit freed after the one we
                    # took (or, at the deadline, did not take): the next waiter's.
                    channel.leave(woken)
                    return result, sent
                wait = self._recipe.retry_in(result, self._ttl)
                if deadline is not None:
                    wait = min(wait, deadline - now)
                try:
                    await asyncio.wait_for(woken, wait)  # cancels ``woken`` on timeout
                except TimeoutError:
                    pass
                except BaseException:
                    channel.leave(woken)
                    raise

    async def release(self) -> bool:
        token, self._token = self._token, None
        if token is None:
            return False
        attempts = 0

        async def release() -> int:
            nonlocal attempts
            attempts += 1
            return await self._eval(self._recipe.release_op, token, self._ttl)

        what = f"release {self._recipe.what}"
        released = await self._call(release, what=what, retry=True)
        # A retry that finds nothing may follow a first attempt whose reply was lost
        # (as the sync slot).
        return bool(released) or attempts > 1

    async def extend(self, ttl: float) -> LockGrant | None:
        token = self._token
        if token is None:
            return None
        sent = time.monotonic()
        op = self._recipe.extend_op
        extended: Any = await self._call(
            lambda: self._eval(op, token, ttl), what=f"{op} {self._recipe.what}"
        )
        return LockGrant(self._fence, sent + ttl) if extended else None


class AsyncRedisSemaphores:
    """The async semaphore store of one Redis backend."""

    def __init__(self, backend: AsyncRedisBackend) -> None:
        self._backend = backend

    def slot(self, name: str, limit: int, ttl: float, auto_renew: bool) -> AsyncScriptSlot:
        recipe = semaphore_recipe(self._backend.prefix, name, limit)
        return AsyncScriptSlot(self._backend.locks, recipe, ttl)
