"""Async fenced locks on etcd through ``grpc.aio`` and the stubs pyetcd ships.

The same recipe and keys as :mod:`.locks` (etcd's mutex: the holder is the key with the
lowest create revision under :func:`~dcoord.backends.etcd_names.etcd_lock_prefix`; the
fence is that create revision; waiters watch the delete of their predecessor, FIFO), so
sync clients, async clients and ``etcdctl lock`` queue in one line. gRPC errors become
dcoord errors in one place, :func:`dcoord.backends.etcd.mapped_error`, shared with the
sync backend; fenced writes are :func:`.locks.fenced_txn`.

Leases as the sync backend's: an auto-renewed lock's key goes on the client's shared
lease of its TTL (:mod:`.aio_leases`: one keep-alive task per lease, whatever the number
of keys on it), so its renewal sends nothing, and a lost shared lease loses every lock
on it (each sees it at its next renewal: its ``on_lost`` runs). Release deletes the key,
and so does a cancelled, timed-out or failed attempt (before the CancelledError or the
error goes on), the lease staying for the other keys. A lock without auto-renewal gets a
lease of its own that only its waiter keeps alive while it queues, so that it expires by
its own TTL (renewed by ``extend``: a keep-alive, or a move to a longer lease); its
release, and the end of an attempt on it, revoke that lease.

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
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import grpc.aio
from pyetcd import etcdrpc
from pyetcd.etcdrpc import rpc_pb2_grpc
from pyetcd.utils import prefix_range_end

from ... import metrics
from ...config import Settings
from ...errors import BackendUnavailable, ClientClosed, ConfigError, DcoordError, PermissionDenied
from ...inspect import identity_json
from ..aio_base import EXTEND_EACH, ExtendEach, with_retries_async
from ..base import LockGrant, ServerInfo, key_segment
from ..etcd_names import etcd_lock_prefix, namespace_prefix
from . import _ATTEMPTS, _MIN_ATTEMPT, _Retryable, mapped_error, stale_token
from .aio_kv import AsyncEtcdKV
from .aio_leases import AsyncLeases
from .aio_membership import AsyncEtcdGroups
from .aio_txlog import AsyncEtcdTxLog
from .leases import Lease, LeaseNotFound, lease_seconds
from .locks import (
    _CLEANUP_INTERVAL,
    _created_at,
    _first_kv,
    _range,
    cut_short,
    delete_txn,
    deleted,
    fenced_txn,
    removal_outcome,
    request_budget,
)

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
    """The async lock store of one etcd backend, and the requests on leases its slots,
    its shared leases (:class:`.aio_leases.AsyncLeases`), members and log records use."""

    def __init__(self, backend: AsyncEtcdBackend) -> None:
        self.backend = backend
        self.prefix = backend.prefix
        self.namespace = backend.settings.namespace
        self.label: str | None = backend.settings.options["label"]
        self.leases = AsyncLeases(self)
        self._serial = itertools.count(1)
        self._cleanups: set[asyncio.Task[None]] = set()
        # The private leases of acquires queued now (not granted, not forgotten): an
        # acquire in progress when its client closes is no primitive the client can let
        # go of, so close() revokes its lease (and key) before the channels go. Keys on
        # shared leases go with those, which close() revokes too.
        self._queued: set[int] = set()
        self._closing = False

    def next_serial(self) -> int:
        return next(self._serial)

    def slot(
        self, name: str, ttl: float, auto_renew: bool, fair: bool = False
    ) -> AsyncEtcdLockSlot:
        # Every etcd lock is fair already (``fair`` changes nothing): the mutex recipe
        # queues by create revision, as the sync store's.
        return AsyncEtcdLockSlot(self, name, ttl, auto_renew)

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

    async def grant_lease(self, ttl: float, *, timeout: float | None = None) -> Lease:
        """A new lease that nobody keeps alive (for keys that must expire on their own),
        granted within ``timeout`` (default: the request timeout). ClientClosed once the
        store closes: nobody would revoke it."""
        seconds = lease_seconds(ttl)
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
        return Lease(int(reply.ID), int(reply.TTL), sent)

    async def grant(self, ttl: float, *, timeout: float | None = None) -> tuple[int, int, float]:
        """:meth:`grant_lease` as its id, the TTL etcd granted, and when it surely expires
        (for the stores that track a lease by its id: log records)."""
        lease = await self.grant_lease(ttl, timeout=timeout)
        return lease.id, lease.ttl, lease.expires_at

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
        """Revoke ``lease`` (deleting its keys); False if it had already expired."""
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
        return removal_outcome(await backend.call(revoke, what=what, retry=True), attempts, what)

    async def delete(self, key: bytes, revision: int, lease: Lease, private: bool) -> bool:
        """Delete queue ``key`` if it is still the one created at ``revision``; True if
        it was. A private lease is revoked instead, which deletes its key."""
        if private:
            revoked = await self.revoke(lease.id)
            self._queued.discard(lease.id)
            lease.mark_lost()  # the server has it no more, whoever removed it
            return revoked
        attempts = 0
        request = delete_txn(key, revision)
        backend = self.backend

        async def delete() -> bool:
            nonlocal attempts
            attempts += 1
            return deleted(
                await backend.kv.Txn(request, timeout=backend.timeout, metadata=backend.metadata)
            )

        what = f"delete lock key {key.decode()}"
        return removal_outcome(await backend.call(delete, what=what, retry=True), attempts, what)

    def queued(self, lease: int, queued: bool) -> None:
        """An acquire is queued on private ``lease`` (True), or no longer (False: it holds
        the lock, or has forgotten the lease)."""
        if queued:
            self._queued.add(lease)
        else:
            self._queued.discard(lease)

    def forget(self, lease: int) -> asyncio.Task[None]:
        """Revoke ``lease`` in a task (after a cancellation or a failure): its keys go
        with it. Retried until the lease is gone or the client closes."""
        self._queued.discard(lease)
        return self._cleanup(self._revoke_until_gone(lease))

    def remove(self, key: bytes, revision: int, lease: Lease, private: bool) -> asyncio.Task[None]:
        """Remove queue ``key`` in a task (a timed-out, cancelled or failed attempt, a
        release that failed): the revoke of its private lease, or the delete of the key
        from a shared one, retried until it is gone or the client closes. A key left on a
        shared lease would block the lock for as long as the client lives."""
        if private:
            return self.forget(lease.id)
        return self._cleanup(self._delete_until_gone(key, revision, lease))

    def clean_up(
        self, what: str, remove: Callable[[], Awaitable[bool]], gone: Callable[[], bool]
    ) -> asyncio.Task[None]:
        """:meth:`_until_removed` in a task that :meth:`close` waits for (the undo of a
        member's join, :mod:`.aio_membership`)."""
        return self._cleanup(self._until_removed(what, remove, gone))

    def _cleanup(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        return task

    async def _revoke_until_gone(self, lease: int) -> None:
        async def revoke() -> bool:
            await self.revoke(lease)  # revoked, or expired already: gone either way
            return True

        await self._until_removed(f"lease {lease:x}", revoke, lambda: False)

    async def _delete_until_gone(self, key: bytes, revision: int, lease: Lease) -> None:
        """Delete ``key``; one whose creation is unknown (revision 0: the reply to its put
        was lost) is deleted once more a second after a delete found nothing, since its
        put may have reached the server behind that delete (as :meth:`EtcdLocks.forget`)."""
        unsure = revision == 0

        async def delete() -> bool:
            nonlocal unsure
            if await self.delete(key, revision, lease, False) or not unsure:
                return True
            unsure = False
            await asyncio.sleep(_CLEANUP_INTERVAL)
            return False

        await self._until_removed(f"lock key {key.decode()}", delete, lease.lost.is_set)

    async def _until_removed(
        self, what: str, remove: Callable[[], Awaitable[bool]], gone: Callable[[], bool]
    ) -> None:
        """Run ``remove`` until it answers (True: done, False: run it again at once),
        backing off while the server is unavailable; until ``gone()`` says there is
        nothing left to remove (a key whose lease is lost) or the client closes."""
        delay = 0.05
        while not gone():
            try:
                if await remove():
                    return
                continue
            except ClientClosed as exc:  # close() has revoked the leases already, if it could
                log.info("%s not removed: %s", what, exc)
                return
            except BackendUnavailable as exc:
                log.info("could not remove %s yet: %s", what, exc)
            except DcoordError as exc:  # refused: retrying cannot help; the lease TTL will
                log.warning("could not remove %s: %s", what, exc)
                return
            except Exception as exc:  # the client closed its channels: the TTL covers it
                if not self.backend._closed:
                    raise
                log.info("%s not removed (the client closed): %r", what, exc)
                return
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)

    async def close(self) -> None:
        """Revoke the client's shared leases (every key on them goes) and the private
        leases of the acquires still queued, and finish the pending removals (each
        bounded by the request timeout and retries), so that no queue key outlives the
        client longer than needed. No lease is granted from now on."""
        self._closing = True
        for lease in list(self._queued):
            self.forget(lease)
        await self.leases.close()
        if self._cleanups:
            _, pending = await asyncio.wait(
                set(self._cleanups), timeout=self.backend.settings.request_timeout
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


class AsyncEtcdLockSlot:
    """One async handle's place in one lock's queue: a key on the client's shared lease
    of its TTL (auto-renewed), or on a private lease (without auto-renewal)."""

    def __init__(
        self,
        locks: AsyncEtcdLocks,
        name: str,
        ttl: float,
        auto_renew: bool,
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
        # As the sync slot (locks.py): a lock nobody renews must expire by its own TTL,
        # which a shared lease (kept alive for as long as the client lives) never does.
        self._private = not auto_renew
        self._key: bytes | None = None
        self._revision = 0
        self._lease: Lease | None = None

    def _owner_range(self) -> Any:
        return _range(
            self.prefix,
            self._range_end,
            sort_order=etcdrpc.RangeRequest.ASCEND,
            sort_target=etcdrpc.RangeRequest.CREATE,
            limit=1,
            keys_only=True,
        )

    # -- acquire -------------------------------------------------------------------

    async def acquire(self, deadline: float | None) -> LockGrant | None:
        # As EtcdLockSlot.acquire: a wait ends at its deadline even while the server
        # hangs (each request bounded by it), and a request it cuts short is a timeout.
        bound = deadline if deadline is not None and time.monotonic() < deadline else None
        while True:
            try:
                key, revision, lease, ready = await self._join(bound)
            except BackendUnavailable:
                if cut_short(bound):
                    return None  # what it may have left is being removed in a task
                raise
            try:
                outcome = "acquired"
                if not ready:
                    outcome = await self._wait(key, revision, lease, deadline, bound)
            except BackendUnavailable as exc:
                if not cut_short(bound):
                    await self._forget(key, revision, lease, exc, bound)
                    raise
                outcome = "timeout"
            except BaseException as exc:
                # Failed or cancelled (CancelledError included): the key is removed before
                # the error goes on (a second cancellation leaves that to its task).
                await self._forget(key, revision, lease, exc, bound)
                raise
            if outcome == "acquired":
                if self._private:
                    self._locks.queued(lease.id, False)
                self._key, self._revision, self._lease = key, revision, lease
                return LockGrant(revision, lease.expires_at)
            # Timed out, or our key is gone (or presumed gone with its lease).
            await self._forget(key, revision, lease, None, bound)
            if outcome == "timeout":
                return None
            log.info("lock %r: queue key %s expired while waiting; queueing again", self.name, key)

    def _budget(self, bound: float | None) -> float | None:
        """The time the next request may take (None: the request timeout)."""
        if bound is None:
            return None
        return request_budget(bound, self._backend.settings.request_timeout)

    async def _forget(
        self,
        key: bytes,
        revision: int,
        lease: Lease,
        error: BaseException | None,
        bound: float | None,
    ) -> None:
        """Remove our queue ``key`` (its private lease, or the key from the shared one)
        in a task, and wait for it: with a deadline, after a timeout (``error`` None) or
        a failure that deadline cut short, only until it (then the task goes on, close()
        waits for it: the caller's time is up); after a failure or a cancellation, until
        it is done."""
        timeout = None
        if error is None or (isinstance(error, BackendUnavailable) and cut_short(bound)):
            timeout = self._budget(bound)
        await asyncio.wait(
            {self._locks.remove(key, revision, lease, self._private)}, timeout=timeout
        )

    async def _new_lease(self, bound: float | None) -> Lease:
        timeout = self._budget(bound)
        if self._private:
            lease = await self._locks.grant_lease(self._ttl, timeout=timeout)
            self._locks.queued(lease.id, True)
            return lease
        return await self._locks.leases.lease(self._ttl, timeout=timeout)

    def _new_key(self, lease: Lease) -> bytes:
        """A key of ours, new on ``lease`` (unique per client by the serial)."""
        return self.prefix + f"{lease.id:016x}-{self._locks.next_serial():x}".encode()

    async def _join(self, bound: float | None) -> tuple[bytes, int, Lease, bool]:
        """Put a new key of ours in the queue: it, its create revision, its lease, and
        whether it holds the lock at once.

        A shared lease the server dropped unnoticed fails the put (nothing written): then
        queue once more on a fresh lease, as the sync slot (:meth:`.leases.Leases.attached`).
        """
        lease = await self._new_lease(bound)
        try:
            return await self._create(lease, bound)
        except LeaseNotFound:
            lease.mark_lost()
        return await self._create(await self._new_lease(bound), bound)

    async def _create(self, lease: Lease, bound: float | None) -> tuple[bytes, int, Lease, bool]:
        """:meth:`_join` on ``lease``; if the put fails, make sure its key is gone (its
        reply may be what was lost) before its error goes on."""
        key = self._new_key(lease)
        try:
            revision, ready = await self._enqueue(key, lease, bound)
        except LeaseNotFound:
            if self._private:
                self._locks.queued(lease.id, False)
            raise  # nothing was written: the put needs the lease
        except PermissionDenied as exc:
            # A denied txn wrote nothing: deleting the key would only be denied too. A
            # private lease (which holds no key) is still revoked.
            if self._private:
                await self._forget(key, 0, lease, exc, bound)
            raise
        except BaseException as exc:
            # The put may have happened with its reply lost: remove the key for sure.
            await self._forget(key, 0, lease, exc, bound)
            raise
        return key, revision, lease, ready

    async def _enqueue(self, key: bytes, lease: Lease, bound: float | None) -> tuple[int, bool]:
        """Create ``key`` on ``lease`` (idempotent: a retry finds it); return its create
        revision and whether it holds the lock at once."""
        value = self.value
        if value is None:
            value = identity_json(self._locks.label, time.time())
        put = etcdrpc.PutRequest(key=key, value=value)
        put.lease = lease.id
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
        return revision, owner is None or owner.create_revision == revision

    async def _wait(
        self, key: bytes, revision: int, lease: Lease, deadline: float | None, bound: float | None
    ) -> str:
        """Wait for our turn: "acquired", "timeout", or "requeue" (our key, or its lease,
        is gone)."""
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
            if deadline is not None and time.monotonic() >= deadline:
                return "timeout"
            if not lease.usable:
                return "requeue"
            response = await self._backend.txn(
                check, what=f"wait for lock {self.name!r}", retry=True, timeout=self._budget(bound)
            )
            mine, owner, predecessor = (_first_kv(r) for r in response.responses)
            if mine is None:
                return "requeue"
            if owner is not None and owner.create_revision == revision:
                return "acquired"
            if predecessor is None:
                continue
            await self._wait_deleted(
                predecessor.key, response.header.revision + 1, lease, deadline, bound
            )

    async def _wait_deleted(
        self,
        key: bytes,
        from_revision: int,
        lease: Lease,
        deadline: float | None,
        bound: float | None,
        range_end: bytes = b"",
    ) -> None:
        """Return when ``key`` (with ``range_end``: a key of that range) is deleted
        (after ``from_revision``), at the deadline, or when our lease is gone; keeps a
        private lease alive meanwhile."""
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
                    # Look up at a third of what is left of our lease: to keep a private
                    # one alive, to notice a shared one (which the client keeps alive)
                    # lost, and to notice the member of the watch given up.
                    wait = max(0.05, (lease.expires_at - time.monotonic()) / 3)
                    if deadline is not None:
                        wait = min(wait, deadline - time.monotonic())
                        if wait <= 0:
                            return
                    await asyncio.wait({reader}, timeout=wait)
                    if reader.done():
                        break
                    if deadline is not None and time.monotonic() >= deadline:
                        return  # no keep-alive past it: the caller times out
                    if not lease.usable or (
                        self._private
                        and not await self._locks.leases.keep_alive(
                            lease, timeout=self._budget(bound)
                        )
                    ):
                        return  # our key went with the lease: the caller queues again
                    if backend.member != member:
                        # The watch's member was given up (it may hang, and its watch
                        # stay silent): re-check, and watch again on the member in use.
                        return
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

    @staticmethod
    async def _deleted(watch: Any) -> None:
        """Read the watch until an event (the delete) or a cancel (compaction: the caller
        re-checks at once)."""
        while True:
            reply = await watch.read()
            if reply is grpc.aio.EOF or reply.events or reply.canceled or reply.compact_revision:
                return

    # -- release / extend ----------------------------------------------------------

    async def release(self) -> bool:
        key, lease, self._key, self._lease = self._key, self._lease, None, None
        if key is None or lease is None:
            return False
        try:
            return await self._locks.delete(key, self._revision, lease, self._private)
        except BackendUnavailable:
            self._locks.remove(key, self._revision, lease, self._private)
            raise

    def renewal_batch(self) -> ExtendEach | None:
        """Locks on a shared lease renew together in one task (renewing one sends
        nothing: the client keeps the lease alive); a private lease renews alone."""
        return None if self._private else EXTEND_EACH

    async def extend(self, ttl: float) -> LockGrant | None:
        lease = self._lease
        if self._key is None or lease is None or lease.lost.is_set():
            return None
        if not self._private:
            # The client keeps the shared lease alive; the lock lasts as long as it does.
            return LockGrant(self._revision, lease.expires_at)
        if ttl <= lease.ttl:
            if not await self._locks.leases.keep_alive(lease):
                return None
            return LockGrant(self._revision, lease.expires_at)
        return await self._move_to_new_lease(ttl, lease)

    async def _move_to_new_lease(self, ttl: float, old: Lease) -> LockGrant | None:
        # As EtcdLockSlot._move_to_new_lease: a lease's TTL cannot grow, so the key moves
        # to a longer lease; a put keeps its create revision (the fence, the queue order).
        assert self._key is not None
        new = await self._locks.grant_lease(ttl)
        put = etcdrpc.PutRequest(key=self._key, ignore_value=True)
        put.lease = new.id
        request = etcdrpc.TxnRequest(
            compare=[_created_at(self._key, self._revision)],
            success=[etcdrpc.RequestOp(request_put=put)],
        )
        try:
            moved = (await self._backend.txn(request, what=f"extend lock {self.name!r}")).succeeded
        except BaseException:
            self._locks.forget(new.id)
            raise
        if not moved:
            self._locks.forget(new.id)
            return None
        self._lease = new
        self._locks.forget(old.id)
        return LockGrant(self._revision, new.expires_at)
