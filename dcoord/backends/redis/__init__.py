"""The Redis 7 backend: one redis-py client (with hiredis), keys under ``dcoord:<namespace>:``.

Atomic steps are Lua scripts kept as ``.lua`` files beside this module. redis-py's own
retry is turned off: a repeated write is not always harmless, so every retry is decided
here, per operation (see :meth:`RedisBackend.call`).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import TypeVar

import redis
from redis.exceptions import RedisClusterException, SlotNotCoveredError

from ... import metrics
from ...config import Settings
from ...errors import BackendError, BackendUnavailable, ConfigError, DcoordError, PermissionDenied
from ...scheduler import Scheduler
from ..base import ServerInfo, certificate_error, with_retries
from . import topology
from .election import RedisElections
from .kv import RedisKV
from .locks import RedisLocks
from .membership import RedisGroups
from .replication import Replication
from .rwlock import RedisRWLocks
from .semaphore import RedisSemaphores
from .txlog import RedisTxLog

T = TypeVar("T")

# Error replies after which the server may answer later: loading its data, busy running a
# script, a replica (read-only, or its master down) during a failover, a primary short of
# the replicas its min-replicas-to-write asks for (they reconnect, or a failover replaces
# it), a cluster moving slots or without quorum. OOM is not among them: memory rarely
# frees itself in seconds.
TRANSIENT_REPLIES = frozenset(
    {"LOADING", "BUSY", "READONLY", "MASTERDOWN", "NOREPLICAS", "TRYAGAIN", "CLUSTERDOWN"}
)
# Redis 7.0 reports an ACL denial inside a script as a plain ERR with this text.
SCRIPT_DENIED = "The user executing the script can't"
# redis-py makes these ConnectionErrors, but retrying cannot fix the credentials.
CREDENTIALS = (redis.AuthenticationError, redis.exceptions.AuthorizationError)
# What a redis-py client raises: RedisCluster raises RedisClusterException (not a
# RedisError) for what it decides itself: a slot no node serves, no startup node
# reachable (the cause chained), keys of one command in several slots.
ClientError = redis.RedisError | RedisClusterException


def reply_text(exc: redis.RedisError) -> str:
    """The server's error reply as Redis sent it (redis-py strips the code of the
    replies it knows into ``status_code``)."""
    return f"{exc.status_code} {exc}" if exc.status_code else str(exc)


def reply_code(exc: redis.RedisError) -> str:
    """The code an error reply starts with (``NOPERM``, ``BUSY``, ``ERR`` ...)."""
    return reply_text(exc).split(" ", 1)[0]


def certificate_problem(exc: BaseException) -> str | None:
    """What is wrong with a TLS certificate behind ``exc`` (redis-py raises a
    ConnectionError while handling the ssl error), or None if it is not that."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen.verify_message or str(seen)
        # The server refused ours: an alert such as TLSV13_ALERT_CERTIFICATE_REQUIRED,
        # SSLV3_ALERT_BAD_CERTIFICATE or TLSV1_ALERT_UNKNOWN_CA.
        if isinstance(seen, ssl.SSLError) and any(
            word in (seen.reason or "") for word in ("CERTIFICATE", "UNKNOWN_CA")
        ):
            return f"the server refused the client certificate ({seen.reason})"
        seen = seen.__cause__ or seen.__context__
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether the request may succeed if sent again: the network, or a reply that says
    "later" (see TRANSIENT_REPLIES), or a Cluster that has no node for a slot yet (a
    failover) or could reach none of its nodes."""
    if isinstance(exc, CREDENTIALS) or certificate_problem(exc) is not None:
        return False
    if isinstance(exc, SlotNotCoveredError):
        return True
    if isinstance(exc, RedisClusterException):
        return exc.__cause__ is not None and is_transient(exc.__cause__)
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return True
    return isinstance(exc, redis.ResponseError) and reply_code(exc) in TRANSIENT_REPLIES


class RedisBackend:
    kind = "redis"

    def __init__(self, settings: Settings, scheduler: Scheduler) -> None:
        self.settings = settings
        self.scheduler = scheduler
        self.endpoint = topology.endpoint(settings)
        self.prefix = f"dcoord:{settings.namespace}:"
        self.replication = Replication(self)  # forced writes: WAIT for min_replicas
        what = f"connect to redis at {self.endpoint}"
        # A Cluster client reads the slot map as it is made: that is connecting.
        self.redis = self.call(
            lambda: topology.make_client(settings),
            what=what,
            retry=True,
            timeout=settings.connect_timeout,
        )
        self.kv = RedisKV(self, self.prefix)
        self.groups = RedisGroups(self, self.prefix)
        self.elections = RedisElections(self)  # its waiters use locks.notifier, made next
        self.locks = RedisLocks(self)
        self.semaphores = RedisSemaphores(self)
        self.rwlocks = RedisRWLocks(self)
        self.txlog = RedisTxLog(self, self.prefix)
        try:
            self.info = self.call(
                self._server_info,
                what=what,
                retry=True,
                timeout=settings.connect_timeout,
            )
        except BaseException:
            self.redis.close()
            raise

    def _server_info(self) -> ServerInfo:
        info = self.redis.info("server")
        return ServerInfo(
            kind=self.kind,
            version=str(info.get("redis_version", "unknown")),
            endpoint=self.endpoint,
        )

    def call(
        self, fn: Callable[[], T], *, what: str, retry: bool = False, timeout: float | None = None
    ) -> T:
        """Run ``fn`` with redis errors mapped to dcoord errors, once, here.

        ``retry=True`` retries transient failures for up to ``timeout`` (default: the
        request timeout); pass it only for operations that are safe to repeat. A dcoord
        error raised inside ``fn`` (a nested call) passes through unchanged.
        """
        try:
            if retry:
                return with_retries(
                    fn,
                    what=what,
                    transient=is_transient,
                    timeout=timeout or self.settings.request_timeout,
                )
            return fn()
        except (redis.RedisError, RedisClusterException) as exc:
            error = self._error(what, exc)
            metrics.backend_error(self.settings, type(error))
            raise error from exc
        except BackendUnavailable as exc:
            # the retries gave up
            if retry and isinstance(exc.__cause__, redis.RedisError | RedisClusterException):
                metrics.backend_error(self.settings, BackendUnavailable)
            raise

    def _error(self, what: str, exc: ClientError) -> DcoordError:
        """The dcoord error for ``exc``, raised by the operation ``what``."""
        return error_for(self.settings, what, exc)

    def ping(self) -> ServerInfo:
        return self.call(self._server_info, what=f"ping redis at {self.endpoint}", retry=True)

    def close_stores(self) -> None:
        # Elections share the locks' notifier: its close wakes both kinds of waiter.
        self.elections.close()
        self.locks.close()

    def close(self) -> None:
        self.redis.close()


def error_for(settings: Settings, what: str, exc: ClientError) -> DcoordError:
    """The dcoord error for the redis error ``exc`` of the operation ``what`` (shared by
    the sync backend and :mod:`dcoord.backends.redis.aio_locks`: mapped once, here)."""
    if isinstance(exc, RedisClusterException):
        if isinstance(exc.__cause__, redis.RedisError):  # no node reachable: why
            return error_for(settings, what, exc.__cause__)
        if is_transient(exc):
            return BackendUnavailable(f"{what}: {exc}")
        return BackendError(f"{what}: {exc}")
    user = settings.username or "default"
    if isinstance(exc, CREDENTIALS):
        return ConfigError(f"{what}: redis refused the credentials of user {user!r}: {exc}")
    problem = certificate_problem(exc)
    if problem is not None:
        return certificate_error(what, problem)
    if isinstance(exc, redis.ResponseError) and (
        reply_code(exc) == "NOPERM" or SCRIPT_DENIED in str(exc)
    ):
        return PermissionDenied(f"{what}: redis denied it to user {user!r}: {reply_text(exc)}")
    if is_transient(exc):
        return BackendUnavailable(f"{what}: {reply_text(exc)}")
    return BackendError(f"{what}: redis replied: {reply_text(exc)}")
