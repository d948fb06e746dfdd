"""Async leader election: :class:`dcoord.Election`'s semantics, driven by tasks.

The rules are :mod:`dcoord.core.election`'s (values, the Leader record, when a
leadership is held, its errors, how long a watcher sleeps) and
:mod:`dcoord.core.lockstate`'s (the conservative deadline, the renewal schedule and
retries): the sync election follows the same. The backends run the sync election's
keys and scripts, so a sync and an async client campaign in one election and see one
leader. A leadership is renewed by a task of its own on the loop; a watch is an async
iterator whose waiting is the server's notification (Redis pub/sub, etcd watch, the
memory store's wake-up), with the leader's expiry as the deadline for a silent one.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

from ..backends.aio_base import AsyncCandidateSlot, AsyncGroupSubscription
from ..backends.base import LockGrant
from ..core.election import (
    WATCH_RETRY,
    Leader,
    leader_of,
    lost_in_block_error,
    not_held_error,
    not_held_reason,
    replaced_error,
    value_bytes,
    watch_wait,
)
from ..core.lockstate import RENEW_FRACTION, after_renewal, conservative
from ..errors import BackendUnavailable, ClientClosed, ConfigError, DcoordError
from ..lock import DEFAULT_TTL, validate_name, validate_timeout, validate_ttl
from ..perkey import PerKey

if TYPE_CHECKING:
    from .client import AsyncClient

log = logging.getLogger("dcoord.election")

OnLeadershipLost = Callable[["AsyncLeadership"], object]


class AsyncLeadership:
    """This process leading one election; made by :meth:`AsyncElection.campaign`.

    Renewed every ``ttl / 3`` by a task on the loop. When renewal fails until the TTL
    passed, or the server no longer has this leader, it turns *lost*: :attr:`held` is
    False and ``on_lost(leadership)`` runs (in the renewal task; a plain function or a
    coroutine function). ``async with`` resigns at the end (also when the block is
    cancelled), and raises :class:`~dcoord.LockLost` after a clean block during which
    leadership was lost.
    """

    def __init__(
        self,
        election: AsyncElection,
        slot: AsyncCandidateSlot,
        grant: LockGrant,
        value: bytes,
        ttl: float,
        on_lost: OnLeadershipLost | None,
    ) -> None:
        self.election = election
        self.term = grant.fence
        self.ttl = ttl
        self._slot = slot
        self._raw = value
        self._on_lost = on_lost
        self._grant = conservative(grant, ttl)
        self._resigned = False
        self._lost_reason: str | None = None
        self._renewal: asyncio.Task[None] = asyncio.get_running_loop().create_task(
            self._keep(), name=f"dcoord election {election.name!r}"
        )

    @property
    def fence(self) -> int:
        """The term, as a fencing token: ``await client.fence(r).admit(leadership.fence)``."""
        return self.term

    @property
    def value(self) -> str:
        """The value this leader campaigned with or last proclaimed."""
        return self._raw.decode(errors="replace")

    @property
    def held(self) -> bool:
        """True while this process leads by a conservative client-side clock; never errs
        towards True (False after resign, loss, or a TTL that passed unrenewed)."""
        return self._not_held() is None

    def _not_held(self) -> str | None:
        return not_held_reason(
            self._resigned, self._lost_reason, self._grant.expires_at, time.monotonic()
        )

    async def proclaim(self, value: str | bytes) -> None:
        """Change the leader's value (followers see it); the term stays the same.

        Raises LockNotOwned, writing nothing, if this process does not lead any more.
        """
        data = value_bytes(value)
        reason = self._not_held()
        if reason is not None:
            raise not_held_error(self.election.name, self.term, "proclaim", reason)
        if not await self._slot.proclaim(data):
            await self._lose("the server no longer has this leader")
            raise replaced_error(self.election.name, self.term)
        self._raw = data

    async def resign(self) -> bool:
        """Stop leading now, so another candidate is elected without waiting for the TTL.

        True if this process led until the resignation; False if leadership was already
        lost (or resigned): then nothing of anyone else's is deleted. Idempotent.
        """
        if self._resigned:
            return False
        lost = self._not_held() is not None
        self._resigned = True
        self._stop_renewal()
        self.election._registry.discard(self)
        released = await self._slot.release()
        return released and not lost

    def _stop_renewal(self) -> None:
        # Not from within the renewal task itself (an on_lost that resigns): it ends by
        # itself once it sees the leadership resigned or lost.
        if self._renewal is not asyncio.current_task():
            self._renewal.cancel()

    async def _keep(self) -> None:
        """Renew at ``ttl / 3`` until resigned or lost (the renewal task)."""
        due = time.monotonic() + self.ttl * RENEW_FRACTION
        while True:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            grant = self._grant
            new: LockGrant | None = None
            failure: Exception | None = None
            try:
                # A renewal unanswered at the deadline is a lost leadership, on time.
                async with asyncio.timeout_at(grant.expires_at):
                    new = await self._slot.extend(self.ttl)
            except TimeoutError as exc:
                if time.monotonic() >= grant.expires_at:
                    await self._lose("its TTL passed (a renewal request is still unanswered)")
                    return
                failure = exc
            except Exception as exc:  # this leadership's alone: retried until the deadline
                failure = exc
            outcome = after_renewal(grant, self.ttl, time.monotonic(), new, failure)
            if outcome.lost is not None:
                await self._lose(outcome.lost)
                return
            if outcome.retrying:
                log.warning(
                    "election %r: renewal failed, retrying: %s", self.election.name, failure
                )
            elif outcome.grant is not None:
                self._grant = outcome.grant
            assert outcome.due is not None
            due = outcome.due

    async def _lose(self, reason: str) -> None:
        if self._resigned or self._lost_reason is not None:
            return
        self._lost_reason = reason
        self._stop_renewal()
        log.warning(
            "election %r: leadership (term %d) lost: %s", self.election.name, self.term, reason
        )
        if self._on_lost is not None:
            try:
                result = self._on_lost(self)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("on_lost callback of election %r failed", self.election.name)

    async def __aenter__(self) -> AsyncLeadership:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # As Leadership.__exit__: the block's exception wins; a leadership lost on the
        # way is LockLost. A cancelled block still resigns, shielded from a second cancel.
        lost = None if self._resigned else self._not_held()
        try:
            if isinstance(exc, asyncio.CancelledError):
                await asyncio.shield(self.resign())
            else:
                await self.resign()
        except BackendUnavailable as resign_error:
            if exc is not None:
                log.warning(
                    "election %r: resign after a failed block: %s", self.election.name, resign_error
                )
                return
            raise
        if lost is not None and exc is None:
            raise lost_in_block_error(self.election.name, self.term, lost)

    def __repr__(self) -> str:
        state = "held" if self.held else "not held"
        return f"<dcoord.aio.AsyncLeadership {self.election.name!r} term={self.term} {state}>"


class AsyncLeaderWatch:
    """The leader of one election now and after every change: an async iterator of
    :class:`~dcoord.Leader` or None (nobody leads), made by :meth:`AsyncElection.watch`.

    Each item is the latest state: changes faster than a read may be merged, but a later
    item never shows an earlier term. :meth:`aclose` (or leaving ``async with``) ends it,
    also for a task waiting in ``async for``; the client's close ends it too.
    """

    def __init__(self, election: AsyncElection) -> None:
        self._election = election
        self._subscription: AsyncGroupSubscription | None = None
        self._last: Leader | None = None
        self._delivered = False
        self._wait = 0.0
        self._closed = False

    def __aiter__(self) -> AsyncLeaderWatch:
        return self

    async def __anext__(self) -> Leader | None:
        store = self._election.store
        name = self._election.name
        while not self._closed:
            if self._subscription is None:
                # Subscribed before the first read, so no change between the two is missed.
                subscription = await store.subscribe(name)
                if self._closed:  # closed while subscribing
                    await subscription.close()
                    break
                self._subscription = subscription
            elif self._wait > 0:
                try:
                    await self._subscription.wait(self._wait)
                except BackendUnavailable as exc:
                    log.info("election %r watch: %s", name, exc)
                    await asyncio.sleep(WATCH_RETRY)
                if self._closed:
                    break
            try:
                record = await store.leader(name)
            except DcoordError as exc:
                log.info("election %r watch: read failed: %s", name, exc)
                self._wait = 0.0
                await asyncio.sleep(WATCH_RETRY)
                continue
            self._wait = watch_wait(record)
            leader = leader_of(record)
            if not self._delivered or leader != self._last:
                self._delivered, self._last = True, leader
                return leader
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop watching: a task waiting for the next item gets StopAsyncIteration."""
        if self._closed:
            return
        self._closed = True
        self._election._registry.discard(self)
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            await subscription.wake()
            await subscription.close()

    async def __aenter__(self) -> AsyncLeaderWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncElection:
    """The leader election ``name``: campaign to lead it, read or watch its leader.

    Made by :meth:`AsyncClient.election`; see :class:`dcoord.Election`, whose
    semantics (and keys) these are. Any number of campaigns may run through one handle.
    """

    def __init__(self, client: AsyncClient, name: str) -> None:
        self.name = validate_name("election name", name)
        self.client = client
        self.store = client.backend.elections
        self._registry = _client_elections(client)

    async def campaign(
        self,
        value: str | bytes = b"",
        ttl: float = DEFAULT_TTL,
        timeout: float | None = None,
        on_lost: OnLeadershipLost | None = None,
    ) -> AsyncLeadership | None:
        """Wait until this caller leads the election; None if ``timeout`` seconds passed.

        Arguments as :meth:`dcoord.Election.campaign`; ``on_lost`` may be a coroutine
        function. Waiting is notified, not polled. Cancelling a waiting campaign leaves
        no candidate behind (no record, queue key or waiter).
        """
        data = value_bytes(value)
        seconds = validate_ttl(ttl)
        wait = None if timeout is None else validate_timeout("timeout", timeout)
        if on_lost is not None and not callable(on_lost):
            raise ConfigError(f"on_lost must be callable or None, got {on_lost!r}")
        self.client.check_open()
        deadline = None if wait is None else time.monotonic() + wait
        slot = self.store.candidate(self.name, seconds, data)
        grant = await slot.acquire(deadline)
        if grant is None:
            return None
        if self.client.closed:
            # Elected while the client closed: nobody would renew or resign it.
            with contextlib.suppress(DcoordError):
                await slot.release()
            raise ClientClosed(f"cannot campaign in election {self.name!r}: the client is closed")
        leadership = AsyncLeadership(self, slot, grant, data, seconds, on_lost)
        self._registry.add(leadership)
        return leadership

    async def leader(self) -> Leader | None:
        """The current leader, or None if nobody leads."""
        self.client.check_open()
        return leader_of(await self.store.leader(self.name))

    def watch(self) -> AsyncLeaderWatch:
        """The leader now and after every change (a new term, a proclaimed value, None
        when nobody leads), as an async iterator::

            async with election.watch() as leaders:
                async for leader in leaders:
                    ...
        """
        self.client.check_open()
        watch = AsyncLeaderWatch(self)
        self._registry.add(watch)
        return watch

    def __repr__(self) -> str:
        return f"<dcoord.aio.AsyncElection {self.name!r}>"


class _ClientElections:
    """The leaderships and watches of one client, resigned and closed when it closes
    (one close hook per client, not per election handle)."""

    def __init__(self, client: AsyncClient) -> None:
        self._items: set[AsyncLeadership | AsyncLeaderWatch] = set()
        client.on_close(self.close)

    def add(self, item: AsyncLeadership | AsyncLeaderWatch) -> None:
        self._items.add(item)

    def discard(self, item: AsyncLeadership | AsyncLeaderWatch) -> None:
        self._items.discard(item)

    async def close(self) -> None:
        """Close every watch, resign every leadership (best effort: the TTL covers the
        rest)."""
        items, self._items = list(self._items), set()
        await asyncio.gather(*(i.aclose() for i in items if isinstance(i, AsyncLeaderWatch)))
        leaderships = [i for i in items if isinstance(i, AsyncLeadership)]
        results = await asyncio.gather(*(i.resign() for i in leaderships), return_exceptions=True)
        for leadership, result in zip(leaderships, results, strict=True):
            if isinstance(result, Exception):
                log.info("election %r: not resigned at close: %r", leadership.election.name, result)


_client_elections: PerKey[AsyncClient, _ClientElections] = PerKey(_ClientElections)
