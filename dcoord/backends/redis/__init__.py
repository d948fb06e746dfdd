"""The Redis 7 backend: one redis-py client (with hiredis), keys under ``dcoord:<namespace>:``.

Atomic steps are Lua scripts kept as ``.lua`` files beside this module. redis-py's own
retry is turned off: a repeated write is not always harmless, so every retry is decided
here, per operation (see :meth:`RedisBackend.call`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ...config import Settings
from ...errors import BackendUnavailable, ConfigError
from ...scheduler import Scheduler
from ..base import ServerInfo, with_retries
from .kv import RedisKV
from .locks import RedisLocks
from .membership import RedisGroups
from .rwlock import RedisRWLocks
from .semaphore import RedisSemaphores
from .txlog import RedisTxLog

T = TypeVar("T")

# Errors after which the server may answer again; AuthenticationError and
# AuthorizationError are ConnectionErrors in redis-py but retrying them cannot help.
TRANSIENT = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)
PERMANENT = (redis.AuthenticationError, redis.exceptions.AuthorizationError)


class RedisBackend:
    kind = "redis"

    def __init__(self, settings: Settings, scheduler: Scheduler) -> None:
        ((host, port),) = settings.hosts
        self.settings = settings
        self.endpoint = f"{host}:{port}"
        self.prefix = f"dcoord:{settings.namespace}:"
        tls = {}
        if settings.tls:
            tls = {
                "ssl": True,
                "ssl_ca_certs": settings.options["ca_cert"],
                "ssl_certfile": settings.options["cert_file"],
                "ssl_keyfile": settings.options["key_file"],
            }
        self.redis = redis.Redis(
            host=host,
            port=port,
            db=int(settings.database),
            username=settings.username,
            password=settings.password,
            socket_connect_timeout=settings.connect_timeout,
            socket_timeout=settings.request_timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=30,
            client_name=f"dcoord:{settings.namespace}",
            **tls,
        )
        self.kv = RedisKV(self, self.prefix)
        self.groups = RedisGroups(self, self.prefix)
        self.locks = RedisLocks(self)
        self.semaphores = RedisSemaphores(self)
        self.rwlocks = RedisRWLocks(self)
        self.txlog = RedisTxLog(self, self.prefix)
        self.info = self.call(
            self._server_info,
            what=f"connect to redis at {self.endpoint}",
            retry=True,
            timeout=settings.connect_timeout,
        )

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
        """Run ``fn`` with redis errors mapped to dcoord errors.

        ``retry=True`` retries transient failures for up to ``timeout`` (default: the
        request timeout); pass it only for operations that are safe to repeat.
        """
        try:
            if retry:
                return with_retries(
                    fn,
                    what=what,
                    transient=TRANSIENT,
                    timeout=timeout or self.settings.request_timeout,
                )
            return fn()
        except PERMANENT as exc:
            raise ConfigError(f"{what}: redis refused the credentials: {exc}") from exc
        except TRANSIENT as exc:
            raise BackendUnavailable(f"{what}: {exc}") from exc

    def ping(self) -> ServerInfo:
        return self.call(self._server_info, what=f"ping redis at {self.endpoint}", retry=True)

    def close(self) -> None:
        self.redis.close()
