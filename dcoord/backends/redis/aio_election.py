"""Async leader elections on Redis: the sync store's script, keys and channel.

Every step is :data:`.election.ELECTION` on :meth:`.election.RedisElections.keys`, run
through ``redis.asyncio`` (:func:`.aio_locks.run_script`; sharded on a Cluster), so
sync and async candidates of one election see one leader and one line of terms.
Candidates and watchers wait on the election's channel through the client's one
notifier (:class:`.aio_locks._Notifier`), where every message wakes every waiter of the
channel, with the leader's TTL as the backstop for a leader that expires silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from typing import TYPE_CHECKING, Any

from ..base import LockGrant
from ..election_base import LeaderRecord
from .aio_locks import run_script
from .election import ELECTION, election_keys
from .locks import NO_HINT_WAIT, answered, milliseconds

if TYPE_CHECKING:
    from .aio_locks import AsyncRedisBackend, _Channel


class AsyncRedisElections:
    """The async election store of one Redis backend."""

    def __init__(self, backend: AsyncRedisBackend) -> None:
        self.backend = backend
        self.redis = backend.redis

    def keys(self, name: str) -> tuple[str, str, str]:
        """The record key, the term key and the channel (the sync store's)."""
        return election_keys(self.backend.prefix, name)

    def candidate(self, name: str, ttl: float, value: bytes) -> AsyncRedisCandidate:
        return AsyncRedisCandidate(self, name, ttl, value)

    async def leader(self, name: str) -> LeaderRecord | None:
        record, _, _ = self.keys(name)

        async def read() -> Any:
            pipe = self.redis.pipeline(transaction=True)
            pipe.hmget(record, "term", "value")
            pipe.pttl(record)
            return await pipe.execute()

        (term, value), pttl = await self.backend.call(
            read, what=f"read the leader of {name!r}", retry=True
        )
        if term is None:
            return None
        return LeaderRecord(int(term), bytes(value or b""), pttl / 1000 if pttl >= 0 else None)

    async def subscribe(self, name: str) -> AsyncRedisSubscription:
        subscription = AsyncRedisSubscription(self.backend, self.keys(name)[2])
        await subscription.open()
        return subscription


class AsyncRedisCandidate:
    def __init__(self, elections: AsyncRedisElections, name: str, ttl: float, value: bytes) -> None:
        self._elections = elections
        self._backend = elections.backend
        self.name = name
        self.record, self.term_key, self.channel = elections.keys(name)
        self._ttl = ttl
        self._value = value
        self._token: str | None = None
        self._term = 0

    async def _run(self, step: str, token: str, ms: int, value: bytes = b"") -> Any:
        return await run_script(
            ELECTION,
            self._elections.redis,
            [self.record, self.term_key],
            [step, token, ms, value, self.channel],
        )

    async def _try(self, token: str) -> tuple[int, float]:
        sent = time.monotonic()
        try:
            result = await self._backend.call(
                lambda: self._run("campaign", token, milliseconds(self._ttl), self._value),
                what=f"campaign in election {self.name!r}",
            )
        except BaseException as exc:
            # A lost reply, or a cancellation while the script was in flight: it may have
            # run, or run yet. Resign with its token rather than lead for a TTL unseen.
            if not answered(exc):
                self._backend.locks.undo(
                    lambda: self._run("resign", token, 0),
                    f"undo the campaign in election {self.name!r} whose reply was lost",
                    sent + self._ttl,
                )
            raise
        return int(result), sent

    async def acquire(self, deadline: float | None) -> LockGrant | None:
        token = secrets.token_hex(16)
        result, sent = await self._try(token)
        if result <= 0 and (deadline is None or time.monotonic() < deadline):
            notifier = self._backend.locks.notifier
            async with notifier.interest(self.channel, broadcast=True) as channel:
                result, sent = await self._wait(channel, token, deadline)
        if result <= 0:
            return None
        self._token, self._term = token, result
        return LockGrant(result, sent + self._ttl)

    async def _wait(
        self, channel: _Channel, token: str, deadline: float | None
    ) -> tuple[int, float]:
        while True:
            # Parked before trying: a change published after the try wakes it, so the
            # wait below cannot miss it. A cancelled wait cancels its future: nothing
            # of this candidate stays registered.
            woken = channel.park()
            try:
                result, sent = await self._try(token)
                if result > 0:
                    return result, sent
                hint = -result / 1000 + 0.001 if result < 0 else NO_HINT_WAIT
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return 0, sent
                    hint = min(hint, remaining)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(hint):
                        await woken
            finally:
                woken.cancel()

    async def release(self) -> bool:
        token, self._token = self._token, None
        if token is None:
            return False
        attempts = 0

        async def resign() -> Any:
            nonlocal attempts
            attempts += 1
            return await self._run("resign", token, 0)

        resigned = await self._backend.call(
            resign, what=f"resign from election {self.name!r}", retry=True
        )
        # A retry that finds nothing may follow a first attempt whose reply was lost.
        return bool(resigned) or attempts > 1

    async def extend(self, ttl: float) -> LockGrant | None:
        token = self._token
        if token is None:
            return None
        sent = time.monotonic()
        extended = await self._backend.call(
            lambda: self._run("extend", token, milliseconds(ttl)),
            what=f"renew leadership of {self.name!r}",
        )
        return LockGrant(self._term, sent + ttl) if extended else None

    async def proclaim(self, value: bytes) -> bool:
        token = self._token
        if token is None:
            return False
        # Safe to retry: writing the same value twice is one change of value.
        done = await self._backend.call(
            lambda: self._run("proclaim", token, 0, value),
            what=f"proclaim in election {self.name!r}",
            retry=True,
        )
        if done:
            self._value = value
        return bool(done)


class AsyncRedisSubscription:
    """A watcher's interest in the election's channel, on the client's one notifier."""

    def __init__(self, backend: AsyncRedisBackend, channel: str) -> None:
        self._notifier = backend.locks.notifier
        self._name = channel
        self._stack = contextlib.AsyncExitStack()
        self._channel: _Channel | None = None
        self._woken: asyncio.Future[None] | None = None

    async def open(self) -> None:
        interest = self._notifier.interest(self._name, broadcast=True)
        self._channel = await self._stack.enter_async_context(interest)
        self._woken = self._channel.park()

    async def wait(self, timeout: float) -> None:
        woken = self._woken
        if woken is None:
            return  # closed
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await woken  # cancelled by the timeout, or a cancel of the caller
        finally:
            if self._woken is woken and self._channel is not None:
                # Parked again before the caller re-reads: no later change is missed.
                self._woken = self._channel.park()

    async def wake(self) -> None:
        if self._woken is not None and not self._woken.done():
            self._woken.set_result(None)

    async def close(self) -> None:
        woken, self._woken = self._woken, None
        if woken is not None:
            woken.cancel()
        await self._stack.aclose()
