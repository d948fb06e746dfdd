"""Async group membership on Redis: the sync store's script, keys and channel.

Every operation is :data:`.membership.SCRIPT` on :func:`.membership.group_keys`, run
through ``redis.asyncio`` (:func:`.aio_locks.run_script`), so sync and async members
of one group see each other, and liveness is decided by the server's clock as before.
A follower's subscription is a pub/sub connection of its own on the group's channel:
SUBSCRIBE on a single server and Sentinel; on a Cluster SSUBSCRIBE through redis-py's
async cluster pub/sub, as the sync subscription (the script then SPUBLISHes, see
:func:`.aio_locks.run_script`): the changes and wake-up channels carry the group's hash
tag, so one connection to the group's primary serves the follower.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from typing import TYPE_CHECKING, Any

from redis.asyncio.cluster import RedisCluster

from ...errors import BackendUnavailable
from ..base import GroupChange, GroupSnapshot
from . import aio_locks  # (a module: aio_locks imports this one)
from .locks import ORPHAN_RETRY_FIRST, ORPHAN_RETRY_MAX, answered
from .membership import SCRIPT, collect, group_keys, snapshot_of

if TYPE_CHECKING:
    from .aio_locks import AsyncRedisBackend

log = logging.getLogger("dcoord.redis")


class AsyncRedisGroups:
    """The async group store of one Redis backend."""

    def __init__(self, backend: AsyncRedisBackend) -> None:
        self.backend = backend
        self._cleanups: set[asyncio.Task[None]] = set()

    async def run(self, group: str, what: str, *args: Any, retry: bool = True) -> Any:
        keys, channel = group_keys(self.backend.prefix, group)
        return await self.backend.call(
            lambda: aio_locks.run_script(SCRIPT, self.backend.redis, keys, [channel, *args]),
            what=f"{what} in group {group!r}",
            retry=retry,
        )

    async def join(
        self, group: str, member_id: str, payload: bytes, ttl: float
    ) -> AsyncRedisRegistration | None:
        token = secrets.token_hex(16)
        ttl_ms = math.ceil(ttl * 1000)
        sent = time.monotonic()
        try:
            # Safe to retry: the script treats a second join with the same token as a
            # refresh.
            joined = await self.run(
                group, f"join {member_id!r}", "join", member_id, token, ttl_ms, payload
            )
        except BaseException as exc:
            # A lost reply, or a cancellation while the script was in flight: it may have
            # run, or run yet. Leave with its token rather than keep a member for its TTL.
            if not answered(exc):
                self._undo(group, member_id, token, sent + ttl)
            raise
        if not joined:
            return None
        return AsyncRedisRegistration(self, group, member_id, token, ttl, sent + ttl)

    def _undo(self, group: str, member_id: str, token: str, sure_after: float) -> None:
        task = asyncio.get_running_loop().create_task(
            self._leave_until(group, member_id, token, sure_after),
            name=f"dcoord undo join {group}/{member_id}",
        )
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _leave_until(self, group: str, member_id: str, token: str, sure_after: float) -> None:
        # Until the leave finds the member, or the join, had it run, has surely expired.
        delay = ORPHAN_RETRY_FIRST
        while True:
            started = time.monotonic()
            try:
                left = await self.leave(group, member_id, token)
            except BackendUnavailable as exc:
                log.info("undoing the join of %r: %s; retrying", member_id, exc)
            except Exception as exc:  # refused: retrying cannot help, the TTL removes it
                log.warning("undoing the join of %r: %r; it expires by its TTL", member_id, exc)
                return
            else:
                if left or started >= sure_after:
                    return
            await asyncio.sleep(delay)
            delay = min(ORPHAN_RETRY_MAX, delay * 2)

    async def refresh(self, group: str, member_id: str, token: str, ttl: float) -> bool:
        # Not retried: the core's next heart-beat is the retry, and it knows the deadline.
        ttl_ms = math.ceil(ttl * 1000)
        what = f"heart-beat of {member_id!r}"
        return bool(await self.run(group, what, "refresh", member_id, token, ttl_ms, retry=False))

    async def leave(self, group: str, member_id: str, token: str) -> bool:
        return bool(await self.run(group, f"leave {member_id!r}", "leave", member_id, token))

    async def read(self, group: str) -> GroupSnapshot:
        return snapshot_of(await self.run(group, "read members", "read"))

    async def subscribe(self, group: str) -> AsyncRedisSubscription:
        subscription = AsyncRedisSubscription(self.backend, group)
        await subscription.connect()
        return subscription

    async def close(self) -> None:
        """Cancel the undo tasks (the members' TTL covers them)."""
        for task in list(self._cleanups):
            task.cancel()
        await asyncio.gather(*self._cleanups, return_exceptions=True)


class AsyncRedisRegistration:
    """One member joined through an async client (the token of its join)."""

    def __init__(
        self,
        groups: AsyncRedisGroups,
        group: str,
        member_id: str,
        token: str,
        ttl: float,
        expires_at: float,
    ) -> None:
        self._groups = groups
        self._group = group
        self._member_id = member_id
        self._token = token
        self.ttl = ttl
        self.expires_at = expires_at

    async def refresh(self) -> bool:
        sent = time.monotonic()
        ok = await self._groups.refresh(self._group, self._member_id, self._token, self.ttl)
        if ok:
            self.expires_at = sent + self.ttl
        return ok

    async def leave(self) -> bool:
        return await self._groups.leave(self._group, self._member_id, self._token)


class AsyncRedisSubscription:
    """A pub/sub connection of its own on the group's changes channel, plus a private
    wake-up channel (see :meth:`wake`), as the sync subscription."""

    def __init__(self, backend: AsyncRedisBackend, group: str) -> None:
        self._backend = backend
        self._channel = group_keys(backend.prefix, group)[1]
        self._wake_channel = f"{backend.prefix}group:{{{group}}}:wake:{secrets.token_hex(8)}"
        self._what = f"subscribe to changes of group {group!r}"
        self._sharded = isinstance(backend.redis, RedisCluster)
        self._pubsub: Any = None

    async def _get(self, pubsub: Any, timeout: float) -> Any:
        """The next message (or None after ``timeout``), shard channels' on a Cluster."""
        if self._sharded:
            return await pubsub.get_sharded_message(timeout=timeout)
        return await pubsub.get_message(timeout=timeout)

    async def connect(self) -> None:
        pubsub: Any = self._backend.redis.pubsub()
        deadline = time.monotonic() + self._backend.settings.request_timeout
        confirmation = "ssubscribe" if self._sharded else "subscribe"

        async def subscribe() -> None:
            await getattr(pubsub, confirmation)(self._channel, self._wake_channel)
            # Wait for both confirmations: only then is no later change missed.
            confirmed = 0
            while confirmed < 2:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BackendUnavailable(f"{self._what}: no SUBSCRIBE confirmation")
                message = await self._get(pubsub, remaining)
                if message is not None and message["type"] == confirmation:
                    confirmed += 1

        try:
            await self._backend.call(subscribe, what=self._what)
        except BaseException:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            raise
        self._pubsub = pubsub

    async def wait(self, timeout: float) -> list[GroupChange] | None:
        if self._pubsub is None:
            await self.connect()
            return None  # re-subscribed: the caller re-reads, so nothing is missed
        pubsub = self._pubsub
        deadline = time.monotonic() + timeout
        channel = self._channel.encode()

        async def receive() -> list[GroupChange] | None:
            changes: list[GroupChange] | None = []
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return changes
                message = await self._get(pubsub, remaining)
                if message is not None and message["type"] in ("message", "smessage"):
                    # Take what else arrived too: the follower applies it all at once.
                    while message is not None:
                        if message["type"] in ("message", "smessage"):
                            changes = collect(changes, message, channel)
                        message = await self._get(pubsub, 0)
                    return changes

        try:
            return await self._backend.call(receive, what=self._what)
        except BackendUnavailable:
            self._pubsub = None
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            raise

    async def wake(self) -> None:
        # A message rather than a cancellation: redis-py's pub/sub read, cancelled,
        # could leave its task hanging. In an outage the wait fails by itself anyway.
        redis_client: Any = self._backend.redis
        publish = redis_client.spublish if self._sharded else redis_client.publish
        with contextlib.suppress(BackendUnavailable):
            await self._backend.call(
                lambda: publish(self._wake_channel, b"wake"),
                what="wake a group follower",
            )

    async def close(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
