"""Fenced locks on Redis: one Lua script per step, waiters woken by pub/sub.

Keys of lock ``NAME`` (``%``, ``/``, ``{``, ``}`` percent-encoded) share one hash tag::

    dcoord:<ns>:lock:{NAME}            the holder's token, with the TTL (PX); random + who
                                       holds it (see dcoord.inspect)
    dcoord:<ns>:lock:{NAME}:fence      the last fence handed out (never expires)
    dcoord:<ns>:lock:{NAME}:released   pub/sub channel the release script publishes on
    dcoord:<ns>:lock:{NAME}:queue      fair locks: the waiters' tokens in arrival order
    dcoord:<ns>:lock:{NAME}:waiters    fair locks: each waiter's expiry (zset, server ms)
    dcoord:<ns>:lock:{NAME}:released:<tag>  fair locks: grants to one client's waiters

The fence of a resource ``R`` (:class:`dcoord.Fence`, same encoding) is
``dcoord:<ns>:fence:{R}``: a value written with ``Fence.write`` lands in the same script,
so on a Redis Cluster its key must carry the tag ``{R}`` too (``kv`` key ``{R}balance``).

Acquire is one script (SET NX PX, then the next fence; else the holder's PTTL as a wait
hint), release and extend compare the token first. A waiter wakes when a release is
published or when the holder's TTL ends, whichever comes first; every waiting handle of
a client shares one pub/sub connection and one reader thread (:class:`_Notifier`).

A fair lock (``fair=True``, after Redisson's fair lock) runs :data:`FAIR_ACQUIRE`
instead: a caller that finds the lock held, or another waiter ahead of it, joins the
queue; the lock goes to the queue's head. A waiter's entry expires unless it calls again
within :data:`FAIR_WAITER_TTL` (or the lock's TTL, if shorter), so a dead waiter blocks
the queue that long at most; a waiter that gives up leaves it (:data:`FAIR_CANCEL`).
The release hands the lock straight to the live head (fair_purge.lua ``hand_over``),
which learns it and its fence from a message on its client's own channel
(:func:`grant_channel`, :func:`fair_call`), with no acquire round trip. The grant is
provisional: it lasts the waiter's entry life (:func:`handed_ms`), counted by the waiter
from its last attempt the server answered "queued", until its first renewal extends it
to the TTL.

The release path is :attr:`RedisLocks.release_script`: a test may swap in a broken one
(say, a plain ``DEL``) to show that its checker catches the resulting double grants.

An acquire whose reply was lost may have run, or may still run: it is undone in the
background (:class:`_OrphanCleanup`) until that is sure. A release whose reply was lost
is retried, and a retry that finds nothing reports an unknown outcome rather than guess.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any

import redis
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException

from ...errors import BackendUnavailable, ClientClosed
from ...inspect import holder_suffix
from ...scheduler import JobResult, WorkerPool
from ..base import LockGrant, LockSlot, Renewed, key_segment
from .persistence import LockEvictionCheck
from .slots import require_one_slot
from .topology import Client

if TYPE_CHECKING:
    from . import RedisBackend

log = logging.getLogger("dcoord.redis")

# A waiter whose channel stayed quiet this long after its holder's TTL hint retries
# anyway; a holder with no TTL (not written by dcoord) is re-checked this often.
NO_HINT_WAIT = 1.0
# Channels nobody waits on stay subscribed this long, so a lock that is contended again
# soon costs no new SUBSCRIBE round trip.
IDLE_UNSUBSCRIBE = 5.0
# The undo of an acquire whose reply was lost is retried after this, doubling up to
# ORPHAN_RETRY_MAX: a grant that lands after an undo stands about that long at most.
ORPHAN_RETRY_FIRST = 0.05
ORPHAN_RETRY_MAX = 1.0
# Pub/sub messages that wake a channel's waiters: a release (or a shard channel's), a
# (re)subscription confirmation, and on a Cluster an sunsubscribe the server sends when
# the channel's slot moved to another node.
# How long a fair lock's waiter keeps its place without calling again (it calls every
# third of this): what a dead waiter at the head of the queue costs the others.
FAIR_WAITER_TTL = 5.0
WAKING_MESSAGES = frozenset({"message", "subscribe", "smessage", "ssubscribe", "sunsubscribe"})


def milliseconds(seconds: float) -> int:
    """A TTL for PX/PEXPIRE, rounded up: the server never lets go before the client
    believes it will."""
    return max(1, math.ceil(seconds * 1000))


def answered(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an error it was raised from) is an error reply of the server.

    Then the command ran to its end or not at all, on a connection that is still in
    order; any other failure (a timeout, a broken connection, an interrupt) leaves it
    unknown whether the command ran, or will still run.
    """
    while exc is not None:
        # redis-py files a LOADING reply (BusyLoadingError) under ConnectionError.
        if isinstance(exc, redis.ResponseError | redis.BusyLoadingError):
            return True
        exc = exc.__cause__
    return False


class LuaScript:
    """A Lua script run by EVALSHA; loaded into the server on its first NOSCRIPT.

    On a Redis Cluster it runs as :meth:`sharded`: its ``PUBLISH`` become ``SPUBLISH``.
    A plain PUBLISH there is broadcast to every node over the cluster bus; a shard
    channel goes only to the nodes of its slot, and every channel dcoord publishes on
    carries its keys' hash tag, so it is in the script's own slot (which Redis requires
    of a script's SPUBLISH).
    """

    def __init__(self, source: str) -> None:
        import hashlib

        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        self._sharded: LuaScript | None = None

    @classmethod
    def named(cls, name: str) -> LuaScript:
        """The script ``<name>.lua`` shipped beside this module."""
        return cls(resources.files(__package__).joinpath(f"{name}.lua").read_text())

    def sharded(self) -> LuaScript:
        """This script with ``SPUBLISH`` for every ``PUBLISH`` (calls and ACL checks)."""
        if self._sharded is None:
            sharded = LuaScript(self.source.replace("'PUBLISH'", "'SPUBLISH'"))
            sharded._sharded = sharded
            self._sharded = sharded
        return self._sharded

    def __call__(self, client: Client, keys: Sequence[str], args: Sequence[Any]) -> Any:
        if isinstance(client, RedisCluster):
            script = self.sharded()
            if script is not self:
                return script(client, keys, args)
        run: Any = (
            functools.partial(_execute, client)
            if isinstance(client, redis.Redis)
            else client.execute_command  # untyped in redis-py
        )
        try:
            return run("EVALSHA", self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            # First use on this server, or it restarted / ran SCRIPT FLUSH, or (on a
            # Cluster) a replica took over: redis-py sends SCRIPT LOAD to every primary.
            run("SCRIPT", "LOAD", self.source)
            return run("EVALSHA", self.sha, len(keys), *keys, *args)


def _execute(client: redis.Redis, *args: Any) -> Any:
    """``client.execute_command(*args)`` on a single server or Sentinel primary, minus
    redis-py's per-command bookkeeping (observability hooks, events, its retry loop,
    which dcoord turns off anyway): about 6 us of client CPU of a lock's ~45 us per
    command (docs/performance.md). The reply is raw, as for EVALSHA it is anyway.

    As redis-py does, a connection whose reply was not read (a timeout, a broken
    connection, an interrupt) is closed before the error is raised, never reused; an
    error reply leaves it in order. The connection class is redis-py's, so a Sentinel
    primary's READONLY still turns into a reconnect to the new primary.
    """
    pool: Any = client.connection_pool  # untyped in redis-py
    connection = pool.get_connection()
    try:
        connection.send_command(*args)
        return connection.read_response()
    except redis.ResponseError:
        raise
    except BaseException:
        connection.disconnect()
        raise
    finally:
        pool.release(connection)


def lock_keys(prefix: str, name: str) -> tuple[str, str, str]:
    """A lock's keys and channel, all tagged by its name (one slot): the holder's token,
    the fence counter and the release channel (shared by the sync and async APIs)."""
    base = f"{prefix}lock:{{{key_segment(name)}}}"
    return base, f"{base}:fence", f"{base}:released"


def fair_keys(lock_key: str) -> tuple[str, str]:
    """A fair lock's queue (tokens in arrival order) and waiters' expiries (a zset)."""
    return f"{lock_key}:queue", f"{lock_key}:waiters"


def fence_key(prefix: str, resource: str) -> str:
    """The highest token admitted for ``resource``: ``dcoord:<ns>:fence:{RESOURCE}``,
    tagged by the resource so that values written with it can share its slot."""
    return f"{prefix}fence:{{{key_segment(resource)}}}"


def _joined(*names: str) -> LuaScript:
    """One script of the files ``names``, in order (a prefix defines what later ones use)."""
    return LuaScript("".join(LuaScript.named(name).source for name in names))


ACQUIRE = _joined("lock_fence", "acquire")
RELEASE = LuaScript.named("release")
EXTEND = LuaScript.named("extend")
# The queue half falls through to the plain acquire when it is our turn: one script,
# one round trip, and the fence logic lives in lock_fence.lua only.
FAIR_ACQUIRE = _joined("lock_fence", "fair_purge", "fair_queue", "acquire")
FAIR_RELEASE = _joined("lock_fence", "fair_purge", "fair_release")
FAIR_CANCEL = _joined("lock_fence", "fair_purge", "fair_cancel")
# What a fair script publishes to call the waiter whose token follows (an older
# client's waiter, which acquires when called), and to tell a waiter it was granted
# the lock ("granted:<fence>:<token>").
CALL_PREFIX = b"next:"
GRANT_PREFIX = b"granted:"


def fair_token(ms: int, tag: str, holder: str) -> str:
    """A new token for a fair waiter: random, then ``~<ms>~<client tag>``, by which a
    release that hands it the lock knows it takes grants, for how long (:func:`handed_ms`)
    and on which channel (:func:`grant_channel`) to tell it, then the ``holder`` suffix
    (:func:`dcoord.inspect.holder_suffix`)."""
    return f"{secrets.token_hex(16)}~{ms}~{tag}{holder}"


def handed_ms(fair: bool, auto_renew: bool, waiter_ms: int) -> int:
    """How long (ms) a release hands the lock to a waiter of a slot, which its token says
    (:func:`fair_token`); 0: not handed, called to acquire it itself.

    A provisional grant, as long as the waiter's queue entry lives (``waiter_ms``): one
    that died while queued then holds the others up no longer than its entry would
    have, where its TTL could be far longer; a live one's first renewal extends it to its
    TTL. A waiter without auto-renewal could not extend it: it acquires itself.
    """
    return waiter_ms if fair and auto_renew else 0


def waited_grant(sent: float, ttl: float, queued: float, handed_ms: int) -> float:
    """The deadline of the grant a waiter's try sent at ``sent`` got, its previous try
    (sent at ``queued``) having queued it: its own acquire's TTL from ``sent``, unless
    (a fair waiter taking hand-overs) the lock was handed to it, by a release that ran
    after ``queued``, for ``handed_ms``; the try cannot tell which, so the earlier."""
    if not handed_ms:
        return sent + ttl
    return min(sent + ttl, queued + handed_ms / 1000)


def grant_channel(channel: str, tag: str) -> str:
    """Where the fair waiters of the client tagged ``tag`` hear of grants handed to them
    on the lock of release channel ``channel``: their client alone wakes for them."""
    return f"{channel}:{tag}"


def fair_call(data: bytes) -> tuple[bytes, int] | None:
    """The fair waiter a pub/sub message calls and the fence it was granted (0: called
    to acquire it itself), or None for another message (a release for all)."""
    if data.startswith(GRANT_PREFIX):
        fence, _, token = data[len(GRANT_PREFIX) :].partition(b":")
        return token, int(fence)
    if data.startswith(CALL_PREFIX):
        return data[len(CALL_PREFIX) :], 0
    return None


FENCE_ADMIT = LuaScript.named("fence_admit")


class RedisLocks:
    """The lock store of one Redis backend."""

    release_script = RELEASE

    def __init__(self, backend: RedisBackend) -> None:
        self.backend = backend
        self.redis = backend.redis
        self.prefix = backend.prefix
        self.scheduler = backend.scheduler
        # Cleanups wait for the network; on a thread of their own they never delay the
        # scheduler's other jobs (lock deadlines, heart-beats).
        self.cleanups = WorkerPool("dcoord-redis-lock-cleanup", 1)
        self.cluster = backend.settings.topology == "cluster"
        self.skew_margin_us = round(float(backend.settings.options["fence_skew_margin"]) * 1e6)
        self.notifier = _Notifier(backend)
        # Names this client's grants channels (grant_channel): a fair waiter's token
        # carries it, so a release tells this client alone.
        self.tag = secrets.token_hex(4)
        self._check_eviction = LockEvictionCheck(backend)
        # On a Cluster, one batch per node (by name, as redis-py's slot map calls it): a
        # pipeline to several nodes would wait for the slowest, so the locks of a node
        # that hangs would delay (and could lose) the renewals of every other node's.
        self.renewals = None if self.cluster else _Renewals(self)
        self._node_renewals: dict[str, _Renewals] = {}

    def renewals_for(self, key: str) -> _Renewals | None:
        """The renewal batch of the lock at ``key``: on a Cluster that of the primary
        that serves its slot now (None, renewed alone, while no node does)."""
        if self.renewals is not None:
            return self.renewals
        cluster: Any = self.redis  # RedisCluster, untyped in redis-py
        try:
            name: str = cluster.get_node_from_key(key).name
        except RedisClusterException:  # no node for the slot (mid-failover)
            return None
        batch = self._node_renewals.get(name)
        if batch is None:  # setdefault: threads that race here share one batch
            batch = self._node_renewals.setdefault(name, _Renewals(self, name))
        return batch

    def slot(self, name: str, ttl: float, auto_renew: bool, fair: bool = False) -> RedisLockSlot:
        self._check_eviction()  # an evicted lock is a lock held twice: warn at the first
        return RedisLockSlot(self, name, ttl, fair, auto_renew)

    def fence_key(self, resource: str) -> str:
        return fence_key(self.prefix, resource)

    def admit(self, resource: str, token: int) -> bool:
        key = self.fence_key(resource)
        # Re-admitting the same token is harmless, so a retry after a lost reply is safe.
        return bool(
            self.backend.call(
                lambda: FENCE_ADMIT(self.redis, [key], [str(token)]),
                what=f"admit fence {token} for {resource!r}",
                retry=True,
            )
        )

    def write(self, resource: str, token: int, key: str, value: bytes) -> bool:
        fence_key = self.fence_key(resource)
        value_key = f"{self.prefix}kv:{key}"
        if self.cluster:
            require_one_slot(
                [fence_key, value_key],
                f"fenced write of {key!r} for {resource!r} (tag the key "
                f"'{{{key_segment(resource)}}}...' to put it in the fence's slot)",
            )
        # Never retried: after a lost reply a newer holder may have written, and a retry
        # would then answer "rejected" for a write that happened (the caller gets
        # BackendUnavailable instead: outcome unknown).
        return bool(
            self.backend.call(
                lambda: FENCE_ADMIT(self.redis, [fence_key, value_key], [str(token), value]),
                what=f"fenced write of {key!r} with fence {token} for {resource!r}",
            )
        )

    def highest(self, resource: str) -> int | None:
        key = self.fence_key(resource)
        value = self.backend.call(
            lambda: self.redis.get(key), what=f"read fence of {resource!r}", retry=True
        )
        return None if value is None else int(value)

    def close(self) -> None:
        self.cleanups.close()
        self.notifier.close()


class _OrphanCleanup:
    """Deletes the grant of an acquire whose reply was lost, retrying in the background.

    The acquire may have run, may never run, or may still run: queued on a paused
    server, or in flight on the broken connection. redis-py closes a connection on such
    an error before raising it, so every undo goes out on another connection, and one
    undo could reach the server before the acquire. The undo (a token-compared delete,
    harmless if repeated) is therefore repeated, at growing intervals of at most
    ORPHAN_RETRY_MAX, until it deletes the grant or until an undo sent once the TTL has
    passed since the acquire was sent finds nothing: an acquire that reached the server
    before that undo has been deleted or has expired by then. Only an acquire delayed
    by more than its TTL on its dead connection can still land later (and stand for at
    most its TTL). Nothing is retried once the client closes.
    """

    def __init__(self, slot: RedisLockSlot, token: str, sent: float, ttl: float) -> None:
        self._locks = slot._locks
        self._slot = slot
        self._token = token
        self._sure_after = sent + ttl
        self._delay = ORPHAN_RETRY_FIRST

    def start(self) -> None:
        self._locks.cleanups.submit(self._attempt)

    def _again(self) -> JobResult:
        self.start()
        return False  # one attempt per job: the attempt decides whether to come back

    def _attempt(self) -> None:
        locks, slot = self._locks, self._slot
        started = time.monotonic()
        try:
            deleted = locks.backend.call(
                lambda: slot.undo(self._token),
                what=f"undo the acquire of lock {slot.name!r} whose reply was lost",
            )
        except BackendUnavailable as exc:
            log.info("%s; retrying", exc)
        except Exception as exc:  # refused (permissions, ...): retrying cannot help
            log.warning("%r; the grant, if the acquire ran, expires by its TTL", exc)
            return
        else:
            if deleted or started >= self._sure_after:
                return
        delay, self._delay = self._delay, min(ORPHAN_RETRY_MAX, self._delay * 2)
        try:
            locks.scheduler.every(delay, self._again, name="redis lock orphan cleanup")
        except ClientClosed:  # the scheduler is closed: the client is closing
            log.info("lock %r: orphan cleanup stopped by close", slot.name)


class _Renewals:
    """The renewals of this store's lock slots, many in one round trip
    (:class:`~dcoord.backends.base.RenewalBatch`): one pipeline of EXTEND scripts, each
    still compare-and-act on its own token, so what each lock's answer means is what it
    means for a lock renewed alone (0: this slot's grant is gone).

    On a Redis Cluster there is one per primary, ``node`` (its name in redis-py's slot
    map, which :meth:`RedisLocks.renewals_for` asks): the pipeline goes to that node. A
    lock whose slot has moved since (a resharding, a failover) gets a MOVED or ASK reply
    in its place and is renewed alone through redis-py's cluster client, which follows
    the redirection; a node that cannot be reached fails its batch, as a single server
    does (each lock retries), after redis-py re-reads the slot map.
    """

    def __init__(self, locks: RedisLocks, node: str | None = None) -> None:
        self._locks = locks
        self._node = node
        self._script = EXTEND.sharded() if node is not None else EXTEND
        self._where = "" if node is None else f" to node {node}"

    def extend_many(self, requests: Sequence[tuple[LockSlot, float]]) -> list[Renewed]:
        assert all(isinstance(slot, RedisLockSlot) for slot, _ in requests)  # ours only
        commands, sent_for = extend_commands(requests, self._script.sha)
        if not commands:
            return [None] * len(requests)
        backend = self._locks.backend
        sent = time.monotonic()
        replies = backend.call(
            lambda: self._send(commands),
            what=f"extend {len(commands)} locks in one pipeline{self._where}",
        )
        answers, moved = extend_answers(requests, sent_for, replies, sent, backend._error)
        for i in moved:
            slot, ttl = requests[i]
            assert isinstance(slot, RedisLockSlot)
            answers[i] = _extend_alone(slot, ttl)
        return answers

    def _client(self) -> redis.Redis:
        """The server to send to: the one server, or this batch's Cluster node."""
        client: Any = self._locks.redis  # RedisCluster is untyped in redis-py
        if self._node is not None:
            node = client.get_node(node_name=self._node)
            if node is None:  # gone from the map: the next renewals join another batch
                raise redis.ConnectionError(f"node {self._node} left the Cluster's slot map")
            client = client.get_redis_connection(node)
        server: redis.Redis = client
        return server

    def _send(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """The replies to ``commands`` (an error reply in its command's place); the
        script is loaded and its commands sent once more if the server did not have it."""
        client = self._client()
        try:
            replies = _pipeline(client, commands)
        except (redis.ConnectionError, redis.TimeoutError):
            if self._node is not None:
                self._refresh_slot_map()
            raise
        again = unloaded(replies)
        if again:  # first use on this server, or it restarted / ran SCRIPT FLUSH, or
            # (Cluster) a replica took over: a script is loaded on the node it ran on
            _execute(client, "SCRIPT", "LOAD", self._script.source)
            for i, reply in zip(
                again, _pipeline(client, [commands[i] for i in again]), strict=True
            ):
                replies[i] = reply
        return replies

    def _refresh_slot_map(self) -> None:
        """Have redis-py re-read the Cluster's slot map, as its own command path does
        when a node's connection breaks: after a failover the replica that took over
        this node's slots serves them, and the retries must go there."""
        cluster: Any = self._locks.redis
        try:
            cluster.nodes_manager.initialize(last_failed_node_name=self._node)
        except (redis.RedisError, RedisClusterException) as exc:  # the retries try again
            log.info("re-reading the slot map after node %s failed: %s", self._node, exc)


def extend_commands(
    requests: Sequence[tuple[Any, float]], sha: str
) -> tuple[list[tuple[Any, ...]], list[int]]:
    """The EXTEND (EVALSHA ``sha``) of each held ``(slot, ttl)`` of a renewal batch (sync
    or async slots: their ``key`` and ``_token``), and the request index of each command.
    A slot released meanwhile is not sent: its answer is None, as its extend()'s."""
    commands: list[tuple[Any, ...]] = []
    sent_for: list[int] = []
    for i, (slot, ttl) in enumerate(requests):
        token = slot._token
        if token is not None:
            commands.append(("EVALSHA", sha, 1, slot.key, token, milliseconds(ttl)))
            sent_for.append(i)
    return commands, sent_for


def extend_answers(
    requests: Sequence[tuple[Any, float]],
    sent_for: Sequence[int],
    replies: Sequence[Any],
    sent: float,
    error: Callable[[str, redis.RedisError], Exception],
) -> tuple[list[Renewed], list[int]]:
    """Each request's answer from its EXTEND's reply in a batch sent at ``sent``
    (:func:`extend_commands`): renewed (a grant for its TTL), lost (0, or not sent:
    None), or ``error(what, reply)`` for an error reply, which fails that lock alone.
    Also the requests answered MOVED or ASK: their slot moved to another Cluster node,
    and the caller renews each alone through the cluster client, which follows the
    redirection (their answer here is None until then). NOSCRIPT is the sender's to
    resolve first (:func:`unloaded`)."""
    answers: list[Renewed] = [None] * len(requests)
    moved: list[int] = []
    for i, reply in zip(sent_for, replies, strict=True):
        slot, ttl = requests[i]
        if isinstance(reply, redis.exceptions.AskError):  # MOVED is an AskError too
            moved.append(i)
        elif isinstance(reply, redis.RedisError):
            answers[i] = error(f"extend lock {slot.name!r}", reply)
        elif reply:
            answers[i] = LockGrant(slot._fence, sent + ttl)
    return answers, moved


def unloaded(replies: Sequence[Any]) -> list[int]:
    """The indexes of the NOSCRIPT replies of a pipeline: the server lacked the script
    (first use, a restart or SCRIPT FLUSH, a replica that took over), so the sender
    loads it there and sends those commands again."""
    return [
        i for i, reply in enumerate(replies) if isinstance(reply, redis.exceptions.NoScriptError)
    ]


def _extend_alone(slot: RedisLockSlot, ttl: float) -> Renewed:
    """``slot.extend(ttl)`` as an answer of a batch: its error in its place."""
    try:
        return slot.extend(ttl)
    except Exception as exc:
        return exc


def _pipeline(client: redis.Redis, commands: list[tuple[Any, ...]]) -> list[Any]:
    """Send ``commands`` in one write and read their replies, an error reply in its
    command's place (as :func:`_execute`: raw replies, and a connection whose replies
    were not all read is closed, never reused)."""
    pool: Any = client.connection_pool  # untyped in redis-py
    connection = pool.get_connection()
    try:
        connection.send_packed_command(connection.pack_commands(commands))
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(connection.read_response())
            except redis.ResponseError as exc:  # this command's alone; the rest follow
                replies.append(exc)
        return replies
    except BaseException:
        connection.disconnect()
        raise
    finally:
        pool.release(connection)


class RedisLockSlot:
    """One handle's token on one lock."""

    def __init__(
        self, locks: RedisLocks, name: str, ttl: float, fair: bool = False, auto_renew: bool = True
    ) -> None:
        self._locks = locks
        self._call = locks.backend.call
        self._redis = locks.redis
        self.name = name
        self.key, self.fence_key, self.channel = lock_keys(locks.prefix, name)
        self._ttl = ttl
        self._token: str | None = None
        self._fence = 0
        self._fair = fair
        waiter_ttl = min(FAIR_WAITER_TTL, ttl)
        self._waiter_ms = milliseconds(waiter_ttl)
        self._handed_ms = handed_ms(fair, auto_renew, self._waiter_ms)
        # A fair waiter calls again within a third of its entry's life, however long the
        # holder's TTL: its place in the queue must not expire while it lives.
        self._max_wait = waiter_ttl / 3 if fair else math.inf
        if fair:
            self._keys = [self.key, self.fence_key, *fair_keys(self.key)]
        else:
            self._keys = [self.key, self.fence_key]

    def undo(self, token: str) -> Any:
        """Let go of ``token``'s grant (and, fair, its place in the queue); 1 if it held
        the lock (no retries: see :class:`_OrphanCleanup`)."""
        if self._fair:
            args = [token, self.channel, self._locks.skew_margin_us]
            return FAIR_CANCEL(self._redis, self._keys, args)
        return self._locks.release_script(self._redis, [self.key], [token, self.channel])

    def acquire(self, deadline: float | None) -> LockGrant | None:
        # A new token per grant: an old one can never act. Its suffix names the holder
        # (inspection).
        holder = holder_suffix(self._locks.backend.settings.options["label"])
        if self._handed_ms:
            token = fair_token(self._handed_ms, self._locks.tag, holder)
        else:
            token = secrets.token_hex(16) + holder
        # A single attempt (deadline already past) never queues: nothing to leave after.
        once = deadline is not None and time.monotonic() >= deadline
        result, sent = self._try(token, queue=not once)
        if result <= 0 and deadline is not None and time.monotonic() >= deadline:
            if self._fair and not once:
                self._leave(token)
            return None
        if result <= 0:
            try:
                result, expires_at = self._wait(token, deadline, sent)
            except BaseException:
                if self._fair:  # a waiter that gives up leaves the queue behind it
                    _OrphanCleanup(self, token, time.monotonic(), self._ttl).start()
                raise
            if result <= 0:
                if self._fair:
                    self._leave(token)
                return None
        else:
            expires_at = sent + self._ttl
        self._token, self._fence = token, result
        return LockGrant(result, expires_at)

    def _try(self, token: str, queue: bool = True) -> tuple[int, float]:
        sent = time.monotonic()
        args: list[Any] = [token, milliseconds(self._ttl), self._locks.skew_margin_us]
        script = ACQUIRE
        if self._fair:
            script = FAIR_ACQUIRE
            args += [self.channel, self._waiter_ms if queue else 0]
        try:
            result = self._call(
                lambda: script(self._redis, self._keys, args),
                what=f"acquire lock {self.name!r}",
            )
        except BaseException as exc:
            # An error reply: the script was refused (BUSY, READONLY, NOPERM, ...) or
            # failed at its first write (out of memory: Redis never refuses a later one),
            # so there is nothing to undo. Otherwise it may have run, or may run yet: undo
            # it if so, rather than leave an orphan grant until its TTL.
            if not answered(exc):
                _OrphanCleanup(self, token, sent, self._ttl).start()
            raise
        return int(result), sent

    def _wait(self, token: str, deadline: float | None, queued: float) -> tuple[int, float]:
        """Wait for the lock after the try sent at ``queued`` found it taken: its fence
        (0: not by ``deadline``) and the grant's deadline (:func:`waited_grant`)."""
        # A fair waiter sleeps until granted or called by name (or a generic wake-up).
        called = token.encode() if self._fair else None
        grants = grant_channel(self.channel, self._locks.tag) if self._handed_ms else None
        with self._locks.notifier.interest(self.channel, called, grants) as channel:
            while True:
                # Read the generation (and take a call) before trying: a release
                # published after the try then changes it, so the wait below cannot
                # miss it.
                seen = channel.generation
                if called is not None:
                    fence = channel.called.pop(called, 0)
                    if fence:
                        return fence, queued + self._handed_ms / 1000
                result, sent = self._try(token)
                if result > 0:
                    return result, waited_grant(sent, self._ttl, queued, self._handed_ms)
                queued = sent
                hint = min(-result / 1000 + 0.001 if result < 0 else NO_HINT_WAIT, self._max_wait)
                now = time.monotonic()
                if deadline is not None:
                    if now >= deadline:
                        return 0, sent
                    hint = min(hint, deadline - now)
                self._locks.notifier.wait(channel, seen, hint, called)

    def _leave(self, token: str) -> None:
        """Take a fair waiter that timed out out of the queue; if that fails, the
        background undo keeps trying (its entry would expire anyway)."""
        sent = time.monotonic()
        try:
            self._call(lambda: self.undo(token), what=f"leave the queue of lock {self.name!r}")
        except BackendUnavailable as exc:
            log.info("%s; retrying in the background", exc)
            _OrphanCleanup(self, token, sent, self._ttl).start()

    def release(self) -> bool:
        token, self._token = self._token, None
        if token is None:
            return False
        reply_lost = False

        def release() -> Any:
            nonlocal reply_lost
            try:
                if self._fair:
                    args = [token, self.channel, self._locks.skew_margin_us]
                    return FAIR_RELEASE(self._redis, self._keys, args)
                return self._locks.release_script(self._redis, [self.key], [token, self.channel])
            except BaseException as exc:
                reply_lost = reply_lost or not answered(exc)
                raise

        what = f"release lock {self.name!r}"
        released = self._call(release, what=what, retry=True)
        if not released and reply_lost:
            # Released by the attempt whose reply was lost, or gone before it (expired,
            # taken over: a lost lock): the two cannot be told apart.
            raise BackendUnavailable(
                f"{what}: the outcome is unknown: an attempt's reply was lost and the retry "
                "found the lock gone (released by that attempt, or lost before it)"
            )
        return bool(released)

    def renewal_batch(self) -> _Renewals | None:
        """The batch this slot's renewals join (on a Cluster: its slot's node's)."""
        return self._locks.renewals_for(self.key)

    def extend(self, ttl: float) -> LockGrant | None:
        token = self._token
        if token is None:
            return None
        sent = time.monotonic()
        ms = milliseconds(ttl)
        extended = self._call(
            lambda: EXTEND(self._redis, [self.key], [token, ms]),
            what=f"extend lock {self.name!r}",
        )
        return LockGrant(self._fence, sent + ttl) if extended else None


class _Channel:
    """Waiters of one lock in this client; ``generation`` counts wake-ups for all, and
    ``called`` holds the tokens of fair waiters called by name, each with the fence a
    release handed it (0: called to acquire itself, see :func:`fair_call`)."""

    __slots__ = ("called", "generation", "idle_since", "name", "subscribed", "tokens", "waiters")

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.subscribed: set[bytes] = set()  # its names (the lock's, a grants channel)
        self.generation = 0
        self.waiters = 0
        self.idle_since = 0.0
        self.tokens: set[bytes] = set()  # fair waiters of this client
        self.called: dict[bytes, int] = {}


class _Notifier:
    """One pub/sub connection and reader thread per client, shared by every waiter.

    A release message, a (re)subscription confirmation and a reconnect each bump the
    channel's generation; waiters sleep until it changes or their TTL hint runs out.
    Sharing costs one SUBSCRIBE per newly contended lock instead of a connection (and a
    connect handshake) per waiter.

    On a Redis Cluster the channels are shard channels (SSUBSCRIBE; the scripts
    SPUBLISH, see :class:`LuaScript`) through redis-py's cluster pub/sub, which keeps one
    connection per primary that serves a subscribed channel and moves subscriptions
    after a failover. Each of those connections gets a reader thread of its own, so a
    message never waits behind another node's read timeout.
    """

    def __init__(self, backend: RedisBackend) -> None:
        self._backend = backend
        self._cond = threading.Condition()
        self._send = threading.Lock()
        self._channels: dict[bytes, _Channel] = {}
        self._pubsub: Any = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._sharded = backend.settings.topology == "cluster"
        self._subscribe, self._unsubscribe = (
            ("ssubscribe", "sunsubscribe") if self._sharded else ("subscribe", "unsubscribe")
        )
        # Cluster only: a reader thread per node name, and what wakes the thread that
        # starts them when a subscription may have added a node.
        self._readers: dict[str, threading.Thread] = {}
        self._nodes_changed = threading.Event()

    @contextlib.contextmanager
    def interest(
        self, channel_name: str, token: bytes | None = None, grants: str | None = None
    ) -> Iterator[_Channel]:
        """Register a waiter on ``channel_name`` (subscribing if it is new); a fair
        waiter gives its ``token``, by which a release calls it, and its client's
        ``grants`` channel (:func:`grant_channel`), whose messages reach the same
        waiters."""
        key = channel_name.encode()
        with self._cond:
            channel = self._channels.get(key)
            if channel is None:
                channel = self._channels[key] = _Channel(key)
            # Both names lead to one _Channel, so they are idle (and pruned) together.
            names = [key] if grants is None else [key, grants.encode()]
            new = [name for name in names if name not in channel.subscribed]
            for name in new:
                self._channels[name] = channel
            channel.subscribed.update(new)
            channel.waiters += 1
            if token is not None:
                channel.tokens.add(token)
            if self._thread is None and not self._closed:
                redis_client: Any = self._backend.redis
                self._pubsub = redis_client.pubsub()
                self._thread = threading.Thread(
                    target=self._supervise if self._sharded else self._run_single,
                    name="dcoord-redis-lock-notifier",
                    daemon=True,
                )
                start = True
            else:
                start = False
        try:
            if new:
                self._command(self._subscribe, *new)
                self._nodes_changed.set()
            if start:
                assert self._thread is not None
                self._thread.start()
            yield channel
        finally:
            with self._cond:
                channel.waiters -= 1
                channel.idle_since = time.monotonic()
                if token is not None:
                    channel.tokens.discard(token)
                    channel.called.pop(token, None)

    def wait(
        self, channel: _Channel, seen: int, timeout: float, token: bytes | None = None
    ) -> None:
        """Sleep until ``channel`` is woken after generation ``seen`` (or ``token`` is
        called), or ``timeout``."""
        with self._cond:
            self._cond.wait_for(
                lambda: channel.generation != seen or token in channel.called or self._closed,
                timeout,
            )

    def _command(self, command: str, *channels: bytes) -> None:
        try:
            with self._send:
                if self._pubsub is not None and not self._closed:
                    getattr(self._pubsub, command)(*channels)
        except (redis.RedisError, OSError) as exc:
            # Waiters still wake by their TTL hint; the reader reconnects.
            log.info("lock notifier: %s failed: %s", command, exc)

    def _run_single(self) -> None:
        last_prune = time.monotonic()

        def read() -> Any:
            nonlocal last_prune
            now = time.monotonic()
            if now - last_prune >= 1.0:
                last_prune = now
                self._prune(now)
            return self._pubsub.get_message(timeout=1.0)

        self._read(read, lambda: True)

    def _supervise(self) -> None:
        """Cluster: start a reader per node connection of the cluster pub/sub (new ones
        appear when a channel of another node is subscribed, or when redis-py moves the
        subscriptions after a failover), and unsubscribe idle channels."""
        cluster: Any = self._backend.redis
        while True:
            with self._cond:
                if self._closed:
                    return
            # list() of a dict is one step under the GIL: no concurrent-change error.
            for name in list(self._pubsub.node_pubsub_mapping):
                reader = self._readers.get(name)
                if (reader is None or not reader.is_alive()) and cluster.get_node(node_name=name):
                    reader = threading.Thread(
                        target=self._run_node,
                        args=(name,),
                        name=f"dcoord-redis-lock-notifier-{name}",
                        daemon=True,
                    )
                    self._readers[name] = reader
                    reader.start()
            self._prune(time.monotonic())
            self._nodes_changed.wait(1.0)
            self._nodes_changed.clear()

    def _run_node(self, name: str) -> None:
        cluster: Any = self._backend.redis
        pubsub = self._pubsub

        def read() -> Any:
            node = cluster.get_node(node_name=name)
            if node is None:  # without a target it would read every node's connection
                return None
            return pubsub.get_sharded_message(timeout=1.0, target_node=node)

        # A node that left the cluster's map, or whose connection redis-py dropped
        # (no channel left on it), needs no reader.
        self._read(
            read,
            lambda: (
                name in pubsub.node_pubsub_mapping and cluster.get_node(node_name=name) is not None
            ),
        )

    def _read(self, read: Callable[[], Any], wanted: Callable[[], bool]) -> None:
        """Deliver what ``read`` returns to the waiters until close (or not ``wanted``)."""
        backoff = 0.05
        while True:
            with self._cond:
                if self._closed:
                    return
            if not wanted():
                return
            try:
                message = read()
                backoff = 0.05
            except Exception as exc:  # the connection broke (or was closed by close())
                with self._cond:
                    if self._closed:
                        return
                    # Messages may have been lost: every waiter re-tries now.
                    for channel in self._channels.values():
                        channel.generation += 1
                    self._cond.notify_all()
                log.info("lock notifier reconnecting after: %s", exc)
                time.sleep(backoff)
                backoff = min(1.0, backoff * 2)
                continue
            if message is not None and message["type"] in WAKING_MESSAGES:
                with self._cond:
                    woken = self._channels.get(message["channel"])
                    if woken is not None:
                        data = message["data"]
                        call = fair_call(data) if isinstance(data, bytes) else None
                        if call is not None:
                            # One fair waiter's turn: the others sleep on (no herd).
                            called, fence = call
                            if called not in woken.tokens:
                                continue
                            woken.called[called] = fence
                        else:
                            woken.generation += 1
                        self._cond.notify_all()

    def _prune(self, now: float) -> None:
        # Holding _send from the removal until the UNSUBSCRIBE is sent keeps a waiter that
        # re-creates the channel meanwhile from subscribing before we unsubscribe.
        with self._send:
            with self._cond:
                idle = [
                    name
                    for name, channel in self._channels.items()
                    if channel.waiters == 0 and now - channel.idle_since >= IDLE_UNSUBSCRIBE
                ]
                for name in idle:
                    del self._channels[name]
            if idle and self._pubsub is not None and not self._closed:
                try:
                    getattr(self._pubsub, self._unsubscribe)(*idle)
                except (redis.RedisError, OSError) as exc:
                    log.info("lock notifier: unsubscribe failed: %s", exc)

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            threads = [self._thread, *self._readers.values()]
        self._nodes_changed.set()
        with self._send:
            if self._pubsub is not None:
                with contextlib.suppress(Exception):
                    self._pubsub.close()
        for thread in threads:
            # A waiter makes the thread under _cond but starts it after subscribing: a
            # close in between finds it unstarted (it returns at once when started).
            if thread is None or thread.ident is None or thread is threading.current_thread():
                continue
            thread.join(timeout=5)
