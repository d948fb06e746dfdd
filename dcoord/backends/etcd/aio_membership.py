"""Async group membership on etcd through ``grpc.aio``: the sync store's keys and values.

A member is the key :func:`.membership.members_prefix` + id holding
:func:`.membership.member_value`, as the sync store writes it, so sync and async
members of one group see each other. As the sync client, each member's key goes on the
client's shared lease of its TTL (:class:`.aio_leases.AsyncLeases`, the one its async
locks use: one keep-alive task per lease), so a thousand members cost one keep-alive
request per third of a TTL, and the members of a client that dies expire together, in
one revision. Leaving deletes the member's key only (the lease lives on for the
others); a lost lease loses every member on it at once (the lease's keep-alive task,
finding it lost, tells them: no member has a task of its own). A cancelled or failed
join deletes its key if it wrote it. A follower's subscription is a watch stream of its
own on the group's prefix, read by a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from pyetcd import etcdrpc
from pyetcd.etcdrpc import kv_pb2
from pyetcd.utils import prefix_range_end

from ...errors import BackendUnavailable, PermissionDenied
from ..base import GroupChange, GroupSnapshot
from .aio_txlog import delete, holds
from .leases import Lease, LeaseHolders, LeaseNotFound
from .locks import _CLEANUP_INTERVAL, _created_at, _first_kv, _range, delete_txn, deleted
from .membership import changes_of, member_value, members_of, members_prefix

if TYPE_CHECKING:
    from .aio_locks import AsyncEtcdBackend, AsyncEtcdLocks


class AsyncEtcdGroups:
    """The async group store of one etcd backend (its members on the shared leases, and
    their cleanups, of its lock store)."""

    def __init__(self, backend: AsyncEtcdBackend, locks: AsyncEtcdLocks) -> None:
        self.backend = backend
        self._locks = locks
        self.holders = LeaseHolders()

    async def join(
        self, group: str, member_id: str, payload: bytes, ttl: float
    ) -> AsyncEtcdRegistration | None:
        key = (members_prefix(self.backend.prefix, group) + member_id).encode()
        value = member_value(secrets.token_hex(16), payload)
        leases = self._locks.leases
        lease = await leases.lease(ttl)
        try:
            current = await self._put(key, value, lease, member_id)
        except LeaseNotFound:
            # The server dropped the shared lease before its keep-alive noticed (nothing
            # was written): its members learn it, and this one joins on a fresh lease,
            # as the sync store does (:meth:`.leases.Leases.attached`).
            lease.mark_lost()
            lease = await leases.lease(ttl)
            current = await self._put(key, value, lease, member_id)
        if current is None or bytes(current.value) != value:
            return None  # another registration holds the id
        return AsyncEtcdRegistration(self, key, lease, int(current.create_revision))

    async def _put(self, key: bytes, value: bytes, lease: Lease, member_id: str) -> Any:
        """Create the member ``key`` with ``value`` on ``lease`` unless it exists; the key
        as it is then (ours if it holds ``value``)."""
        put = etcdrpc.PutRequest(key=key, value=value, lease=lease.id)
        request = etcdrpc.TxnRequest(
            compare=[_created_at(key, 0)],
            success=[etcdrpc.RequestOp(request_put=put), _range(key)],
            failure=[_range(key)],
        )
        try:
            # Safe to retry: a retried join whose first reply was lost finds its value.
            response = await self.backend.txn(request, what=f"join {member_id!r}", retry=True)
        except (LeaseNotFound, PermissionDenied):
            raise  # refused: nothing was written (and a delete would be denied too)
        except BaseException:
            # Failed or cancelled: the put may have happened (its reply lost). The key
            # must go before the error does: on the shared lease it would live as long
            # as the client. Waited for within the request timeout; then the task goes
            # on (the client's close waits for it).
            removal = self._undo(key, value, lease)
            await asyncio.wait({removal}, timeout=self.backend.settings.request_timeout)
            raise
        return _first_kv(response.responses[-1])

    def _undo(self, key: bytes, value: bytes, lease: Lease) -> asyncio.Task[None]:
        """Delete member ``key`` if it holds ``value`` (our join's token: never another
        registration of the id), in a task; once more a second after a delete found
        nothing, since the put may have reached the server behind it (as a lock's
        queue key, :meth:`.aio_locks.AsyncEtcdLocks.remove`). Not needed once the
        lease is lost: the key went with it."""
        what = f"member key {key.decode()}"
        request = etcdrpc.TxnRequest(
            compare=[holds(key.decode(), value)], success=[delete(key.decode())]
        )
        again = True

        async def remove() -> bool:
            nonlocal again
            response = await self.backend.txn(request, what=f"delete {what}", retry=True)
            if deleted(response) or not again:
                return True
            again = False
            await asyncio.sleep(_CLEANUP_INTERVAL)
            return False

        return self._locks.clean_up(what, remove, lease.lost.is_set)

    async def leave(self, key: bytes, create_revision: int) -> bool:
        """Delete member ``key`` if it is still the one created at ``create_revision``."""
        response = await self.backend.txn(
            delete_txn(key, create_revision), what=f"leave {key.decode()!r}", retry=True
        )
        return deleted(response)

    async def read(self, group: str) -> GroupSnapshot:
        prefix = members_prefix(self.backend.prefix, group)
        request = etcdrpc.RangeRequest(
            key=prefix.encode(), range_end=prefix_range_end(prefix.encode())
        )
        backend = self.backend
        response = await backend.call(
            lambda: backend.kv.Range(request, timeout=backend.timeout, metadata=backend.metadata),
            what=f"read members of group {group!r}",
            retry=True,
        )
        members = members_of(response.kvs, prefix)
        return GroupSnapshot(epoch=int(response.header.revision), members=members, next_expiry=None)

    async def subscribe(self, group: str) -> AsyncEtcdSubscription:
        subscription = AsyncEtcdSubscription(self.backend, group)
        await subscription.connect()
        return subscription


class AsyncEtcdRegistration:
    """One member: its key, on the client's shared lease of its TTL. The lease's
    keep-alive task keeps it alive and, when the lease is lost, tells it at once
    (:class:`.leases.LeaseHolders`): no task or request of its own."""

    def __init__(
        self, groups: AsyncEtcdGroups, key: bytes, lease: Lease, create_revision: int
    ) -> None:
        self._groups = groups
        self._key = key
        self.lease = lease
        self._create_revision = create_revision
        self._callbacks: list[Callable[[str], None]] = []
        self.ttl = float(lease.ttl)

    @property
    def expires_at(self) -> float:
        return 0.0 if self.lease.lost.is_set() else self.lease.expires_at

    def on_lost(self, callback: Callable[[str], None]) -> None:
        self._callbacks.append(callback)
        self._groups.holders.add(self, self.lease)

    def lost(self) -> None:
        """The lease is lost (called by :class:`.leases.LeaseHolders`, on the loop)."""
        lease = self.lease
        if time.monotonic() >= lease.expires_at:
            # Given up by its keep-alive task: not refreshed within its TTL.
            reason = (
                "heart-beats failed for longer than its ttl: the keep-alives of its etcd "
                f"lease {lease.id:x} did not succeed within its TTL ({lease.ttl} s)"
            )
        else:
            reason = f"its etcd lease {lease.id:x} expired on the server or was revoked"
        for callback in self._callbacks:
            callback(reason)

    async def leave(self) -> bool:
        self._groups.holders.discard(self, self.lease)
        return await self._groups.leave(self._key, self._create_revision)


class AsyncEtcdSubscription:
    """A watch stream on the group's prefix; a task reads it and sets an event."""

    def __init__(self, backend: AsyncEtcdBackend, group: str, *, prefix: str | None = None) -> None:
        self._backend = backend
        # ``prefix``: an election's (aio_election.py), whose watchers this serves too.
        where = members_prefix(backend.prefix, group) if prefix is None else prefix
        self._prefix = where.encode()
        self._what = f"watch {'group' if prefix is None else 'election'} {group!r}"
        self._stream: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._changes: list[GroupChange] = []

    async def connect(self) -> None:
        backend = self._backend
        backend.check_open(self._what)  # gRPC's UsageError on a closed channel otherwise
        stream = backend.watch.Watch(metadata=backend.metadata)
        create = etcdrpc.WatchCreateRequest(
            key=self._prefix, range_end=prefix_range_end(self._prefix)
        )

        async def created() -> int:
            await stream.write(etcdrpc.WatchRequest(create_request=create))
            # Only once the watch is created is no later change missed.
            async with asyncio.timeout(backend.timeout):
                reply = await stream.read()
            if reply is grpc.aio.EOF or not reply.created or reply.canceled:
                raise BackendUnavailable(f"{self._what}: the watch was not created")
            return int(reply.header.revision)

        try:
            revision = await backend.call(created, what=self._what)
        except BaseException as exc:
            stream.cancel()
            if isinstance(exc, TimeoutError):
                raise BackendUnavailable(f"{self._what}: no reply to the watch") from exc
            raise
        self._stream = stream
        self._changed.clear()
        self._changes = []
        self._reader = asyncio.get_running_loop().create_task(
            self._read(stream, revision), name=f"dcoord {self._what}"
        )

    async def _read(self, stream: Any, revision: int) -> None:
        # ``revision``: the watch's start, then its last event's (see changes_of).
        prefix = self._prefix.decode()
        try:
            while True:
                reply = await stream.read()
                if reply is grpc.aio.EOF or reply.canceled:
                    return  # wait() sees the reader done: the stream ended
                if reply.events:
                    events = (
                        (e.type != kv_pb2.Event.DELETE, e.kv.key, e.kv.value, e.kv.mod_revision)
                        for e in reply.events
                    )
                    changes, revision = changes_of(events, prefix, revision)
                    self._changes += changes
                    self._changed.set()
        finally:
            self._changed.set()

    async def wait(self, timeout: float) -> list[GroupChange] | None:
        reader = self._reader
        if self._stream is None or reader is None:
            await self.connect()
            return None  # watching again: the caller re-reads, so nothing is missed
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a cancellation
        # (the follower stopping) that arrives as the event is set.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        self._changed.clear()
        if reader.done():
            await self.close()
            error = None if reader.cancelled() else reader.exception()
            raise BackendUnavailable(f"{self._what}: the watch stream broke: {error}") from error
        changes, self._changes = self._changes, []
        return changes

    async def wake(self) -> None:
        self._changed.set()

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        if stream is not None:
            stream.cancel()
