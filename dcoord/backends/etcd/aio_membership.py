"""Async group membership on etcd through ``grpc.aio``: the sync store's keys and values.

A member is the key :func:`.membership.members_prefix` + id holding
:func:`.membership.member_value`, as the sync store writes it, so sync and async
members of one group see each other. Unlike the sync client (one shared lease per TTL,
kept alive by pyetcd's thread), each async member gets a lease of its own, kept alive
by the core's heart-beat task (a keep-alive at a third of its TTL): leaving revokes it,
which deletes the key; a cancelled or failed join revokes it too. A follower's
subscription is a watch stream of its own on the group's prefix, read by a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from pyetcd import etcdrpc
from pyetcd.etcdrpc import kv_pb2
from pyetcd.utils import prefix_range_end

from ...errors import BackendUnavailable
from ..base import GroupChange, GroupSnapshot
from .locks import _created_at, _first_kv, _range
from .membership import changes_of, member_value, members_of, members_prefix

if TYPE_CHECKING:
    from .aio_locks import AsyncEtcdBackend, AsyncEtcdLocks


class AsyncEtcdGroups:
    """The async group store of one etcd backend (leases through its lock store's)."""

    def __init__(self, backend: AsyncEtcdBackend, leases: AsyncEtcdLocks) -> None:
        self.backend = backend
        self._leases = leases

    async def join(
        self, group: str, member_id: str, payload: bytes, ttl: float
    ) -> AsyncEtcdRegistration | None:
        key = (members_prefix(self.backend.prefix, group) + member_id).encode()
        value = member_value(secrets.token_hex(16), payload)
        put = etcdrpc.PutRequest(key=key, value=value)
        lease, lease_ttl, expires_at = await self._leases.grant(ttl)
        put.lease = lease
        request = etcdrpc.TxnRequest(
            compare=[_created_at(key, 0)],
            success=[etcdrpc.RequestOp(request_put=put), _range(key)],
            failure=[_range(key)],
        )
        try:
            # Safe to retry: a retried join whose first reply was lost finds its value.
            response = await self.backend.txn(request, what=f"join {member_id!r}", retry=True)
        except BaseException:
            # Failed or cancelled: the key, if it was written, goes with its lease.
            await asyncio.wait({self._leases.forget(lease)})
            raise
        current = _first_kv(response.responses[-1])
        if current is None or bytes(current.value) != value:
            await asyncio.wait({self._leases.forget(lease)})
            return None
        return AsyncEtcdRegistration(self._leases, lease, float(lease_ttl), expires_at)

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
    """One member on a lease of its own."""

    def __init__(self, leases: AsyncEtcdLocks, lease: int, ttl: float, expires_at: float) -> None:
        self._leases = leases
        self._lease = lease
        self.ttl = ttl
        self.expires_at = expires_at

    async def refresh(self) -> bool:
        sent = time.monotonic()
        remaining = await self._leases.keep_alive(self._lease)
        if remaining <= 0:
            return False
        self.expires_at = sent + remaining
        return True

    async def leave(self) -> bool:
        return await self._leases.revoke(self._lease)


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
