"""Group membership on etcd: one key per member, attached to the client's shared lease.

``/dcoord/<ns>/groups/<g>/members/<id>`` holds ``<token> <payload>``, put with the
lease of the member's TTL (``backend.leases.lease(ttl)``), so the member lives exactly as
long as the client keeps that lease alive: etcd deletes the key when the lease expires,
by the server's clock. A watch on the prefix tells followers about every change, and its
events are the changes themselves (:func:`changes_of`); the epoch of a read is its etcd
revision.
"""

from __future__ import annotations

import contextlib
import functools
import secrets
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from pyetcd.events import PutEvent

from ...errors import BackendUnavailable, ClientClosed
from ..base import GroupChange, GroupSnapshot
from .leases import Lease, LeaseHolders

if TYPE_CHECKING:
    from . import EtcdBackend


def members_prefix(prefix: str, group: str) -> str:
    """The key prefix of ``group``'s members (``prefix``: the backend's namespace)."""
    return f"{prefix}groups/{group}/members/"


def member_value(token: str, payload: bytes) -> bytes:
    """A member key's value: the join's token, a space, the payload."""
    return token.encode() + b" " + payload


def members_of(kvs: Any, prefix: str) -> dict[str, bytes]:
    """Member id -> payload of the member keys ``kvs`` read under ``prefix``."""
    cut = len(prefix)
    members = {}
    for kv in kvs:
        _, _, payload = bytes(kv.value).partition(b" ")
        members[kv.key.decode()[cut:]] = payload
    return members


def changes_of(
    events: Iterable[tuple[bool, bytes, bytes, int]], prefix: str, after: int
) -> tuple[list[GroupChange], int]:
    """The changes of watch ``events`` (put?, key, value, revision) under ``prefix``, one
    per revision (a lease's expiry deletes all its keys in one), each following the one
    before it from ``after`` (the watch's previous revision); and the last revision.

    A watch delivers every event after its start, in order, and never splits one
    revision's events between responses, so each change follows the previous one.
    """
    cut = len(prefix)
    changes: list[GroupChange] = []
    joined: dict[str, bytes] = {}
    left: list[str] = []
    revision = after
    for put, key, value, event_revision in events:
        if event_revision != revision and (joined or left):
            changes.append(GroupChange(revision, after, joined, tuple(left)))
            after, joined, left = revision, {}, []
        revision = event_revision
        member_id = key.decode()[cut:]
        if put:
            joined[member_id] = value.partition(b" ")[2]
        else:
            left.append(member_id)
    if joined or left:
        changes.append(GroupChange(revision, after, joined, tuple(left)))
    return changes, revision


class EtcdGroups:
    def __init__(self, backend: EtcdBackend, prefix: str) -> None:
        self._backend = backend
        self._etcd = backend.etcd
        self._prefix = prefix
        # Told of their lease's loss at once: the core runs no heart-beat for them.
        self.holders = LeaseHolders()

    def members_prefix(self, group: str) -> str:
        return members_prefix(self._prefix, group)

    def join(
        self, group: str, member_id: str, payload: bytes, ttl: float
    ) -> EtcdRegistration | None:
        key = self.members_prefix(group) + member_id
        token = secrets.token_hex(16)
        value = member_value(token, payload)
        tx = self._etcd.transactions

        def join(lease: Lease) -> tuple[bytes, Any]:
            _, responses = self._etcd.transaction(
                compare=[tx.create(key) == 0],
                success=[tx.put(key, value, lease=lease.id), tx.get(key)],
                failure=[tx.get(key)],
            )
            ((current, meta),) = responses[-1]
            return bytes(current), meta

        def join_on(lease: Lease) -> tuple[Lease, bytes, Any]:
            # Safe to retry: a retried join whose first reply was lost finds its token.
            current, meta = self._backend.call(
                functools.partial(join, lease), what=f"join {member_id!r}", retry=True
            )
            return lease, current, meta

        # A shared lease the server dropped before its keep-alive noticed took its keys
        # with it: attached() marks it lost (its members learn it) and joins on a fresh one.
        lease, current, meta = self._backend.leases.attached(
            lambda: self._backend.leases.lease(ttl), join_on
        )
        if current != value:
            return None
        return EtcdRegistration(self, key, lease, int(meta.create_revision))

    def leave(self, key: str, create_revision: int) -> bool:
        tx = self._etcd.transactions
        ok, _ = self._backend.call(
            lambda: self._etcd.transaction(
                compare=[tx.create(key) == create_revision], success=[tx.delete(key)], failure=[]
            ),
            what=f"leave {key!r}",
            retry=True,
        )
        return bool(ok)

    def read(self, group: str) -> GroupSnapshot:
        prefix = self.members_prefix(group)
        response = self._backend.call(
            lambda: self._etcd.get_prefix_response(prefix),
            what=f"read members of group {group!r}",
            retry=True,
        )
        members = members_of(response.kvs, prefix)
        return GroupSnapshot(epoch=int(response.header.revision), members=members, next_expiry=None)

    def subscribe(self, group: str) -> EtcdSubscription:
        return EtcdSubscription(self._backend, self.members_prefix(group), group)


class EtcdRegistration:
    keepalive_interval: float | None = None

    def __init__(self, groups: EtcdGroups, key: str, lease: Lease, create_revision: int) -> None:
        self._groups = groups
        self._key = key
        self._lease = lease
        self._create_revision = create_revision
        self._callbacks: list[Callable[[], None]] = []
        self.ttl = float(lease.ttl)

    @property
    def expires_at(self) -> float:
        return 0.0 if self._lease.lost.is_set() else self._lease.expires_at

    def refresh(self) -> bool:
        """The shared lease's keep-alive does the refreshing; this only reports it."""
        return not self._lease.lost.is_set()

    def leave(self) -> bool:
        self._groups.holders.discard(self, self._lease)
        return self._groups.leave(self._key, self._create_revision)

    def on_lost(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)
        self._groups.holders.add(self, self._lease)

    def lost(self) -> None:
        for callback in self._callbacks:
            callback()


class EtcdSubscription:
    """A watch on the group's prefix, on the client's one watch stream (pyetcd's thread)."""

    def __init__(self, backend: EtcdBackend, prefix: str, group: str) -> None:
        self._backend = backend
        self._prefix = prefix
        self._what = f"watch group {group!r}"
        self._event = threading.Event()
        self._mutex = threading.Lock()
        self._generation = 0
        self._error: BaseException | None = None
        self._changes: list[GroupChange] = []
        # The revision of the watch's last event (0 before its first: the watch started
        # before any read the caller makes while it runs).
        self._revision = 0
        self._watch_id: Any = None
        self._start()

    def _start(self) -> None:
        with self._mutex:
            self._generation += 1
            generation = self._generation
            self._error = None
            self._changes, self._revision = [], 0

        def on_response(response: Any) -> None:
            with self._mutex:
                if generation != self._generation:
                    return  # from a watch this subscription already replaced
                if isinstance(response, BaseException):
                    self._error = response
                else:
                    events = (
                        (isinstance(e, PutEvent), e.key, e.value, e.mod_revision)
                        for e in response.events
                    )
                    changes, self._revision = changes_of(events, self._prefix, self._revision)
                    self._changes += changes
            self._event.set()

        # A watch not created in time (WatchTimedOut) ends as BackendUnavailable.
        self._watch_id = self._backend.call(
            lambda: self._backend.etcd.add_watch_prefix_callback(self._prefix, on_response),
            what=self._what,
        )

    def wait(self, timeout: float) -> list[GroupChange] | None:
        if self._watch_id is None:
            self._start()
            return None  # watching again: the caller re-reads, so nothing is missed
        if self._event.wait(timeout):
            self._event.clear()
        with self._mutex:
            error, self._error = self._error, None
            changes, self._changes = self._changes, []
        if error is not None:
            # The stream broke (server restart, connection lost): pyetcd has dropped every
            # watch on it; the next wait() watches again.
            self._watch_id = None
            raise BackendUnavailable(f"{self._what}: the watch stream broke: {error}") from error
        return changes

    def wake(self) -> None:
        self._event.set()

    def close(self) -> None:
        watch_id, self._watch_id = self._watch_id, None
        with self._mutex:
            self._generation += 1
        if watch_id is not None:
            # If the stream (or the whole client) is gone, the watch went with it.
            with contextlib.suppress(BackendUnavailable, ClientClosed):
                self._backend.call(
                    lambda: self._backend.etcd.cancel_watch(watch_id), what=self._what
                )
