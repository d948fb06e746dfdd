"""Group membership and the live consistent-hash ring that follows it.

``client.group(name)`` gives a :class:`Group`. Processes :meth:`~Group.join` it as
members (an id, a weight and JSON metadata) that the client keeps alive with heartbeats
on its one scheduler thread (on etcd: the client's shared lease of that TTL). A member
whose process dies disappears within its TTL; one that leaves disappears at once.
Liveness is decided by the server's clock (Redis ``TIME`` inside Lua, etcd leases),
never by comparing client clocks.

Everything that follows a group in one :class:`Group` object (live rings, watch
callbacks) shares one *follower* thread: it subscribes to the group's change
notifications (Redis pub/sub, an etcd watch, the embedded store's change log), which
carry the changes themselves: it applies them to the member set it last read while their
epochs follow on (:class:`~dcoord.core.membership.MemberSet`), and re-reads the whole
group only on a gap, on a notification without its change (from an older client), at
the earliest expiry it saw (so that an expiry nobody reads still reaches watchers) and at
least every :data:`RESYNC_INTERVAL` seconds. It publishes each new member set. It
survives server restarts: a broken subscription is re-established and the group re-read,
so no change is missed for good.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import operator
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from numbers import Real
from operator import attrgetter
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from . import metrics
from .backends.base import GroupSnapshot, GroupStore, GroupSubscription, MemberRegistration
from .config import positive_seconds
from .core.membership import RESYNC_INTERVAL as RESYNC_INTERVAL
from .core.membership import MemberSet, RingSteps, beat_verdict
from .errors import (
    AlreadyJoined,
    BackendUnavailable,
    ClientClosed,
    ConfigError,
    DcoordError,
    NoMembers,
    NotEnoughMembers,
)
from .logfields import MEMBER, member_fields
from .ring import DEFAULT_VNODES, HashRing, Key

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("dcoord.membership")

DEFAULT_TTL = 10.0
#: Shorter TTLs would need heart-beats faster than one scheduler thread can promise.
MIN_TTL = 0.1
#: Weights are ratios (1.0 = an ordinary member), not capacities.
MAX_WEIGHT = 1000.0
MAX_MEMBER_ID = 256
MAX_META_BYTES = 64 * 1024
_GROUP_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_MAX_BACKOFF = 1.0


# -- validation -----------------------------------------------------------------------


def _check_group_name(name: object) -> str:
    if not isinstance(name, str) or not _GROUP_RE.fullmatch(name):
        raise ConfigError(
            "group name must be 1-128 characters of letters, digits, '_', '.', '-' "
            f"(starting with a letter or digit), got {name!r}"
        )
    return name


def _check_member_id(member_id: object) -> str:
    if not isinstance(member_id, str) or not member_id:
        raise ConfigError(f"member id must be a non-empty string, got {member_id!r}")
    if len(member_id) > MAX_MEMBER_ID or not member_id.isprintable():
        raise ConfigError(
            f"member id must be at most {MAX_MEMBER_ID} printable characters, got {member_id!r}"
        )
    return member_id


def _check_weight(member_id: str, weight: object) -> float:
    if isinstance(weight, bool) or not isinstance(weight, Real):
        raise ConfigError(f"weight of member {member_id!r} must be a number, got {weight!r}")
    value = float(weight)
    if not (math.isfinite(value) and 0.0 < value <= MAX_WEIGHT):
        raise ConfigError(
            f"weight of member {member_id!r} must be > 0 and <= {MAX_WEIGHT:g} "
            f"(a ratio, 1.0 = normal), got {weight!r}"
        )
    return value


def _check_meta(member_id: str, meta: object) -> dict[str, Any]:
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        raise ConfigError(f"meta of member {member_id!r} must be a mapping, got {meta!r}")
    try:
        text = json.dumps(dict(meta), allow_nan=False)
        decoded = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"meta of member {member_id!r} must be JSON-serialisable, got {meta!r}: {exc}"
        ) from None
    # Tuples and non-str keys serialise but come back different: refuse them rather
    # than hand other processes something the member did not write.
    if decoded != meta:
        raise ConfigError(
            f"meta of member {member_id!r} does not survive JSON unchanged (use str keys, "
            f"lists, and finite numbers), got {meta!r}"
        )
    if len(text.encode()) > MAX_META_BYTES:
        raise ConfigError(
            f"meta of member {member_id!r} is {len(text.encode())} bytes as JSON; "
            f"the limit is {MAX_META_BYTES}"
        )
    return dict(decoded)


def _check_ttl(ttl: object) -> float:
    seconds = positive_seconds("ttl", ttl)
    if seconds < MIN_TTL:
        raise ConfigError(f"ttl must be >= {MIN_TTL:g} seconds, got {ttl!r}")
    return seconds


def _check_count(what: str, count: object) -> int:
    if not isinstance(count, bool):
        try:
            value = operator.index(count)  # type: ignore[arg-type]
        except TypeError:
            pass
        else:
            if value >= 1:
                return value
    raise ConfigError(f"{what} must be an int >= 1, got {count!r}")


def _encode(weight: float, meta: Mapping[str, Any]) -> bytes:
    return json.dumps(
        {"weight": weight, "meta": meta}, sort_keys=True, separators=(",", ":")
    ).encode()


def _decode(member_id: str, payload: bytes) -> Member | None:
    try:
        data = json.loads(payload)
        weight = float(data["weight"])
        meta = data["meta"]
        if not (math.isfinite(weight) and weight > 0 and isinstance(meta, dict)):
            raise ValueError("bad weight or meta")
    except (ValueError, TypeError, KeyError) as exc:
        log.warning(
            "ignoring member %r with an unreadable record: %s",
            member_id,
            exc,
            extra={MEMBER: member_id},
        )
        return None
    return Member(member_id, weight, meta)


# -- values ---------------------------------------------------------------------------


class Member:
    """A member of a group: its id, weight (share of the ring) and metadata.

    Values compare equal when id, weight and meta are equal. :meth:`Group.join` returns
    a :class:`JoinedMember`, the subclass that can leave.
    """

    __slots__ = ("_id", "_meta", "_weight")

    def __init__(self, member_id: str, weight: float, meta: Mapping[str, Any]) -> None:
        self._id = member_id
        self._weight = weight
        self._meta = MappingProxyType(dict(meta))

    @property
    def id(self) -> str:
        return self._id

    @property
    def weight(self) -> float:
        return self._weight

    @property
    def meta(self) -> Mapping[str, Any]:
        """The JSON metadata the member joined with (read-only)."""
        return self._meta

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Member):
            return NotImplemented
        return (self._id, self._weight, self._meta) == (other._id, other._weight, other._meta)

    def __hash__(self) -> int:
        return hash((self._id, self._weight))

    def __repr__(self) -> str:
        return f"Member({self._id!r}, weight={self._weight:g}, meta={dict(self._meta)!r})"


class GroupView(Mapping[str, Member]):
    """An immutable member set (id -> :class:`Member`) and the ``epoch`` it was read at.

    Epochs are assigned by the server and increase with every membership change: on
    memory and Redis a per-group counter, on etcd the revision at which the set was read.
    """

    __slots__ = ("_delta", "_members", "epoch")

    def __init__(self, epoch: int, members: Mapping[str, Member]) -> None:
        self.epoch = epoch
        self._members = dict(members)
        # (an earlier view, the ids added, removed or changed since it), when known.
        self._delta: tuple[GroupView, set[str]] | None = None

    @classmethod
    def _of(cls, epoch: int, members: dict[str, Member]) -> GroupView:
        """A view that takes ``members`` as it is (nobody may change it afterwards)."""
        view = cls(epoch, {})
        view._members = members
        return view

    def __getitem__(self, member_id: str) -> Member:
        return self._members[member_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def weights(self) -> dict[str, float]:
        """Member id -> weight, the input of a :class:`~dcoord.HashRing`."""
        # In C (zip/map), not a comprehension: a live ring asks on every change.
        return dict(zip(self._members, map(_weight_of, self._members.values()), strict=True))

    def __repr__(self) -> str:
        return f"GroupView(epoch={self.epoch}, members={sorted(self._members)!r})"


class _Decoded:
    """A follower's decoded members of its last view, so that the next view decodes
    (JSON) only the members whose payload changed: at 1,000 members decoding them all
    costs a few milliseconds per change. The changed ones are those a follower's
    MemberSet lists, or else those set operations on the payload dicts find."""

    __slots__ = ("members", "payloads", "view")

    def __init__(self) -> None:
        self.payloads: dict[str, bytes] = {}
        self.members: dict[str, Member] = {}
        self.view: GroupView | None = None


_weight_of = attrgetter("weight")


def _view(
    snapshot: GroupSnapshot, decoded: _Decoded | None = None, changed: set[str] | None = None
) -> GroupView:
    """The snapshot's members, decoded (those with a readable record). ``decoded``, if
    given, holds the previous view's and is updated to this one's; ``changed``, if
    given, the ids whose payload may differ from it (the rest are not looked at)."""
    last = decoded if decoded is not None else _Decoded()
    payloads = snapshot.members
    if changed is None or last.view is None:
        gone = last.payloads.keys() - payloads.keys()
        changed = gone.union(member_id for member_id, _ in payloads.items() - last.payloads.items())
    # (A dict of our own, never changed once in the view: the view need not copy it.)
    members = dict(last.members)
    for member_id in changed:
        payload = payloads.get(member_id)
        member = None if payload is None else _decode(member_id, payload)
        if member is None:
            members.pop(member_id, None)
        else:
            members[member_id] = member
    view = GroupView._of(snapshot.epoch, members)
    if last.view is not None:
        view._delta = (last.view, changed)
        # Subscribers are done with the last view's delta (delivery is synchronous):
        # dropping it keeps each view from holding every view before it alive.
        last.view._delta = None
    last.payloads, last.members, last.view = payloads, members, view
    return view


def _view_of(members: MemberSet, decoded: _Decoded) -> GroupView:
    """A follower's current members as a view (``decoded``: its last view's, updated).

    Not a copy of the payloads, though the MemberSet goes on changing them in place:
    only the first view compares them (with none), every later one is given the ids
    changed since (MemberSet.changed() is None only before its first call)."""
    snapshot = GroupSnapshot(epoch=members.epoch, members=members.members, next_expiry=None)
    return _view(snapshot, decoded, members.changed())


# -- a joined member ------------------------------------------------------------------

_ALIVE, _LEFT, _LOST = "alive", "left", "lost"


class JoinedMember(Member):
    """A member this client joined: kept alive until :meth:`leave` or the client closes.

    When its heart-beats fail for longer than its TTL, or the server no longer has it
    (the process was paused past its TTL, the etcd lease expired), it is *lost*:
    :attr:`alive` turns False, :attr:`lost_reason` says why, and the ``on_lost``
    callbacks run (each once, on a thread of their own). It never re-joins by itself.
    """

    __slots__ = ("_callbacks", "_group", "_job", "_mutex", "_reg", "_state", "lost_reason")

    def __init__(
        self,
        group: Group,
        member: Member,
        registration: MemberRegistration,
        on_lost: Callable[[JoinedMember], None] | None,
    ) -> None:
        super().__init__(member.id, member.weight, member.meta)
        self._group = group
        self._reg = registration
        self._mutex = threading.Lock()
        self._state = _ALIVE
        self._callbacks = [on_lost] if on_lost is not None else []
        self._job: Any = None
        self.lost_reason: str | None = None
        """Why the member was lost, or None."""

    def _start(self) -> None:
        interval = self._reg.keepalive_interval
        if interval is not None:
            self._job = self._group.client.scheduler.every(
                interval, self._beat, name=f"heartbeat {self._group.name}/{self.id}"
            )
        self._reg.on_lost(lambda: self._mark_lost("its etcd lease expired or was revoked"))

    @property
    def group(self) -> Group:
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

    def on_lost(self, callback: Callable[[JoinedMember], None]) -> None:
        """Call ``callback(member)`` when the member is lost (at once if it already is)."""
        with self._mutex:
            if self._state != _LOST:
                self._callbacks.append(callback)
                return
        _run_callbacks([callback], self)

    def leave(self) -> None:
        """Leave the group now: other clients stop seeing the member at once. Idempotent.

        Raises BackendUnavailable if the server did not confirm; heart-beats have stopped
        anyway, so the member then disappears within its TTL.
        """
        with self._mutex:
            was = self._state
            self._state = _LEFT
        if self._job is not None:
            self._job.cancel()
        self._group._forget(self)
        if was == _ALIVE:
            self._reg.leave()
            metrics.member_left(self._group)
        elif was == _LOST:
            # Lost by our count; the server may still hold it for a moment. Best effort:
            # the delete compares the registration's owner token, so it is always safe.
            with contextlib.suppress(BackendUnavailable):
                self._reg.leave()

    def _beat(self) -> bool | None:
        if self._state != _ALIVE:
            return False
        failure: Exception | None = None
        still_there = False
        try:
            still_there = self._reg.refresh()
        except Exception as exc:  # unreachable, or refusing (e.g. a Redis out of memory)
            failure = exc
            if not isinstance(exc, BackendUnavailable):
                log.warning(
                    "heart-beat of %r failed: %s: %s",
                    self.id,
                    type(exc).__name__,
                    exc,
                    extra=member_fields(self._group, self.id),
                )
        reason = beat_verdict(still_there, failure, time.monotonic(), self._reg.expires_at)
        if reason is not None:
            self._mark_lost(reason)
            return False
        return None

    def _mark_lost(self, reason: str) -> None:
        with self._mutex:
            if self._state != _ALIVE:
                return
            self._state = _LOST
            self.lost_reason = reason
            callbacks, self._callbacks = self._callbacks, []
        metrics.member_lost(self._group)
        if self._job is not None:
            self._job.cancel()
        self._group._forget(self)
        log.warning(
            "member %r of group %r lost: %s",
            self.id,
            self._group.name,
            reason,
            extra=member_fields(self._group, self.id),
        )
        _run_callbacks(callbacks, self)

    def __repr__(self) -> str:
        state = self._state if self._state != _ALIVE or self.alive else "expiring"
        return f"JoinedMember({self.id!r}, group={self._group.name!r}, {state})"


def _run_callbacks(callbacks: list[Callable[[JoinedMember], None]], member: JoinedMember) -> None:
    # Off the scheduler thread: a slow callback must not delay other members' heart-beats.
    def run() -> None:
        for callback in callbacks:
            try:
                callback(member)
            except Exception:
                log.exception(
                    "on_lost callback of member %r failed",
                    member.id,
                    extra=member_fields(member._group, member.id),
                )

    if callbacks:
        threading.Thread(target=run, name=f"dcoord-lost-{member.id}", daemon=True).start()


# -- following a group ----------------------------------------------------------------


class _Subscriber(Protocol):
    def _deliver(self, view: GroupView) -> None: ...


class _Follower:
    """One thread per followed Group: subscribe, read, apply the notified changes (or
    re-read when :class:`~dcoord.core.membership.MemberSet` says so), publish to
    subscribers."""

    def __init__(self, group: Group) -> None:
        self._group = group
        self._store: GroupStore = group.client.backend.groups
        self._mutex = threading.Lock()
        # Subscriber -> the MemberSet version it was last given (None: nothing yet).
        self._subscribers: dict[_Subscriber, int | None] = {}
        self._members = MemberSet()
        self._stopped = False
        self._kick = threading.Event()
        self._started = False
        self._subscription: GroupSubscription | None = None
        self._decoded = _Decoded()
        self.error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"dcoord-follow-{group.name}", daemon=True
        )

    def add(self, subscriber: _Subscriber) -> None:
        """Follow for ``subscriber`` too; it gets a fresh read soon, changed or not."""
        with self._mutex:
            self._subscribers[subscriber] = None
            start, self._started = not self._started, True
        if start:
            self._thread.start()
        else:
            self._wake()

    def remove(self, subscriber: _Subscriber) -> bool:
        """Drop ``subscriber``; True when it was the last one (the follower stops)."""
        with self._mutex:
            self._subscribers.pop(subscriber, None)
            if self._subscribers:
                return False
            self._stopped = True
        self._wake()
        return True

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        with self._mutex:
            self._stopped = True
            self._subscribers.clear()
        self._wake()
        if self._started and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)

    def _wake(self) -> None:
        self._kick.set()
        subscription = self._subscription
        if subscription is not None:
            subscription.wake()

    def _run(self) -> None:
        backoff = 0.05
        subscription: GroupSubscription | None = None
        members, current = self._members, False
        try:
            while not self._stopped:
                try:
                    if subscription is None:
                        subscription = self._subscription = self._store.subscribe(self._group.name)
                    # A new subscriber (the kick) gets a fresh read, changed or not.
                    if not current or self._kick.is_set():
                        self._kick.clear()
                        members.read(self._store.read(self._group.name), time.monotonic())
                    metrics.group_size(self._group, len(members.members))
                    self._publish()
                    self.error = None
                    backoff = 0.05
                    if self._stopped or self._kick.is_set():
                        continue
                    current = False
                    changes = subscription.wait(members.timeout(time.monotonic()))
                    current = members.apply(changes, time.monotonic())
                except Exception as exc:
                    current = False
                    # Keep following whatever failed (an outage, a server refusing writes
                    # when out of memory): a dead follower would silently freeze every ring.
                    # A dcoord error (an outage, a refusal such as an ACL denial) says all
                    # in one line, and once: repeats of it go to DEBUG. Only a bug's
                    # traceback helps.
                    repeated = str(exc) == str(self.error)
                    self.error = exc
                    level = logging.INFO if isinstance(exc, BackendUnavailable) else logging.WARNING
                    log.log(
                        logging.DEBUG if repeated else level,
                        "following group %r: %s; retrying",
                        self._group.name,
                        exc,
                        exc_info=not isinstance(exc, DcoordError),
                        extra=member_fields(self._group),
                    )
                    self._kick.wait(backoff)
                    backoff = min(backoff * 2, _MAX_BACKOFF)
        finally:
            self._subscription = None
            if subscription is not None:
                try:
                    subscription.close()
                except Exception:
                    log.debug(
                        "closing the subscription of %r failed",
                        self._group.name,
                        extra=member_fields(self._group),
                    )

    def _publish(self) -> None:
        view: GroupView | None = None
        members = self._members
        with self._mutex:
            for subscriber, seen in list(self._subscribers.items()):
                if seen == members.version:
                    continue
                if view is None:
                    view = _view_of(members, self._decoded)
                self._subscribers[subscriber] = members.version
                try:
                    subscriber._deliver(view)
                except Exception:
                    log.exception(
                        "delivering group %r to %r failed",
                        self._group.name,
                        subscriber,
                        extra=member_fields(self._group),
                    )


class Watch:
    """A running :meth:`Group.watch`: ``stop()`` it (or use it as a context manager).

    The callback runs on this watch's own thread, first with the current member set and
    then once per change, in order. A callback slower than the changes gets only the
    newest set when it returns; one that raises is logged and keeps being called.
    """

    def __init__(self, group: Group, callback: Callable[[GroupView], None]) -> None:
        self._group = group
        self._callback = callback
        self._cond = threading.Condition()
        self._pending: GroupView | None = None
        self._stopped = False
        self._thread = threading.Thread(
            target=self._run, name=f"dcoord-watch-{group.name}", daemon=True
        )
        self._thread.start()

    @property
    def active(self) -> bool:
        return not self._stopped

    def stop(self) -> None:
        """Stop calling the callback (a call in progress finishes). Idempotent."""
        with self._cond:
            if self._stopped:
                return
            self._stopped = True
            self._cond.notify_all()
        self._group._unfollow(self)

    def _deliver(self, view: GroupView) -> None:
        with self._cond:
            self._pending = view
            self._cond.notify_all()

    def _run(self) -> None:
        last: GroupView | None = None
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopped or self._pending is not None)
                if self._stopped:
                    return
                view, self._pending = self._pending, None
            assert view is not None
            # A change and its undoing may both arrive while the callback is busy: then
            # the newest set equals the one it already has, and there is nothing to say.
            if last is not None and dict(view) == dict(last):
                continue
            last = view
            try:
                self._callback(view)
            except Exception:
                log.exception(
                    "watch callback of group %r failed",
                    self._group.name,
                    extra=member_fields(self._group),
                )

    def __enter__(self) -> Watch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class LiveRing:
    """A consistent-hash ring of a group's live members that follows joins, leaves and
    expiries (see :class:`~dcoord.HashRing` for the placement).

    Each membership change swaps in a new immutable :class:`~dcoord.HashRing`, so lookups
    take no lock and never see a half-built ring. The new ring is derived from the last
    one with :meth:`~dcoord.HashRing.with_changes`: only the changed members' points are
    hashed and spliced in or out, never the whole group's; a member that left and joins
    again with its weight (a restart) brings back the ring from before it left, with no
    splice at all. :attr:`epoch` is the membership epoch
    the current ring was built from. Lookups on a group with no live members raise
    :class:`~dcoord.NoMembers`. ``close()`` stops following (the client closing does too).
    """

    def __init__(self, group: Group, vnodes: int) -> None:
        self._group = group
        self._vnodes = vnodes
        self._cond = threading.Condition()
        self._view = GroupView(0, {})
        self._ring: HashRing | None = None
        self._steps = RingSteps()
        self._ready = threading.Event()
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
        """``n`` distinct members for ``key`` in ring order (replicas).

        Raises :class:`~dcoord.NotEnoughMembers` while fewer than ``n`` members are live:
        unlike a :class:`~dcoord.HashRing` built from a fixed node list, this is no bad
        input but the group's state, which may change.
        """
        want = _check_count("n", n)
        ring = self._ring
        live = 0 if ring is None else len(ring)
        if ring is None or want > live:
            raise NotEnoughMembers(
                f"nodes_for(key, {want}) needs {want} live members; "
                f"group {self._group.name!r} has {live}"
            )
        return ring.nodes_for(key, want)

    def wait_for(self, predicate: Callable[[LiveRing], bool], timeout: float) -> bool:
        """Block until ``predicate(self)`` holds (checked on every change) or ``timeout``
        seconds pass; return whether it holds."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    def close(self) -> None:
        """Stop following the group; the ring keeps its last state. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
        self._group._unfollow(self)

    def _current(self) -> HashRing:
        ring = self._ring
        if ring is None:
            raise NoMembers(f"group {self._group.name!r} has no live members")
        return ring

    def _deliver(self, view: GroupView) -> None:
        ring = self._steps.next(self._ring, self._view, view, self._vnodes)
        with self._cond:
            self._ring, self._view = ring, view
            self._ready.set()
            self._cond.notify_all()

    def __len__(self) -> int:
        return len(self._view)

    def __contains__(self, member_id: object) -> bool:
        return member_id in self._view

    def __enter__(self) -> LiveRing:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"LiveRing(group={self._group.name!r}, epoch={self.epoch}, "
            f"members={sorted(self._view)!r}, vnodes={self._vnodes})"
        )


# -- the group ------------------------------------------------------------------------


class Group:
    """A named group of members in the client's namespace. Get one with ``client.group``.

    Closing the client leaves every member joined through it and stops its live rings
    and watches.
    """

    def __init__(self, client: Client, name: str) -> None:
        self.name = _check_group_name(name)
        self.client = client
        self._store: GroupStore = client.backend.groups
        # A condition, so that close() can wait for joins in flight (see _join()).
        self._mutex = threading.Condition()
        self._joining = 0
        self._joined: dict[int, JoinedMember] = {}
        self._follower: _Follower | None = None
        # Followers whose last subscriber left, until their thread has ended.
        self._stopping: list[_Follower] = []
        self._followers: list[LiveRing | Watch] = []
        self._registered = False

    def join(
        self,
        member_id: str,
        *,
        weight: float = 1.0,
        meta: Mapping[str, Any] | None = None,
        ttl: float = DEFAULT_TTL,
        on_lost: Callable[[JoinedMember], None] | None = None,
    ) -> JoinedMember:
        """Join as ``member_id`` and stay joined (heart-beats every ttl/3) until
        :meth:`JoinedMember.leave` or the client closes.

        ``meta`` must be JSON-serialisable; ``weight`` scales the member's share of the
        ring. ``on_lost(member)`` is called if the membership is lost (see
        :class:`JoinedMember`). Raises ConfigError for bad input and AlreadyJoined when
        ``member_id`` is already joined (by any client) and alive, nothing written then;
        ClientClosed when the client is closed or closes meanwhile.
        """
        member_id = _check_member_id(member_id)
        weight = _check_weight(member_id, weight)
        meta = _check_meta(member_id, meta)
        seconds = _check_ttl(ttl)
        with self._mutex:
            self._check_open()
            self._register_close()
            self._joining += 1
        try:
            return self._join(Member(member_id, weight, meta), seconds, on_lost)
        finally:
            with self._mutex:
                self._joining -= 1
                self._mutex.notify_all()

    def _join(
        self, member: Member, ttl: float, on_lost: Callable[[JoinedMember], None] | None
    ) -> JoinedMember:
        # close() waits for this to return, so the connection is still open in here even
        # when the client closes meanwhile: a member the server registered is always
        # either handed to the caller or left, never kept alive by nobody until its TTL.
        try:
            registration = self._store.join(
                self.name, member.id, _encode(member.weight, dict(member.meta)), ttl
            )
        except Exception as exc:
            self._raise_if_closed(exc)
            raise
        if registration is None:
            raise AlreadyJoined(
                f"member id {member.id!r} is already joined to group {self.name!r} "
                "and alive; choose another id or wait for it to leave or expire"
            )
        joined = JoinedMember(self, member, registration, on_lost)
        with self._mutex:
            self._joined[id(joined)] = joined
        try:
            joined._start()  # the scheduler refuses new jobs once the client closed
            self._check_open()
        except Exception as exc:
            self._leave_or_warn(joined)
            self._raise_if_closed(exc)
            raise
        metrics.member_joined(self)
        return joined

    def _leave_or_warn(self, member: JoinedMember) -> None:
        # Best effort (a failed join, close()): the member's TTL removes it otherwise.
        try:
            member.leave()
        except DcoordError as exc:
            log.warning(
                "member %r could not leave cleanly: %s",
                member.id,
                exc,
                extra=member_fields(self, member.id),
            )

    def members(self) -> dict[str, Member]:
        """The live members now, read from the server (expired ones are pruned first)."""
        return dict(self.view())

    def view(self) -> GroupView:
        """The live members now and the membership epoch they were read at."""
        self._check_open()
        view = _view(self._store.read(self.name))
        metrics.group_size(self, len(view))
        return view

    def epoch(self) -> int:
        """The current membership epoch (increases with every join, leave and expiry)."""
        return self.view().epoch

    def ring(self, vnodes: int = DEFAULT_VNODES) -> LiveRing:
        """A :class:`LiveRing` of the live members, current when this returns.

        Raises BackendUnavailable if the group cannot be read within the request timeout,
        PermissionDenied if the server refuses it.
        """
        ring = LiveRing(self, _check_count("vnodes", vnodes))
        # A refusal (an ACL denial) is raised here at once, not retried in the background
        # for the whole timeout and then reported as unavailability.
        self.view()
        self._follow(ring)
        timeout = self.client.settings.request_timeout
        if not ring._ready.wait(timeout):
            # Read before close(): the follower of the last subscriber goes with it.
            error = self._follower.error if self._follower is not None else None
            ring.close()
            raise BackendUnavailable(
                f"could not read group {self.name!r} within {timeout:g} s: {error}"
            ) from error
        return ring

    def watch(self, callback: Callable[[GroupView], None]) -> Watch:
        """Call ``callback(view)`` with the current member set, then on every change.

        Returns a :class:`Watch`; ``stop()`` it when done.
        """
        if not callable(callback):
            raise ConfigError(f"callback must be callable, got {callback!r}")
        watch = Watch(self, callback)
        self._follow(watch)
        return watch

    def close(self) -> None:
        """Leave the members joined through this object and stop its rings and watches."""
        with self._mutex:
            # A join in flight leaves its member itself when it finds the client closed.
            self._mutex.wait_for(lambda: self._joining == 0)
            members = list(self._joined.values())
            subscribers = list(self._followers)
            followers = [self._follower, *self._stopping]
        for member in members:
            self._leave_or_warn(member)
        for subscriber in subscribers:
            if isinstance(subscriber, LiveRing):
                subscriber.close()
            else:
                subscriber.stop()
        for follower in followers:
            if follower is not None:
                follower.stop()  # waits for its thread, so no connection is left in use

    # -- internals

    def _check_open(self) -> None:
        self.client.check_open()

    def _raise_if_closed(self, cause: Exception) -> None:
        # Whatever a closing client made fail (a closed scheduler, a closed
        # connection), the caller is told the one reason that matters.
        if self.client.closed and not isinstance(cause, ClientClosed):
            raise ClientClosed(f"client {self.client.url} is closed") from cause

    def _register_close(self) -> None:
        # Callers hold self._mutex.
        if not self._registered:
            self._registered = True
            self.client.on_close(self.close)

    def _forget(self, member: JoinedMember) -> None:
        with self._mutex:
            self._joined.pop(id(member), None)

    def _follow(self, subscriber: LiveRing | Watch) -> None:
        self._check_open()
        with self._mutex:
            self._register_close()
            self._followers.append(subscriber)
            if self._follower is None:
                self._follower = _Follower(self)
            # Under the mutex, so a concurrent _unfollow cannot stop it in between.
            self._follower.add(subscriber)

    def _unfollow(self, subscriber: LiveRing | Watch) -> None:
        with self._mutex:
            if subscriber in self._followers:
                self._followers.remove(subscriber)
            follower = self._follower
            if follower is not None and follower.remove(subscriber):
                self._follower = None
                # Its thread ends on its own; close() must still wait for it, or the
                # client's connections close under its wait.
                self._stopping = [f for f in self._stopping if f.running]
                self._stopping.append(follower)

    def __repr__(self) -> str:
        return f"<dcoord.Group {self.name!r} of {self.client!r}>"
