"""The etcd v3 backend over ``pyetcd`` (etcd-sdk-python), keys under ``/dcoord/<namespace>/``.

Atomic steps are etcd transactions compared on revisions; liveness is etcd leases.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import pyetcd
import pyetcd.client
from pyetcd import etcdrpc
from pyetcd import exceptions as etcd_errors

from ... import metrics
from ...config import Settings
from ...errors import (
    BackendError,
    BackendUnavailable,
    ClientClosed,
    ConfigError,
    PermissionDenied,
)
from ...scheduler import Scheduler
from ..base import ServerInfo, certificate_error, with_retries
from ..etcd_names import namespace_prefix
from .client import EtcdClient
from .election import EtcdElections
from .kv import EtcdKV
from .leases import LeaseNotFound, Leases
from .locks import EtcdLocks
from .membership import EtcdGroups
from .rwlock import EtcdRWLocks
from .semaphore import EtcdSemaphores
from .txlog import EtcdTxLog

T = TypeVar("T")

log = logging.getLogger("dcoord.etcd")

# Replies that a retry (possibly on another member) can fix: no connection, no answer in
# time, or a member that is not (or no longer) the leader, or is shedding load.
_TRANSIENT_CODES = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    # gRPC's own transport failures (a reset stream); pyetcd fails the endpoint on them.
    grpc.StatusCode.INTERNAL,
)
# "context deadline exceeded" (code UNKNOWN): the request's deadline passed on the server,
# typically a member still forwarding to a leader that died.
_TRANSIENT_DETAILS = (
    "not leader",
    "leader changed",
    "no leader",
    "too many requests",
    "context deadline exceeded",
)
# pyetcd's errors that carry no server reply: the connection, or a watch not created in time.
_TRANSIENT_TYPES = (
    etcd_errors.ConnectionFailedError,
    etcd_errors.ConnectionTimeoutError,
    etcd_errors.NoServerAvailableError,
    etcd_errors.InternalServerError,
    etcd_errors.WatchTimedOut,
)
# The token expired (simple tokens after --auth-token-ttl of non-use) or predates an auth
# change: a fresh token fixes it, as the Go client does.
_STALE_TOKEN_DETAILS = ("invalid auth token", "revision of auth store is old", "revision in header")
# gRPC's words for a certificate either side refused (wrong CA, expired, host name
# mismatch, no or a bad client certificate): configuration, never retried.
_CERTIFICATE_DETAILS = (
    "CERTIFICATE_VERIFY_FAILED",
    "Hostname Verification Check failed",
    "CERTIFICATE_REQUIRED",
    "BAD_CERTIFICATE",
    "UNKNOWN_CA",
)
# All gRPC reports when the server refused the handshake for want of a client
# certificate; with one given, it may be something else, and is retried.
_NO_CLIENT_CERTIFICATE = "TSI_DATA_CORRUPTED"
# Credentials the server will never accept: bad input, not a run-time failure.
_BAD_CREDENTIALS_DETAILS = ("authentication failed", "authentication is not enabled", "user name")


# A retried call on a cluster gives each attempt a third of its budget (at least
# _MIN_ATTEMPT s): enough to try every member once, or to outlast an election.
_ATTEMPTS = 3
_MIN_ATTEMPT = 0.5


class _Retryable(Exception):
    """A transient failure inside :meth:`EtcdBackend.call`; never escapes it."""


def _reply(exc: BaseException) -> grpc.Call | grpc.aio.AioRpcError | None:
    """The gRPC reply behind ``exc``: pyetcd raises its own error while handling it
    (grpc.aio raises AioRpcError, which has a reply's code and details too)."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return None
        if isinstance(seen, grpc.Call | grpc.aio.AioRpcError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _describe(exc: BaseException) -> tuple[grpc.StatusCode | None, str]:
    reply = _reply(exc)
    if reply is None:
        return None, str(exc) or type(exc).__name__
    return reply.code(), reply.details() or str(reply.code())


class EtcdBackend:
    kind = "etcd"

    def __init__(self, settings: Settings, scheduler: Scheduler) -> None:
        self.settings = settings
        self.endpoint = ",".join(f"{h}:{p}" for h, p in settings.hosts)
        self.prefix = namespace_prefix(settings.namespace)
        self._closed = False
        # Calls in progress: close() lets them finish before it closes the channel, since
        # gRPC may crash the process on a call over a closed channel.
        self._calls = 0
        self._idle = threading.Condition()
        self._auth_mutex = threading.Lock()
        # The timeout of each thread's current attempt (see _call): EtcdClient reads it.
        self._attempt = threading.local()
        if (settings.username is None) != (settings.password is None):
            raise ConfigError(
                f"etcd needs both a user and a password, or neither; got user "
                f"{settings.username!r} and {'no' if settings.password is None else 'a'} password"
            )
        creds = None
        if settings.tls:
            if settings.options["ca_cert"] is None:
                raise ConfigError("etcds:// needs the ca_cert option (path to the CA bundle)")
            creds = pyetcd.Etcd3Client.get_secure_creds(
                settings.options["ca_cert"],
                settings.options["key_file"],
                settings.options["cert_file"],
            )
        endpoints = [
            pyetcd.Endpoint(host, port, secure=settings.tls, creds=creds)
            for host, port in settings.hosts
        ]
        what = f"connect to etcd at {self.endpoint}"

        def connect() -> EtcdClient:
            etcd = EtcdClient(
                endpoints,
                timeout=settings.connect_timeout,
                narrowed=self._narrowed_timeout,
                user=settings.username,
                password=settings.password,
            )
            if not settings.tls:
                # gRPC refuses call credentials on a plain channel ("does not have a
                # sufficient security level"): the token goes as metadata alone.
                etcd.call_credentials = None
            return etcd

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
        self.elections = EtcdElections(self)

    def _server_info(self) -> ServerInfo:
        status = self.etcd.status()
        return ServerInfo(kind=self.kind, version=str(status.version), endpoint=self.endpoint)

    def call(
        self, fn: Callable[[], T], *, what: str, retry: bool = False, timeout: float | None = None
    ) -> T:
        """Run ``fn`` (raw pyetcd / gRPC calls) with its errors mapped to dcoord errors.

        The one place where etcd's errors become dcoord's: transient ones (no connection,
        no answer in time, not the leader) are retried with ``retry=True`` for up to
        ``timeout`` (default: the request timeout) and end as BackendUnavailable;
        PERMISSION_DENIED is PermissionDenied, refused credentials ConfigError, a missing
        lease LeaseNotFound, any other reply BackendError quoting it. An expired auth
        token is renewed once and the call repeated. On a cluster, a transient failure
        sends the next attempt (or call) to the next member, and each attempt of a
        retried call may take a third of its time (docs/topologies.md, etcd). Pass
        ``retry=True`` only for operations that are safe to repeat; ``fn`` must not
        itself go through ``call``.
        """
        with self._idle:
            if self._closed:
                raise ClientClosed(f"{what}: the client is closed")
            self._calls += 1
        try:
            return self._call(fn, what=what, retry=retry, timeout=timeout)
        except Exception as exc:
            metrics.backend_error(self.settings, type(exc))
            raise
        finally:
            with self._idle:
                self._calls -= 1
                self._idle.notify_all()

    def _call(self, fn: Callable[[], T], *, what: str, retry: bool, timeout: float | None) -> T:
        budget = timeout or self.settings.request_timeout
        deadline = time.monotonic() + budget
        # On a cluster, each attempt of a retried call gets a share of the budget: a member
        # that hangs (paused, or still forwarding to a dead leader) must leave time to try
        # the next one. One server has nothing else to try.
        share = budget
        if retry and len(self.settings.hosts) > 1:
            share = max(_MIN_ATTEMPT, budget / _ATTEMPTS)

        def attempt() -> T:
            etcd: EtcdClient | None = getattr(self, "etcd", None)  # None while connecting
            member = None if etcd is None else etcd.member
            self._attempt.timeout = max(0.05, min(share, deadline - time.monotonic()))
            try:
                return self._once(fn, what)
            except _Retryable:
                if etcd is not None and member is not None:
                    etcd.move_on(member)  # the next attempt (or call) tries another member
                raise
            finally:
                self._attempt.timeout = None

        try:
            if not retry:
                return attempt()
            return with_retries(
                attempt,
                what=what,
                transient=(_Retryable,),
                timeout=budget,
            )
        except _Retryable as exc:
            raise BackendUnavailable(f"{what}: {exc}") from exc.__cause__
        except BackendUnavailable as exc:
            if isinstance(exc.__cause__, _Retryable):  # with_retries gave up: chain the reply
                raise BackendUnavailable(str(exc)) from exc.__cause__.__cause__
            raise

    def _once(self, fn: Callable[[], T], what: str) -> T:
        """``fn()`` with its errors mapped; with an expired auth token, once more after
        getting a fresh one."""
        try:
            return fn()
        except (grpc.RpcError, etcd_errors.Etcd3Exception) as exc:
            if not (self.settings.username and self._stale_token(exc)):
                raise self._mapped(exc, what) from exc
        self._authenticate(what)
        try:
            return fn()
        except (grpc.RpcError, etcd_errors.Etcd3Exception) as exc:
            raise self._mapped(exc, what) from exc

    def _narrowed_timeout(self) -> float | None:
        """The timeout of the calling thread's current attempt (None: not in one)."""
        timeout: float | None = getattr(self._attempt, "timeout", None)
        return timeout

    def _mapped(self, exc: BaseException, what: str) -> Exception:
        """The dcoord error for ``exc`` (or _Retryable when a retry may fix it)."""
        return mapped_error(self.settings, exc, what)

    @staticmethod
    def _stale_token(exc: BaseException) -> bool:
        return stale_token(exc)

    def _authenticate(self, what: str) -> None:
        """Get a fresh auth token for every later request (pyetcd never renews it)."""
        etcd = self.etcd
        request = etcdrpc.AuthenticateRequest(
            name=self.settings.username, password=self.settings.password
        )
        with self._auth_mutex:
            try:
                token = self.rpc(
                    lambda etcd: etcd.authstub.Authenticate(request, self.settings.request_timeout)
                ).token
            except (grpc.RpcError, etcd_errors.Etcd3Exception) as exc:
                raise self._mapped(exc, f"{what}: authenticate again") from exc
            etcd.metadata = (("token", token),)
            if self.settings.tls:
                etcd.call_credentials = grpc.metadata_call_credentials(
                    pyetcd.client.EtcdTokenCallCredentials(token)
                )
            # A watch stream started later (after a reconnect) must use the new token too.
            watcher = etcd._stubs.get("watcher")
            if watcher is not None:
                watcher._metadata, watcher._credentials = etcd.metadata, etcd.call_credentials
        log.info("etcd at %s: auth token renewed", self.endpoint)

    def rpc(self, invoke: Callable[[Any], T]) -> T:
        """Run ``invoke(etcd)``, a raw gRPC stub call (for what pyetcd's API lacks).

        A failure is handled as pyetcd's own calls handle it (no answer drops the member's
        stubs and watch stream); the error is left for :meth:`call` to map, which moves
        on to another member if it is transient.
        """
        etcd = self.etcd
        try:
            return invoke(etcd)
        except grpc.RpcError as exc:
            etcd._manage_grpc_errors(exc)  # raises pyetcd's error for the code, or exc
            raise

    def ping(self) -> ServerInfo:
        return self.call(self._server_info, what=f"ping etcd at {self.endpoint}", retry=True)

    def close_stores(self) -> None:
        self.elections.close()
        self.locks.close()
        # Last: revoking the shared leases deletes the keys of every store at once.
        self.leases.close()

    def close(self) -> None:
        if self._closed:
            return
        with self._idle:
            self._closed = True
            # A call still running (a keep-alive, a waiter's check) ends within its
            # request timeout; closing the channel under it could crash the process.
            self._idle.wait_for(lambda: self._calls == 0, timeout=self.settings.request_timeout)
        self.etcd.close()


def mapped_error(settings: Settings, exc: BaseException, what: str) -> Exception:
    """The dcoord error for the gRPC / pyetcd error ``exc`` of the operation ``what``, or
    _Retryable when a retry may fix it (shared by the sync backend and
    :mod:`dcoord.backends.etcd.aio_locks`: mapped once, here)."""
    code, details = _describe(exc)
    if any(text in details for text in _CERTIFICATE_DETAILS):
        return certificate_error(what, details)
    if _NO_CLIENT_CERTIFICATE in details and settings.options["cert_file"] is None:
        return certificate_error(
            what, f"{details} (the server asks for a client certificate: cert_file, key_file)"
        )
    if (
        code in _TRANSIENT_CODES
        or (code is None and isinstance(exc, _TRANSIENT_TYPES))
        or any(text in details for text in _TRANSIENT_DETAILS)
    ):
        return _Retryable(details)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDenied(f"{what}: etcd refused user {settings.username!r}: {details}")
    if code == grpc.StatusCode.UNAUTHENTICATED or any(
        text in details for text in _BAD_CREDENTIALS_DETAILS
    ):
        return ConfigError(f"{what}: etcd refused the credentials: {details}")
    if code == grpc.StatusCode.NOT_FOUND and "lease not found" in details:
        return LeaseNotFound(f"{what}: {details}")
    return BackendError(f"{what}: etcd answered: {details}")


def stale_token(exc: BaseException) -> bool:
    """Whether ``exc`` says the auth token expired or predates an auth change."""
    _, details = _describe(exc)
    return any(text in details for text in _STALE_TOKEN_DETAILS)
