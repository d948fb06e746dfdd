"""Group membership and live rings for asyncio: :meth:`AsyncClient.group`.

The same groups as :mod:`dcoord.membership` (same keys, records and server-side
liveness), so sync and async members of one group see each other; the same values
(:class:`~dcoord.Member`, :class:`~dcoord.membership.GroupView`, input checks) and the
same decisions (:mod:`dcoord.core.membership`: incremental ring updates, when a
heart-beat failure loses a member). Only the I/O differs: on memory and Redis every
member's heart-beat is a task on the client's loop; on etcd a member has no task (its key
is on the client's shared lease, kept alive by one task per TTL that tells every member
on it when the lease is lost), and
everything that follows one :class:`AsyncGroup` (live rings, watches) shares one
follower task that subscribes to the group's changes (Redis pub/sub, an etcd watch, the
embedded store's change log), applies the changes they carry, re-reads the group when
:class:`~dcoord.core.membership.MemberSet` says so (a gap, a notification without its
change, the earliest expiry it saw, at least every
:data:`~dcoord.core.membership.RESYNC_INTERVAL` seconds), and hands each new member set to its
rings and watches. A broken subscription is re-established and
the group re-read, so no change is missed for good.

Closing the client leaves its members (a leave the server does not confirm lets the
member expire within its TTL) and stops its rings, watches and tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .. import metrics
from ..backends.aio_base import (
    AsyncGroupStore,
    AsyncGroupSubscription,
    AsyncMemberRegistration,
    AsyncSelfKeptRegistration,
)
from ..core.membership import MemberSet, RingSteps, beat_verdict
from ..errors import (
    AlreadyJoined,
    BackendUnavailable,
    ConfigError,
    DcoordError,
    NoMembers,
    NotEnoughMembers,
)
from ..logfields import member_fields
from ..membership import (
    _MAX_BACKOFF,
    DEFAULT_TTL,
    GroupView,
    Member,
    _check_count,
    _check_group_name,
    _check_member_id,
    _check_meta,
    _check_ttl,
    _check_weight,
    _Decoded,
    _encode,
    _view,
    _view_of,
)
from ..ring import DEFAULT_VNODES, HashRing, Key

if TYPE_CHECKING:
    from .client import AsyncClient

log = logging.getLogger("dcoord.membership")

#: ``on_lost(member)``: a plain function or a coroutine function.
OnMemberLost = Callable[["AsyncJoinedMember"], object]

_ALIVE, _LEFT, _LOST = "alive", "left", "lost"


class AsyncJoinedMember(Member):
    """A member this client joined: kept alive until :meth:`leave` or the client closes
    (by a heart-beat task of its own, or on etcd by the client's shared lease).

    As :class:`dcoord.JoinedMember`: when its heart-beats fail for longer than its TTL,
    or the server no longer has it, it is *lost*: :attr:`alive` turns False,
    :attr:`lost_reason` says why, and the ``on_lost`` callbacks run (each once, as tasks
    of the client). It never re-joins by itself.
    """

    __slots__ = ("_beats", "_callbacks", "_group", "_reg", "_state", "lost_reason")

    def __init__(
        self,
        group: AsyncGroup,
        member: Member,
        registration: AsyncMemberRegistration | AsyncSelfKeptRegistration,
        on_lost: OnMemberLost | None,
    ) -> None:
        super().__init__(member.id, member.weight, member.meta)
        self._group = group
        self._reg = registration
        self._state = _ALIVE
        self._callbacks = [on_lost] if on_lost is not None else []
        self._beats: asyncio.Task[None] | None = None
        self.lost_reason: str | None = None
        """Why the member was lost, or None."""

    def _start(self) -> None:
        registration = self._reg
        if isinstance(registration, AsyncSelfKeptRegistration):
            # Its backend tells it of its loss at once: a task of its own would only
            # poll that every ttl/3, and learn it up to ttl/3 late.
            registration.on_lost(self._mark_lost)
        else:
            self._beats = asyncio.get_running_loop().create_task(
                self._heart_beats(registration),
                name=f"dcoord heart-beat {self._group.name}/{self.id}",
            )

    @property
    def group(self) -> AsyncGroup:
        return self._group

    @property
    def ttl(self) -> float:
        """The TTL the server granted (etcd: whole seconds, at least its lease minimum)."""
        return self._reg.ttl

    @property
    def alive(self) -> bool:
        """True while the member is joined and its TTL has not run out unconfirmed."""
        return self._state == _ALIVE and time.monotonic() < self._reg.expires_at

    @property
    def left(self) -> bool:
        """True once :meth:`leave` was called (or the client closed)."""
        return self._state == _LEFT

    def on_lost(self, callback: OnMemberLost) -> None:
        """Call ``callback(member)`` when the member is lost (at once if it already is)."""
        if self._state == _LOST:
            self._run_callbacks([callback])
        elif self._state == _ALIVE:
            self._callbacks.append(callback)

    async def leave(self) -> None:
        """Leave the group now: other clients stop seeing the member at once. Idempotent.

        Raises BackendUnavailable if the server did not confirm; heart-beats have stopped
        anyway, so the member then disappears within its TTL.
        """
        was, self._state = self._state, _LEFT
        self._stop_beats()
        self._group._joined.discard(self)
        if was == _ALIVE:
            await self._reg.leave()
            metrics.member_left(self._group)
        elif was == _LOST:
            # Lost by our count; the server may still hold it for a moment. Best effort:
            # the delete compares the registration's owner (token, lease), always safe.
            with contextlib.suppress(BackendUnavailable):
                await self._reg.leave()

    def _stop_beats(self) -> None:
        beats, self._beats = self._beats, None
        if beats is not None and beats is not asyncio.current_task():
            beats.cancel()

    async def _heart_beats(self, registration: AsyncMemberRegistration) -> None:
        interval = registration.ttl / 3
        while self._state == _ALIVE:
            await asyncio.sleep(interval)
            still_there, failure = False, None
            try:
                # Bounded by the registration's deadline, so that a hanging heart-beat
                # loses the member on time rather than when the request gives up.
                remaining = max(0.0, registration.expires_at - time.monotonic())
                async with asyncio.timeout(remaining):
                    still_there = await registration.refresh()
            except Exception as exc:  # unreachable, refusing, or past the deadline
                failure = exc
                if not isinstance(exc, BackendUnavailable | TimeoutError):
                    log.warning(
                        "heart-beat of %r failed: %r",
                        self.id,
                        exc,
                        extra=member_fields(self._group, self.id),
                    )
            if self._state != _ALIVE:
                return
            reason = beat_verdict(still_there, failure, time.monotonic(), registration.expires_at)
            if reason is not None:
                self._mark_lost(reason)

    def _mark_lost(self, reason: str) -> None:
        if self._state != _ALIVE:
            return  # left, or lost already: a backend's report after that is old news
        self._state = _LOST
        self.lost_reason = reason
        callbacks, self._callbacks = self._callbacks, []
        metrics.member_lost(self._group)
        self._stop_beats()
        self._group._joined.discard(self)
        log.warning(
            "member %r of group %r lost: %s",
            self.id,
            self._group.name,
            reason,
            extra=member_fields(self._group, self.id),
        )
        self._run_callbacks(callbacks)

    def _run_callbacks(self, callbacks: list[OnMemberLost]) -> None:
        # In a task of the client: a slow callback must not delay the caller.
        async def run() -> None:
            for callback in callbacks:
                try:
                    result = callback(self)
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    log.exception(
                        "on_lost callback of member %r failed",
                        self.id,
                        extra=member_fields(self._group, self.id),
                    )

        if callbacks:
            self._group.client._spawn(run(), f"{self._group.name}/{self.id}")

    def __repr__(self) -> str:
        state = self._state if self._state != _ALIVE or self.alive else "expiring"
        return f"AsyncJoinedMember({self.id!r}, group={self._group.name!r}, {state})"


class AsyncLiveRing:
    """A consistent-hash ring of a group's live members that follows joins, leaves and
    expiries; :class:`dcoord.membership.LiveRing` for asyncio.

    Each change swaps in a new immutable :class:`~dcoord.HashRing` derived from the last
    one (:func:`dcoord.core.membership.next_ring`: only changed members are hashed), so
    lookups are plain calls. Lookups on a group with no live members raise
    :class:`~dcoord.NoMembers`. :meth:`close` stops following (the client closing does).
    """

    def __init__(self, group: AsyncGroup, vnodes: int) -> None:
        self._group = group
        self._vnodes = vnodes
        self._view = GroupView(0, {})
        self._ring: HashRing | None = None
        self._steps = RingSteps()
        self._changed = asyncio.Event()
        self._closed = False

    @property
    def epoch(self) -> int:
        """The membership epoch the current ring was built from."""
        return self._view.epoch

    @property
    def members(self) -> GroupView:
        """The member set the current ring was built from."""
        return self._view

    @property
    def ring(self) -> HashRing | None:
        """The current immutable ring (None while the group is empty)."""
        return self._ring

    @property
    def vnodes(self) -> int:
        return self._vnodes

    def node_for(self, key: Key) -> str:
        """The member that owns ``key`` now."""
        return self._current().node_for(key)

    def node_for_many(self, keys: Iterable[Key]) -> list[str]:
        """The members that own ``keys`` now, in order (one ring for the whole batch)."""
        return self._current().node_for_many(keys)

    def nodes_for(self, key: Key, n: int) -> list[str]:
        """``n`` distinct members for ``key`` in ring order (replicas); raises
        :class:`~dcoord.NotEnoughMembers` while fewer than ``n`` members are live."""
        want = _check_count("n", n)
        ring = self._ring
        live = 0 if ring is None else len(ring)
        if ring is None or want > live:
            raise NotEnoughMembers(
                f"nodes_for(key, {want}) needs {want} live members; "
                f"group {self._group.name!r} has {live}"
            )
        return ring.nodes_for(key, want)

    async def wait_for(self, predicate: Callable[[AsyncLiveRing], bool], timeout: float) -> bool:
        """Wait until ``predicate(self)`` holds (checked on every change) or ``timeout``
        seconds pass; return whether it holds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(self):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            changed = self._changed
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a
            # cancellation that arrives as the event is set.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await changed.wait()
        return True

    def close(self) -> None:
        """Stop following the group; the ring keeps its last state. Idempotent."""
        if not self._closed:
            self._closed = True
            self._group._unfollow(self)

    def _current(self) -> HashRing:
        ring = self._ring
        if ring is None:
            raise NoMembers(f"group {self._group.name!r} has no live members")
        return ring

    def _deliver(self, view: GroupView) -> None:
        # A ring's own first read and the follower's reads race: never go back.
        if self._closed or view.epoch < self._view.epoch:
            return
        self._ring = self._steps.next(self._ring, self._view, view, self._vnodes)
        self._view = view
        self._changed.set()
        self._changed = asyncio.Event()

    def _stop(self) -> None:
        self._closed = True

    def __len__(self) -> int:
        return len(self._view)

    def __contains__(self, member_id: object) -> bool:
        return member_id in self._view

    async def __aenter__(self) -> AsyncLiveRing:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"AsyncLiveRing(group={self._group.name!r}, epoch={self.epoch}, "
            f"members={sorted(self._view)!r}, vnodes={self._vnodes})"
        )


class _Views:
    """A watch's mailbox: only the newest view is kept (a slow reader skips the rest)."""

    def __init__(self) -> None:
        self.latest: GroupView | None = None
        self.fresh = asyncio.Event()
        self.stopped = False

    def _deliver(self, view: GroupView) -> None:
        if self.latest is None or view.epoch >= self.latest.epoch:
            self.latest = view
            self.fresh.set()

    def _stop(self) -> None:
        self.stopped = True
        self.fresh.set()

    async def next(self) -> GroupView | None:
        """The newest view not yet taken, or None once stopped."""
        await self.fresh.wait()
        self.fresh.clear()
        return None if self.stopped else self.latest


_Subscriber = AsyncLiveRing | _Views


class _Follower:
    """One task per followed AsyncGroup: subscribe, re-read on change, hand out views.

    It is stopped by a flag and a wake-up of its subscription, not by cancelling it in
    the middle of a read: redis-py's pub/sub read, cancelled, could leave the task
    hanging (seen on Python 3.11); a cancellation is only the fallback.
    """

    def __init__(self, group: AsyncGroup) -> None:
        self._group = group
        self._store: AsyncGroupStore = group.client.backend.groups
        # Subscriber -> the MemberSet version it was last given (None: nothing yet).
        self._subscribers: dict[_Subscriber, int | None] = {}
        self._members = MemberSet()
        self._decoded = _Decoded()
        self._stopped = False
        self._kick = asyncio.Event()
        self._subscription: AsyncGroupSubscription | None = None
        self.error: BaseException | None = None
        self.task = asyncio.get_running_loop().create_task(
            self._run(), name=f"dcoord follow {group.name}"
        )

    def add(self, subscriber: _Subscriber) -> None:
        self._subscribers[subscriber] = None

    def remove(self, subscriber: _Subscriber) -> bool:
        """Drop ``subscriber``; True when it was the last one (the follower stops)."""
        self._subscribers.pop(subscriber, None)
        if self._subscribers:
            return False
        # Flagged now: should the task below be cancelled (the client closing), the
        # loop still ends at its next turn.
        self._stopped = True
        self._kick.set()
        self._group.client._spawn(self.stop(), f"stop following {self._group.name}")
        return True

    async def stop(self) -> None:
        """Stop the task (within the request timeout, else cancel it) and wait for it."""
        self._stopped = True
        self._kick.set()
        subscription = self._subscription
        if subscription is not None:
            with contextlib.suppress(Exception):
                await subscription.wake()
        timeout = self._group.client.settings.request_timeout
        done, _ = await asyncio.wait({self.task}, timeout=timeout)
        if not done:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def _run(self) -> None:
        name = self._group.name
        backoff = 0.05
        subscription: AsyncGroupSubscription | None = None
        members, current = self._members, False
        try:
            while not self._stopped:
                try:
                    if subscription is None:
                        subscription = await self._store.subscribe(name)
                        self._subscription = subscription
                    if not current:
                        members.read(await self._store.read(name), time.monotonic())
                    metrics.group_size(self._group, len(members.members))
                    self._publish()
                    self.error = None
                    backoff = 0.05
                    if self._stopped:
                        return
                    current = False
                    changes = await subscription.wait(members.timeout(time.monotonic()))
                    current = members.apply(changes, time.monotonic())
                except Exception as exc:
                    current = False
                    # Keep following whatever failed: a dead follower would silently
                    # freeze every ring. As the sync follower, a repeated error goes to
                    # DEBUG, and only a bug's traceback is logged.
                    repeated = str(exc) == str(self.error)
                    self.error = exc
                    level = logging.INFO if isinstance(exc, BackendUnavailable) else logging.WARNING
                    log.log(
                        logging.DEBUG if repeated else level,
                        "following group %r: %s; retrying",
                        name,
                        exc,
                        exc_info=not isinstance(exc, DcoordError),
                        extra=member_fields(self._group),
                    )
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(backoff):
                            await self._kick.wait()
                    backoff = min(backoff * 2, _MAX_BACKOFF)
        finally:
            self._subscription = None
            if subscription is not None:
                try:
                    await subscription.close()
                except Exception:
                    log.debug("closing the subscription of %r failed", name)

    def _publish(self) -> None:
        view: GroupView | None = None
        members = self._members
        for subscriber, seen in list(self._subscribers.items()):
            if seen == members.version:
                continue
            if view is None:
                view = _view_of(members, self._decoded)
            self._subscribers[subscriber] = members.version
            subscriber._deliver(view)


class AsyncGroup:
    """A named group of members in the client's namespace: ``client.group(name)``.

    Closing the client leaves every member joined through it and stops its live rings
    and watches.
    """

    def __init__(self, client: AsyncClient, name: str) -> None:
        self.name = _check_group_name(name)
        self.client = client
        self._store: AsyncGroupStore = client.backend.groups
        self._joining = 0
        self._joins_done = asyncio.Event()
        self._joins_done.set()
        self._joined: set[AsyncJoinedMember] = set()
        self._follower: _Follower | None = None
        self._stopping: set[_Follower] = set()
        self._subscribers: set[_Subscriber] = set()
        self._registered = False

    async def join(
        self,
        member_id: str,
        *,
        weight: float = 1.0,
        meta: Mapping[str, Any] | None = None,
        ttl: float = DEFAULT_TTL,
        on_lost: OnMemberLost | None = None,
    ) -> AsyncJoinedMember:
        """Join as ``member_id`` and stay joined (a heart-beat task, every ttl/3; on etcd
        the client's shared lease) until :meth:`AsyncJoinedMember.leave` or the client
        closes.

        As :meth:`dcoord.Group.join` (ConfigError for bad input, AlreadyJoined when the
        id is joined and alive, ClientClosed when the client is or gets closed).
        ``on_lost`` may be a plain function or a coroutine function. A cancelled join
        leaves no member behind.
        """
        member_id = _check_member_id(member_id)
        weight = _check_weight(member_id, weight)
        meta = _check_meta(member_id, meta)
        seconds = _check_ttl(ttl)
        if on_lost is not None and not callable(on_lost):
            raise ConfigError(f"on_lost must be callable or None, got {on_lost!r}")
        self.client.check_open()
        self._register_close()
        self._joining += 1
        self._joins_done.clear()
        try:
            registration = await self._store.join(
                self.name, member_id, _encode(weight, meta), seconds
            )
        finally:
            self._joining -= 1
            if not self._joining:
                self._joins_done.set()
        if registration is None:
            raise AlreadyJoined(
                f"member id {member_id!r} is already joined to group {self.name!r} "
                "and alive; choose another id or wait for it to leave or expire"
            )
        joined = AsyncJoinedMember(self, Member(member_id, weight, meta), registration, on_lost)
        if self.client.closed:
            # close() waited for this join: the connection is still open, so leave.
            await self._leave_or_warn(joined)
            self.client.check_open()
        self._joined.add(joined)
        metrics.member_joined(self)
        joined._start()  # after the count: a lease lost meanwhile loses it at once
        return joined

    async def members(self) -> dict[str, Member]:
        """The live members now, read from the server (expired ones are pruned first)."""
        return dict(await self.view())

    async def view(self) -> GroupView:
        """The live members now and the membership epoch they were read at."""
        self.client.check_open()
        view = _view(await self._store.read(self.name))
        metrics.group_size(self, len(view))
        return view

    async def epoch(self) -> int:
        """The current membership epoch (increases with every join, leave and expiry)."""
        return (await self.view()).epoch

    async def ring(self, vnodes: int = DEFAULT_VNODES) -> AsyncLiveRing:
        """An :class:`AsyncLiveRing` of the live members, current when this returns.

        Raises BackendUnavailable if the group cannot be read within the request timeout,
        PermissionDenied if the server refuses it.
        """
        ring = AsyncLiveRing(self, _check_count("vnodes", vnodes))
        self._follow(ring)
        try:
            # Read here, so that the ring is current on return and a refusal is raised
            # at once; the follower (subscribed before its first read) goes on from it.
            ring._deliver(await self.view())
        except BaseException:
            ring.close()
            raise
        return ring

    def watch(self) -> AsyncIterator[GroupView]:
        """``async for view in group.watch():`` the current member set, then each change.

        A reader slower than the changes gets only the newest set (never the same set
        twice in a row). The iteration ends when the client closes; leaving the loop,
        or a cancellation of the waiting iteration, stops following. Raises
        ClientClosed at once on a closed client, as everything a client makes. The first
        iteration raises BackendUnavailable if the group cannot be read; after that,
        outages are retried in the background (the next view comes once it is over).
        """
        self.client.check_open()
        return self._watch()

    async def _watch(self) -> AsyncIterator[GroupView]:
        views = _Views()
        self._follow(views)
        try:
            views._deliver(await self.view())
            last: GroupView | None = None
            while True:
                view = await views.next()
                if view is None:
                    return
                # A change and its undoing may both arrive while the reader is busy.
                if last is not None and dict(view) == dict(last):
                    continue
                last = view
                yield view
        finally:
            self._unfollow(views)

    async def close(self) -> None:
        """Leave the members joined through this object and stop its rings and watches."""
        # A join in flight leaves its member itself when it finds the client closed.
        await self._joins_done.wait()
        await asyncio.gather(*(self._leave_or_warn(m) for m in list(self._joined)))
        for subscriber in list(self._subscribers):
            subscriber._stop()
        self._subscribers.clear()
        followers = [self._follower, *self._stopping]
        self._follower = None
        await asyncio.gather(*(f.stop() for f in followers if f is not None))

    # -- internals

    async def _leave_or_warn(self, member: AsyncJoinedMember) -> None:
        # Best effort (close()): the member's TTL removes it otherwise.
        try:
            await member.leave()
        except DcoordError as exc:
            log.warning(
                "member %r could not leave cleanly: %s",
                member.id,
                exc,
                extra=member_fields(self, member.id),
            )

    def _register_close(self) -> None:
        if not self._registered:
            self._registered = True
            self.client.on_close(self.close)

    def _follow(self, subscriber: _Subscriber) -> None:
        self.client.check_open()
        self._register_close()
        self._subscribers.add(subscriber)
        if self._follower is None:
            self._follower = _Follower(self)
        self._follower.add(subscriber)

    def _unfollow(self, subscriber: _Subscriber) -> None:
        self._subscribers.discard(subscriber)
        follower = self._follower
        if follower is not None and follower.remove(subscriber):
            self._follower = None
            # close() waits for it too, in case the client closes before it ended.
            self._stopping.add(follower)
            follower.task.add_done_callback(lambda _: self._stopping.discard(follower))

    def __repr__(self) -> str:
        return f"<dcoord.aio.AsyncGroup {self.name!r} of {self.client!r}>"
