"""Group membership on Redis: a sorted set scored by expiry (server ``TIME``), pub/sub.

Keys of group ``g`` (one hash slot, thanks to the ``{g}`` tag)::

    dcoord:<ns>:group:{g}:expiries   sorted set  member id -> expiry (ms, server clock)
    dcoord:<ns>:group:{g}:payloads   hash        member id -> payload
    dcoord:<ns>:group:{g}:owners     hash        member id -> token of the join
    dcoord:<ns>:group:{g}:epoch      counter     INCRed on every change
    dcoord:<ns>:group:{g}:changes    channel     every change: epoch, op, ids, payload
    dcoord:<ns>:group:{g}:wake:<id>  channel     wakes one follower (see wake())

Every operation is ``membership.lua`` (sent once, then run by SHA; reloaded on
NOSCRIPT), which first prunes expired members, so a read never returns a dead one, and
publishes each change (:func:`change_of` decodes it) for followers to apply. On a
Redis Cluster the channels are shard channels (SPUBLISH / SSUBSCRIBE): both carry the
group's hash tag, so one connection to the group's primary serves a follower.
"""

from __future__ import annotations

import contextlib
import json
import math
import secrets
import time
from typing import TYPE_CHECKING, Any

import redis

from ...errors import BackendUnavailable
from ..base import GroupChange, GroupSnapshot, TokenRegistration
from .locks import LuaScript
from .scripts import lua

if TYPE_CHECKING:
    from . import RedisBackend

SCRIPT = LuaScript(lua("membership", checked=True))


def group_keys(prefix: str, group: str) -> tuple[list[str], str]:
    """The keys of ``group`` (``prefix``: the backend's) and its changes channel."""
    base = f"{prefix}group:{{{group}}}:"
    keys = [base + name for name in ("expiries", "payloads", "owners", "epoch")]
    return keys, base + "changes"


def snapshot_of(reply: Any) -> GroupSnapshot:
    """The script's reply to ``read``: epoch, ms to the next expiry, then id, payload."""
    epoch, next_ms, flat = int(reply[0]), int(reply[1]), reply[2:]
    # zip/map, not a comprehension: a follower reads the whole group on every change.
    members = dict(zip(map(bytes.decode, flat[0::2]), map(bytes, flat[1::2]), strict=True))
    return GroupSnapshot(
        epoch=epoch,
        members=members,
        next_expiry=None if next_ms < 0 else next_ms / 1000,
    )


def change_of(message: bytes) -> GroupChange | None:
    """The change a ``changes`` message carries (see membership.lua); None for one that
    carries none: a client before deltas published only the new epoch."""
    try:
        epoch_text, op, ids, payload, ttl_ms = json.loads(message)
        epoch = int(epoch_text)
    except (ValueError, TypeError):  # (UnicodeDecodeError is a ValueError)
        return None
    if op == "join" and len(ids) == 1:
        return GroupChange(epoch, epoch - 1, {ids[0]: payload.encode()}, (), ttl_ms / 1000)
    if op in ("leave", "expire"):
        # An empty Lua table encodes as {}: tuple() of it is () all the same.
        return GroupChange(epoch, epoch - 1, {}, tuple(ids))
    return None


def collect(
    changes: list[GroupChange] | None, message: Any, channel: bytes
) -> list[GroupChange] | None:
    """``changes`` with the one of pub/sub ``message`` added if it came on ``channel`` (the
    group's; the other is the wake-up channel); None once any message lacked its change."""
    if changes is None or message["channel"] != channel:
        return changes
    change = change_of(message["data"])
    if change is None:
        return None
    changes.append(change)
    return changes


class RedisGroups:
    def __init__(self, backend: RedisBackend, prefix: str) -> None:
        self._backend = backend
        self._redis = backend.redis
        self._backend_prefix = prefix
        self._prefix = f"{prefix}group:"

    def keys(self, group: str) -> tuple[list[str], str]:
        return group_keys(self._backend_prefix, group)

    def run(self, group: str, what: str, *args: Any, retry: bool = True) -> Any:
        keys, channel = self.keys(group)
        return self._backend.call(
            lambda: SCRIPT(self._redis, keys, [channel, *args]),
            what=f"{what} in group {group!r}",
            retry=retry,
        )

    def join(
        self, group: str, member_id: str, payload: bytes, ttl: float
    ) -> TokenRegistration | None:
        token = secrets.token_hex(16)
        ttl_ms = math.ceil(ttl * 1000)
        sent = time.monotonic()
        # Safe to retry: the script treats a second join with the same token as a refresh.
        if not self.run(group, f"join {member_id!r}", "join", member_id, token, ttl_ms, payload):
            return None
        return TokenRegistration(self, group, member_id, token, ttl, sent + ttl)

    def refresh(self, group: str, member_id: str, token: str, ttl: float) -> bool:
        # Not retried: the core's next heart-beat is the retry, and it knows the deadline.
        return bool(
            self.run(
                group,
                f"heart-beat of {member_id!r}",
                "refresh",
                member_id,
                token,
                math.ceil(ttl * 1000),
                retry=False,
            )
        )

    def leave(self, group: str, member_id: str, token: str) -> bool:
        return bool(self.run(group, f"leave {member_id!r}", "leave", member_id, token))

    def read(self, group: str) -> GroupSnapshot:
        return snapshot_of(self.run(group, "read members", "read"))

    def subscribe(self, group: str) -> RedisSubscription:
        wake = f"{self._prefix}{{{group}}}:wake:{secrets.token_hex(8)}"
        return RedisSubscription(self._backend, self.keys(group)[1], wake, group)


class RedisSubscription:
    """A pub/sub connection on the group's channel plus a private wake-up channel."""

    def __init__(self, backend: RedisBackend, channel: str, wake_channel: str, group: str) -> None:
        self._backend = backend
        self._channel = channel
        self._channel_bytes = channel.encode()
        self._wake_channel = wake_channel
        self._what = f"subscribe to changes of group {group!r}"
        self._sharded = backend.settings.topology == "cluster"
        self._pubsub: Any = None
        self._connect()

    def _get(self, pubsub: Any, timeout: float) -> Any:
        """The next message (or None after ``timeout``), shard channels' on a Cluster."""
        if self._sharded:
            return pubsub.get_sharded_message(timeout=timeout)
        return pubsub.get_message(timeout=timeout)

    def _connect(self) -> None:
        pubsub = self._backend.redis.pubsub()  # type: ignore[no-untyped-call]
        confirmation = "ssubscribe" if self._sharded else "subscribe"

        def subscribe() -> None:
            getattr(pubsub, confirmation)(self._channel, self._wake_channel)
            # Wait for both confirmations: only then is no later change missed.
            confirmed, deadline = 0, time.monotonic() + self._backend.settings.request_timeout
            while confirmed < 2:
                if time.monotonic() >= deadline:
                    raise redis.TimeoutError("no SUBSCRIBE confirmation")
                message = self._get(pubsub, max(0.0, deadline - time.monotonic()))
                if message is not None and message["type"] == confirmation:
                    confirmed += 1

        try:
            self._backend.call(subscribe, what=self._what)
        except BaseException:
            pubsub.close()
            raise
        self._pubsub = pubsub

    def wait(self, timeout: float) -> list[GroupChange] | None:
        if self._pubsub is None:
            self._connect()
            return None  # re-subscribed: the caller re-reads, so nothing is missed
        pubsub = self._pubsub
        deadline = time.monotonic() + timeout
        receive = self._receive_sharded if self._sharded else self._receive
        try:
            return self._backend.call(lambda: receive(pubsub, deadline), what=self._what)
        except BackendUnavailable:
            self._pubsub = None
            pubsub.close()
            raise

    def _receive(self, pubsub: Any, deadline: float) -> list[GroupChange] | None:
        """The changes that arrive by ``deadline`` (monotonic), read off the subscription's
        connection directly: ``get_message`` costs a dozen Python calls (retry wrapper,
        health check, a dict per message) for every message and again for the empty
        read that ends a batch, a follower's largest cost after the ring itself."""
        connection = pubsub.connection
        # Blocks in poll() until a message (or the wake-up channel's) or the deadline.
        if not connection.can_read(timeout=max(0.0, deadline - time.monotonic())):
            return []
        changes: list[GroupChange] | None = []
        channel = self._channel_bytes
        # Take what else arrived too (already buffered, mostly): the follower applies
        # it all at once.
        while True:
            reply = connection.read_response(disconnect_on_error=False, push_request=True)
            # [b"message", channel, data]; anything else (a PONG) carries no change.
            if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
                changes = collect(changes, {"channel": reply[1], "data": reply[2]}, channel)
            if not connection.can_read(timeout=0):
                return changes

    def _receive_sharded(self, pubsub: Any, deadline: float) -> list[GroupChange] | None:
        """As _receive(), through redis-py's cluster pub/sub (one connection per shard)."""
        changes: list[GroupChange] | None = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return changes
            message = pubsub.get_sharded_message(timeout=remaining)
            if message is not None and message["type"] == "smessage":
                # Take what else arrived too: the follower applies it all at once.
                while message is not None:
                    if message["type"] == "smessage":
                        changes = collect(changes, message, self._channel_bytes)
                    message = pubsub.get_sharded_message(timeout=0)
                return changes

    def wake(self) -> None:
        client: Any = self._backend.redis
        publish = client.spublish if self._sharded else client.publish
        # In an outage the follower's wait fails too, and it re-reads anyway.
        with contextlib.suppress(BackendUnavailable):
            self._backend.call(
                lambda: publish(self._wake_channel, b"wake"), what="wake a group follower"
            )

    def close(self) -> None:
        if self._pubsub is not None:
            self._pubsub.close()
            self._pubsub = None
