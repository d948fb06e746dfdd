"""Async fenced locks on etcd through ``grpc.aio`` and the stubs pyetcd ships.

The same recipe and keys as :mod:`.locks` (etcd's mutex: the holder is the key with the
lowest create revision under :func:`~dcoord.backends.etcd_names.etcd_lock_prefix`; the
fence is that create revision; waiters watch the delete of their predecessor, FIFO), so
sync clients, async clients and ``etcdctl lock`` queue in one line. gRPC errors become
dcoord errors in one place, :func:`dcoord.backends.etcd.mapped_error`, shared with the
sync backend; fenced writes are :func:`.locks.fenced_txn`.

One difference in this first slice: every attempt gets a lease of its own (the sync
backend shares one lease per TTL between auto-renewed locks). The handle's renewal is a
keep-alive of that lease; release revokes it, which deletes the key; a cancelled or
timed-out attempt revokes it too, so nothing of it is left in the queue.

Topologies: one server, or a cluster of several members named in the URL. As the sync
backend (:mod:`.client`), requests go to one member at a time; a transient failure
there sends the next attempt (or call) to the next member in URL order, and each attempt
of a retried call gets a share of its budget, so that a paused member leaves time to
try another one. A watch on a member that was given up is abandoned and made again on
the member now in use.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import grpc.aio
from pyetcd import etcdrpc
from pyetcd.etcdrpc import rpc_pb2_grpc
from pyetcd.utils import prefix_range_end

from ... import metrics
from ...config import Settings
from ...errors import BackendUnavailable, ClientClosed, ConfigError, DcoordError
from ...inspect import identity_json
from ..aio_base import with_retries_async
from ..base import LockGrant, ServerInfo, key_segment
from ..etcd_names import etcd_lock_prefix, namespace_prefix
from . import _ATTEMPTS, _MIN_ATTEMPT, _Retryable, mapped_error, stale_token
from .aio_kv import AsyncEtcdKV
from .aio_membership import AsyncEtcdGroups
from .aio_txlog import AsyncEtcdTxLog
from .locks import _created_at, _first_kv, _range, cut_short, fenced_txn, request_budget

if TYPE_CHECKING:
    from .aio_election import AsyncEtcdElections
    from .aio_rwlock import AsyncEtcdRWLocks
    from .aio_semaphore import AsyncEtcdSemaphores

T = TypeVar("T")

log = logging.getLogger("dcoord.etcd")

# The timeout of the current attempt of a call, per task (None: not in one), as the sync
# backend's per-thread ``_attempt.timeout``.
_attempt_timeout: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "dcoord_etcd_attempt_timeout", default=None
)


class AsyncEtcdBackend:
    """The async etcd backend: a ``grpc.aio`` channel per member (made on first use),
    requests to one member at a time; keys as the sync backend's."""

    kind = "etcd"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        if (settings.username is None) != (settings.password is None):
            raise ConfigError(
                f"etcd needs both a user and a password, or neither; got user "
                f"{settings.username!r} and {'no' if settings.password is None else 'a'} password"
            )
        self.members = [f"{host}:{port}" for host, port in settings.hosts]
        self.endpoint = ",".join(self.members)
        self.prefix = namespace_prefix(settings.namespace)
        self._credentials: grpc.ChannelCredentials | None = None
        if settings.tls:
            if settings.options["ca_cert"] is None:
                raise ConfigError("etcds:// needs the ca_cert option (path to the CA bundle)")
            self._credentials = grpc.ssl_channel_credentials(
                _read(settings.options["ca_cert"]),
                _read(settings.options["key_file"]),
                _read(settings.options["cert_file"]),
            )
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.metadata: tuple[tuple[str, str], ...] | None = None
        self._use(self.members[0])
        self.locks = AsyncEtcdLocks(self)
        # Members' leases are granted, kept alive and revoked as the locks' are.
        self.groups = AsyncEtcdGroups(self, self.locks)
        self._closing = False
        # Set once the stores are closed, just before the channels: a request from then
        # on is ClientClosed (gRPC would raise its UsageError on a closed channel).
        self._closed = False

    def _use(self, member: str) -> None:
        """Send requests to ``member`` from now on (its channel made on first use)."""
        channel = self._channels.get(member)
        if channel is None:
            if self._credentials is not None:
                channel = grpc.aio.secure_channel(member, self._credentials)
            else:
                channel = grpc.aio.insecure_channel(member)
            self._channels[member] = channel
        self.member = member
        self.kv = rpc_pb2_grpc.KVStub(channel)
        self.lease = rpc_pb2_grpc.LeaseStub(channel)
        self.watch = rpc_pb2_grpc.WatchStub(channel)
        self._maintenance = rpc_pb2_grpc.MaintenanceStub(channel)
        self._auth = rpc_pb2_grpc.AuthStub(channel)

    def move_on(self, failed: str) -> None:
        """After a transient failure on member ``failed``, use the next member in URL
        order; nothing if another task has already moved on from it."""
        if len(self.members) < 2 or self.member != failed:
            return
        self._use(self.members[(self.members.index(failed) + 1) % len(self.members)])
        log.info("etcd member %s failed; now using %s", failed, self.member)

    @property
    def timeout(self) -> float:
        """The timeout of a request: the current attempt's (see :meth:`call`), else the
        request timeout."""
        narrowed = _attempt_timeout.get()
        return self.settings.request_timeout if narrowed is None else narrowed

    def check_open(self, what: str) -> None:
        """Raise ClientClosed once the client's channels are closed."""
        if self._closed:
            raise ClientClosed(f"{what}: the client is closed")

    async def start(self) -> None:
        """Authenticate (with a user) and read the server's version, within
        ``connect_timeout``; closes itself on failure."""
        what = f"connect to etcd at {self.endpoint}"
        try:
            if self.settings.username is not None:
                await self.call(self._authenticate, what=what, retry=True, auth=False)
            await self.call(
                self._server_info, what=what, retry=True, timeout=self.settings.connect_timeout
            )
        except BaseException:
            await self.close()
            raise

    async def _authenticate(self) -> None:
        request = etcdrpc.AuthenticateRequest(
            name=self.settings.username, password=self.settings.password
        )
        reply = await self._auth.Authenticate(request, timeout=self.timeout)
        self.metadata = (("token", reply.token),)

    async def _server_info(self) -> ServerInfo:
        status = await self._maintenance.Status(
            etcdrpc.StatusRequest(), timeout=self.timeout, metadata=self.metadata
        )
        return ServerInfo(kind=self.kind, version=str(status.version), endpoint=self.member)

    async def call(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        what: str,
        retry: bool = False,
        timeout: float | None = None,
        auth: bool = True,
    ) -> T:
        """:meth:`EtcdBackend.call` for coroutines: errors mapped once
        (:func:`mapped_error`), a stale auth token renewed once, transient failures
        retried only where ``retry`` says the operation is safe to repeat. On a cluster
        a transient failure moves on to the next member, and each attempt of a retried
        call may take a share of its budget (as the sync backend's)."""
        budget = timeout or self.settings.request_timeout
        deadline = time.monotonic() + budget
        share = budget
        if retry and len(self.members) > 1:
            share = max(_MIN_ATTEMPT, budget / _ATTEMPTS)

        async def once() -> T:
            self.check_open(what)  # before every attempt: a retry may come after close
            try:
                return await fn()
            except grpc.aio.AioRpcError as exc:
                self.check_open(what)  # cancelled by the close of its channel
                if not (auth and self.settings.username and stale_token(exc)):
                    raise mapped_error(self.settings, exc, what) from exc
            try:
                await self._authenticate()
                return await fn()
            except grpc.aio.AioRpcError as exc:
                raise mapped_error(self.settings, exc, what) from exc

        async def attempt() -> T:
            member = self.member
            narrowed = _attempt_timeout.set(max(0.05, min(share, deadline - time.monotonic())))
            try:
                return await once()
            except _Retryable:
                self.move_on(member)  # the next attempt (or call) tries another member
                raise
            finally:
                _attempt_timeout.reset(narrowed)

        try:
            if not retry:
                return await attempt()
            return await with_retries_async(
                attempt,
                what=what,
                transient=lambda exc: isinstance(exc, _Retryable),
                timeout=budget,
            )
        except _Retryable as exc:
            metrics.backend_error(self.settings, BackendUnavailable)
            raise BackendUnavailable(f"{what}: {exc}") from exc.__cause__
        except BackendUnavailable as exc:
            metrics.backend_error(self.settings, BackendUnavailable)
            if isinstance(exc.__cause__, _Retryable):  # the retries gave up: chain the reply
                raise BackendUnavailable(str(exc)) from exc.__cause__.__cause__
            raise
        except DcoordError as exc:
            metrics.backend_error(self.settings, type(exc))
            raise

    async def txn(
        self, request: Any, *, what: str, retry: bool = False, timeout: float | None = None
    ) -> Any:
        """Run one TxnRequest, within ``timeout`` (default: the request timeout)."""
        return await self.call(
            lambda: self.kv.Txn(request, timeout=self.timeout, metadata=self.metadata),
            what=what,
            retry=retry,
            timeout=timeout,
        )

    async def ping(self) -> ServerInfo:
        return await self.call(self._server_info, what=f"ping etcd at {self.endpoint}", retry=True)

    @functools.cached_property
    def semaphores(self) -> AsyncEtcdSemaphores:
        """Counting semaphores (the sync clients' keys)."""
        from .aio_semaphore import AsyncEtcdSemaphores  # it imports this module

        return AsyncEtcdSemaphores(self)

    @functools.cached_property
    def rwlocks(self) -> AsyncEtcdRWLocks:
        """Read-write locks (the sync clients' keys)."""
        from .aio_rwlock import AsyncEtcdRWLocks  # it imports this module

        return AsyncEtcdRWLocks(self)

    @functools.cached_property
    def txlog(self) -> AsyncEtcdTxLog:
        """The 2PC log (the sync clients' log: same keys and transactions)."""
        return AsyncEtcdTxLog(self)

    @functools.cached_property
    def elections(self) -> AsyncEtcdElections:
        """Leader elections (the sync clients' keys and recipe)."""
        from .aio_election import AsyncEtcdElections  # it imports this module

        return AsyncEtcdElections(self)

    @functools.cached_property
    def kv_store(self) -> AsyncEtcdKV:
        """Plain keys (the sync clients' keys)."""
        return AsyncEtcdKV(self)

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        try:
            await self.locks.close()  # its revokes still need the channels
        finally:
            self._closed = True
            await asyncio.gather(*(channel.close() for channel in self._channels.values()))


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as file:
        return file.read()


class AsyncEtcdLocks:
    """The async lock store of one etcd backend."""

    def __init__(self, backend: AsyncEtcdBackend) -> None:
        self.backend = backend
        self.prefix = backend.prefix
        self.namespace = backend.settings.namespace
        self.label: str | None = backend.settings.options["label"]
        self._serial = itertools.count(1)
        self._cleanups: set[asyncio.Task[None]] = set()
        # The leases of acquires queued now (not granted, not forgotten): an acquire in
        # progress when its client closes is no primitive the client can let go of, so
        # close() revokes its lease (and key) before the channels go.
        self._queued: set[int] = set()
        self._closing = False

    def next_serial(self) -> int:
        return next(self._serial)

    def slot(
        self, name: str, ttl: float, auto_renew: bool, fair: bool = False
    ) -> AsyncEtcdLockSlot:
        # Every etcd lock is fair already (``fair`` changes nothing): the mutex recipe
        # queues by create revision, as the sync store's.
        return AsyncEtcdLockSlot(self, name, ttl)

    async def admit(self, resource: str, token: int) -> bool:
        # Re-admitting the same token is harmless, so a retry after a lost reply is safe.
        response = await self.backend.txn(
            fenced_txn(self.prefix, resource, token, []),
            what=f"admit fence {token} for {resource!r}",
            retry=True,
        )
        return bool(response.succeeded or response.responses[0].response_txn.succeeded)

    async def write(self, resource: str, token: int, key: str, value: bytes) -> bool:
        put = etcdrpc.RequestOp(
            request_put=etcdrpc.PutRequest(key=f"{self.prefix}kv/{key}".encode(), value=value)
        )
        # Never retried: see EtcdLocks.write.
        response = await self.backend.txn(
            fenced_txn(self.prefix, resource, token, [put]),
            what=f"fenced write of {key!r} with fence {token} for {resource!r}",
        )
        return bool(response.succeeded or response.responses[0].response_txn.succeeded)

    async def highest(self, resource: str) -> int | None:
        key = f"{self.prefix}fence/{key_segment(resource)}".encode()
        backend = self.backend
        response = await backend.call(
            lambda: backend.kv.Range(
                etcdrpc.RangeRequest(key=key), timeout=backend.timeout, metadata=backend.metadata
            ),
            what=f"read fence of {resource!r}",
            retry=True,
        )
        return int(response.kvs[0].value) if response.kvs else None

    async def grant(self, ttl: float, *, timeout: float | None = None) -> tuple[int, int, float]:
        """A new lease: its id, the TTL etcd granted, and when it surely expires; granted
        within ``timeout`` (default: the request timeout). ClientClosed once the store
        closes: nobody would revoke it."""
        seconds = max(1, math.ceil(ttl))
        backend = self.backend
        if self._closing:
            raise ClientClosed(f"grant a {seconds} s lease: the client is closing")
        sent = time.monotonic()
        reply = await backend.call(
            lambda: backend.lease.LeaseGrant(
                etcdrpc.LeaseGrantRequest(TTL=seconds),
                timeout=backend.timeout,
                metadata=backend.metadata,
            ),
            what=f"grant a {seconds} s lease",
            timeout=timeout,
        )
        return int(reply.ID), int(reply.TTL), sent + int(reply.TTL)

    async def keep_alive(self, lease: int, *, timeout: float | None = None) -> int:
        """Refresh ``lease`` once, within ``timeout`` (default: the request timeout); the
        TTL it has now (0: the server has it no more)."""
        backend = self.backend
        request = etcdrpc.LeaseKeepAliveRequest(ID=lease)

        async def once() -> int:
            call = backend.lease.LeaseKeepAlive(
                iter([request]), timeout=backend.timeout, metadata=backend.metadata
            )
            ttl = 0
            async for reply in call:
                ttl = int(reply.TTL)
            return ttl

        # Refreshing a lease twice is harmless: retried (on the next member of a cluster).
        return await backend.call(
            once, what=f"keep lease {lease:x} alive", retry=True, timeout=timeout
        )

    async def revoke(self, lease: int) -> bool:
        """Revoke ``lease`` (deleting its key); False if it had already expired."""
        backend = self.backend
        attempts = 0

        async def revoke() -> bool:
            nonlocal attempts
            attempts += 1
            try:
                await backend.lease.LeaseRevoke(
                    etcdrpc.LeaseRevokeRequest(ID=lease),
                    timeout=backend.timeout,
                    metadata=backend.metadata,
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                return False
            return True

        what = f"revoke lease {lease:x}"
        revoked = await backend.call(revoke, what=what, retry=True)
        if not revoked and attempts > 1:
            raise BackendUnavailable(
                f"{what}: the release outcome is unknown: a reply was lost and the retry "
                "found the lease gone (revoked by the lost attempt, or expired before it)"
            )
        return revoked

    def queued(self, lease: int, queued: bool) -> None:
        """An acquire is queued on ``lease`` (True), or no longer (False: it holds the
        lock, or has forgotten the lease)."""
        if queued:
            self._queued.add(lease)
        else:
            self._queued.discard(lease)

    def forget(self, lease: int) -> asyncio.Task[None]:
        """Revoke ``lease`` in a task (after a cancellation or a failure): its queue key
        goes with it. Retried until the lease is gone or the client closes."""
        self._queued.discard(lease)
        task = asyncio.get_running_loop().create_task(self._forget(lease))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        return task

    async def _forget(self, lease: int) -> None:
        delay = 0.05
        while True:
            try:
                await self.revoke(lease)
                return
            except ClientClosed as exc:  # close() has revoked it already, if it could
                log.info("lease %x not revoked: %s", lease, exc)
                return
            except BackendUnavailable as exc:
                log.info("could not revoke lease %x yet: %s", lease, exc)
            except DcoordError as exc:  # refused: the lease expires by its TTL
                log.warning("could not revoke lease %x: %s", lease, exc)
                return
            except Exception as exc:  # the client closed its channels: the TTL covers it
                if not self.backend._closed:
                    raise
                log.info("lease %x not revoked (the client closed): %r", lease, exc)
                return
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)

    async def close(self) -> None:
        """Revoke the leases of the acquires still queued and finish the pending revokes
        (each bounded by the request timeout and retries), so that no queue key outlives
        the client longer than needed. No lease is granted from now on."""
        self._closing = True
        for lease in list(self._queued):
            self.forget(lease)
        if self._cleanups:
            _, pending = await asyncio.wait(
                set(self._cleanups), timeout=self.backend.settings.request_timeout
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


class AsyncEtcdLockSlot:
    """One async handle's place in one lock's queue, on a lease of its own."""

    def __init__(
        self,
        locks: AsyncEtcdLocks,
        name: str,
        ttl: float,
        *,
        prefix: str | None = None,
        value: bytes | None = None,
    ) -> None:
        self._locks = locks
        self._backend = locks.backend
        self.name = name
        # As the sync EtcdLockSlot: an election candidate queues by this recipe under its
        # own prefix, its key holding the candidate's value (aio_election.py).
        self.value = value
        where = prefix if prefix is not None else etcd_lock_prefix(locks.namespace, name)
        self.prefix = f"{where}/".encode()
        self._range_end = prefix_range_end(self.prefix)
        self._ttl = ttl
        self._key: bytes | None = None
        self._revision = 0
        self._lease = 0
        self._lease_ttl = 0

    def _owner_range(self) -> Any:
        return _range(
            self.prefix,
            self._range_end,
            sort_order=etcdrpc.RangeRequest.ASCEND,
            sort_target=etcdrpc.RangeRequest.CREATE,
            limit=1,
            keys_only=True,
        )

    async def acquire(self, deadline: float | None) -> LockGrant | None:
        # As EtcdLockSlot.acquire: a wait ends at its deadline even while the server
        # hangs (each request bounded by it), and a request it cuts short is a timeout.
        bound = deadline if deadline is not None and time.monotonic() < deadline else None
        while True:
            try:
                lease, lease_ttl, expires_at = await self._locks.grant(
                    self._ttl, timeout=self._budget(bound)
                )
            except BackendUnavailable:
                if cut_short(bound):
                    return None  # a lease granted unanswered expires, nothing on it
                raise
            self._locks.queued(lease, True)
            try:
                key, revision, ready = await self._enqueue(lease, bound)
                outcome = "acquired" if ready else "waiting"
                if not ready:
                    outcome, expires_at = await self._wait(
                        key, revision, lease, expires_at, deadline, bound
                    )
            except BackendUnavailable:
                if not cut_short(bound):
                    await asyncio.wait({self._locks.forget(lease)})
                    raise
                outcome = "timeout"
            except BaseException:
                # Failed or cancelled (CancelledError included): the key, if it was
                # written, goes with its lease, before the error goes on (a second
                # cancellation leaves the revoke to its task).
                await asyncio.wait({self._locks.forget(lease)})
                raise
            if outcome == "acquired":
                self._locks.queued(lease, False)
                self._key, self._revision = key, revision
                self._lease, self._lease_ttl = lease, lease_ttl
                return LockGrant(revision, expires_at)
            # With a deadline, a revoke that takes longer goes on in its task (close()
            # waits for it): the caller's time is up.
            await asyncio.wait({self._locks.forget(lease)}, timeout=self._budget(bound))
            if outcome == "timeout":
                return None
            log.info("lock %r: queue key %s expired while waiting; queueing again", self.name, key)

    def _budget(self, bound: float | None) -> float | None:
        """The time the next request may take (None: the request timeout)."""
        if bound is None:
            return None
        return request_budget(bound, self._backend.settings.request_timeout)

    async def _enqueue(self, lease: int, bound: float | None) -> tuple[bytes, int, bool]:
        """Create our key on ``lease`` (idempotent: a retry finds it); return it, its
        create revision, and whether it holds the lock at once."""
        key = self.prefix + f"{lease:016x}-{self._locks.next_serial():x}".encode()
        value = self.value
        if value is None:
            value = identity_json(self._locks.label, time.time())
        put = etcdrpc.PutRequest(key=key, value=value)
        put.lease = lease
        request = etcdrpc.TxnRequest(
            compare=[_created_at(key, 0)],
            success=[etcdrpc.RequestOp(request_put=put), self._owner_range()],
            failure=[_range(key, keys_only=True), self._owner_range()],
        )
        response = await self._backend.txn(
            request, what=f"acquire lock {self.name!r}", retry=True, timeout=self._budget(bound)
        )
        if response.succeeded:
            revision = response.header.revision
        else:
            revision = _first_kv(response.responses[0]).create_revision
        owner = _first_kv(response.responses[1])
        return key, revision, owner is None or owner.create_revision == revision

    async def _wait(
        self,
        key: bytes,
        revision: int,
        lease: int,
        expires_at: float,
        deadline: float | None,
        bound: float | None,
    ) -> tuple[str, float]:
        """Wait for our turn, keeping our lease alive: ("acquired" | "timeout" |
        "requeue", the lease's deadline)."""
        check = etcdrpc.TxnRequest(
            success=[
                _range(key, keys_only=True),
                self._owner_range(),
                _range(
                    self.prefix,
                    self._range_end,
                    sort_order=etcdrpc.RangeRequest.DESCEND,
                    sort_target=etcdrpc.RangeRequest.CREATE,
                    max_create_revision=revision - 1,
                    limit=1,
                    keys_only=True,
                ),
            ]
        )
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return "timeout", expires_at
            if now >= expires_at:
                return "requeue", expires_at
            response = await self._backend.txn(
                check, what=f"wait for lock {self.name!r}", retry=True, timeout=self._budget(bound)
            )
            mine, owner, predecessor = (_first_kv(r) for r in response.responses)
            if mine is None:
                return "requeue", expires_at
            if owner is not None and owner.create_revision == revision:
                return "acquired", expires_at
            if predecessor is None:
                continue
            expires_at = await self._wait_deleted(
                predecessor.key, response.header.revision + 1, lease, expires_at, deadline, bound
            )

    async def _wait_deleted(
        self,
        key: bytes,
        from_revision: int,
        lease: int,
        expires_at: float,
        deadline: float | None,
        bound: float | None,
        range_end: bytes = b"",
    ) -> float:
        """Return when ``key`` (with ``range_end``: a key of that range) is deleted
        (after ``from_revision``), at the deadline, or when our lease is gone; keeps our
        lease alive meanwhile. Returns its deadline."""
        backend = self._backend
        member = backend.member
        backend.check_open(f"watch lock {self.name!r}")
        watch = backend.watch.Watch(metadata=backend.metadata)
        create = etcdrpc.WatchCreateRequest(
            key=key,
            range_end=range_end,
            start_revision=from_revision,
            filters=[etcdrpc.WatchCreateRequest.NOPUT],
        )
        try:
            await watch.write(etcdrpc.WatchRequest(create_request=create))
            reader = asyncio.ensure_future(self._deleted(watch))
            try:
                while not reader.done():
                    # Keep our own lease alive at a third of its TTL.
                    wait = max(0.05, (expires_at - time.monotonic()) / 3)
                    if deadline is not None:
                        wait = min(wait, deadline - time.monotonic())
                        if wait <= 0:
                            return expires_at
                    await asyncio.wait({reader}, timeout=wait)
                    if reader.done():
                        break
                    if deadline is not None and time.monotonic() >= deadline:
                        return expires_at  # no keep-alive past it: the caller times out
                    sent = time.monotonic()
                    ttl = await self._locks.keep_alive(lease, timeout=self._budget(bound))
                    if ttl <= 0:
                        return 0.0  # our key went with the lease: requeue
                    expires_at = sent + ttl
                    if backend.member != member:
                        # The watch's member was given up (it may hang, and its watch
                        # stay silent): re-check, and watch again on the member in use.
                        return expires_at
                if reader.cancelled():  # gRPC cancels the calls of a channel it closes
                    backend.check_open(f"watch lock {self.name!r}")
                reader.result()  # a broken watch raises: mapped below
            finally:
                reader.cancel()
        except grpc.aio.AioRpcError as exc:
            backend.check_open(f"watch lock {self.name!r}")  # its channel closed under it
            error = mapped_error(backend.settings, exc, f"watch lock {self.name!r}")
            if not isinstance(error, _Retryable):
                raise error from exc
            # The member failed (or was killed): the caller re-checks, through a call
            # that retries, and watches again on the member now in use.
            log.info("lock %r: watch on etcd member %s failed: %s", self.name, member, error)
            backend.move_on(member)
        finally:
            watch.cancel()
        return expires_at

    @staticmethod
    async def _deleted(watch: Any) -> None:
        """Read the watch until an event (the delete) or a cancel (compaction: the caller
        re-checks at once)."""
        while True:
            reply = await watch.read()
            if reply is grpc.aio.EOF or reply.events or reply.canceled or reply.compact_revision:
                return

    async def release(self) -> bool:
        lease, self._key = self._lease, None
        if not lease:
            return False
        self._lease = 0
        try:
            return await self._locks.revoke(lease)
        except BackendUnavailable:
            self._locks.forget(lease)
            raise

    async def extend(self, ttl: float) -> LockGrant | None:
        lease = self._lease
        if self._key is None or not lease:
            return None
        if ttl <= self._lease_ttl:
            sent = time.monotonic()
            remaining = await self._locks.keep_alive(lease)
            return LockGrant(self._revision, sent + remaining) if remaining > 0 else None
        return await self._move_to_new_lease(ttl, lease)

    async def _move_to_new_lease(self, ttl: float, old: int) -> LockGrant | None:
        # As EtcdLockSlot._move_to_new_lease: a lease's TTL cannot grow, so the key moves
        # to a longer lease; a put keeps its create revision (the fence, the queue order).
        assert self._key is not None
        new, new_ttl, expires_at = await self._locks.grant(ttl)
        put = etcdrpc.PutRequest(key=self._key, ignore_value=True)
        put.lease = new
        request = etcdrpc.TxnRequest(
            compare=[_created_at(self._key, self._revision)],
            success=[etcdrpc.RequestOp(request_put=put)],
        )
        try:
            moved = (await self._backend.txn(request, what=f"extend lock {self.name!r}")).succeeded
        except BaseException:
            self._locks.forget(new)
            raise
        if not moved:
            self._locks.forget(new)
            return None
        self._lease, self._lease_ttl = new, new_ttl
        self._locks.forget(old)
        return LockGrant(self._revision, expires_at)
