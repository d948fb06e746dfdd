"""The etcd v3 backend over ``pyetcd`` (etcd-sdk-python), keys under ``/dcoord/<namespace>/``.

Atomic steps are etcd transactions compared on revisions; liveness is etcd leases.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import pyetcd
from pyetcd import exceptions as etcd_errors

from ...config import Settings
from ...errors import BackendUnavailable, ConfigError
from ...scheduler import Scheduler
from ..base import ServerInfo, with_retries
from .kv import EtcdKV
from .leases import Leases
from .locks import EtcdLocks
from .membership import EtcdGroups
from .rwlock import EtcdRWLocks
from .semaphore import EtcdSemaphores
from .txlog import EtcdTxLog

T = TypeVar("T")

TRANSIENT = (
    etcd_errors.ConnectionFailedError,
    etcd_errors.ConnectionTimeoutError,
    etcd_errors.NoServerAvailableError,
    etcd_errors.InternalServerError,
)


class EtcdBackend:
    kind = "etcd"

    def __init__(self, settings: Settings, scheduler: Scheduler) -> None:
        self.settings = settings
        self.endpoint = ",".join(f"{h}:{p}" for h, p in settings.hosts)
        self.prefix = f"/dcoord/{settings.namespace}/"
        creds = None
        if settings.tls:
            if settings.options["ca_cert"] is None:
                raise ConfigError("etcds:// needs the ca_cert option (path to the CA bundle)")
            creds = pyetcd.Etcd3Client.get_secure_creds(
                settings.options["ca_cert"],
                settings.options["key_file"],
                settings.options["cert_file"],
            )
        # pyetcd marks an endpoint "failed" for time_retry seconds after one error and then
        # refuses to use it; with one endpoint that would turn a blip into minutes of outage.
        time_retry = 0.0 if len(settings.hosts) == 1 else 1.0
        endpoints = [
            pyetcd.Endpoint(host, port, secure=settings.tls, creds=creds, time_retry=time_retry)
            for host, port in settings.hosts
        ]
        what = f"connect to etcd at {self.endpoint}"

        def connect() -> Any:
            return pyetcd.MultiEndpointEtcd3Client(
                endpoints=endpoints,
                timeout=settings.connect_timeout,
                user=settings.username,
                password=settings.password,
                failover=len(endpoints) > 1,
            )

        self.etcd = self.call(connect, what=what, retry=True, timeout=settings.connect_timeout)
        self.info = self.call(
            self._server_info, what=what, retry=True, timeout=settings.connect_timeout
        )
        self.etcd.timeout = settings.request_timeout
        self.kv = EtcdKV(self, self.prefix)
        self.leases = Leases(self, scheduler)
        self.locks = EtcdLocks(self, scheduler)
        self.semaphores = EtcdSemaphores(self)
        self.rwlocks = EtcdRWLocks(self)
        self.groups = EtcdGroups(self, self.prefix)
        self.txlog = EtcdTxLog(self, self.prefix)

    def _server_info(self) -> ServerInfo:
        status = self.etcd.status()
        return ServerInfo(kind=self.kind, version=str(status.version), endpoint=self.endpoint)

    def call(
        self, fn: Callable[[], T], *, what: str, retry: bool = False, timeout: float | None = None
    ) -> T:
        """Run ``fn`` with etcd errors mapped to dcoord errors.

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
        except TRANSIENT as exc:
            raise BackendUnavailable(f"{what}: {exc}") from exc
        except grpc.RpcError as exc:  # errors pyetcd does not map, e.g. bad credentials
            code = exc.code() if isinstance(exc, grpc.Call) else None
            if code in (
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.INVALID_ARGUMENT,
            ):
                raise ConfigError(f"{what}: etcd refused: {exc.details()}") from exc
            raise BackendUnavailable(f"{what}: {exc}") from exc

    def ping(self) -> ServerInfo:
        return self.call(self._server_info, what=f"ping etcd at {self.endpoint}", retry=True)

    def close(self) -> None:
        try:
            self.leases.close()
        finally:
            self.etcd.close()
