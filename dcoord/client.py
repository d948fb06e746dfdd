"""The Client: one connected backend, its namespace, and its background scheduler."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any

from . import inspect
from .backends import Backend, ServerInfo, open_backend, registry
from .config import Settings, settings_from
from .election import Election
from .errors import ClientClosed, ConfigError
from .fence import Fence
from .inspect import LockInfo
from .lock import DEFAULT_TTL, Lock, OnLost
from .logfields import client_fields
from .membership import Group
from .rwlock import ReadWriteLock
from .scheduler import Scheduler
from .semaphore import Semaphore
from .twopc import Coordinator, Participant

log = logging.getLogger("dcoord")


class Client:
    """A connection to one backend under one namespace.

    Create it with :func:`dcoord.connect`. Everything a client makes (locks, members,
    transactions) is kept alive by its single background thread and released by
    :meth:`close`, which the ``with`` statement calls for you.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.scheduler = Scheduler(name=f"dcoord-{settings.kind}-{settings.namespace}")
        log.info(
            "connecting to %s (connect_timeout %g s)",
            settings.url,
            settings.connect_timeout,
            extra=client_fields(settings),
        )
        self.capabilities = registry.driver(settings.kind).capabilities
        """What the backend can do (see :class:`~dcoord.backends.registry.Capabilities`)."""
        self.backend: Backend = open_backend(settings, self.scheduler)
        log.info("connected to %s", settings.url, extra=client_fields(settings))
        self._closers: list[Callable[[], None]] = []
        self._close_lock = threading.Lock()
        self.closed = False

    @property
    def namespace(self) -> str:
        """Every key this client writes lives under this namespace."""
        return self.settings.namespace

    @property
    def url(self) -> str:
        """The backend URL, without any password."""
        return self.settings.url

    def check_open(self) -> None:
        """Raise :class:`~dcoord.ClientClosed` once :meth:`close` has begun."""
        if self.closed:
            raise ClientClosed(f"client {self.url} is closed")

    def _check(self, primitive: str) -> None:
        """:meth:`check_open`, and raise ConfigError if the backend lacks ``primitive``."""
        self.check_open()
        if primitive not in self.capabilities.primitives:
            raise ConfigError(
                f"the {self.settings.kind} backend has no {primitive}; it provides "
                f"{', '.join(sorted(self.capabilities.primitives))}"
            )

    def ping(self) -> ServerInfo:
        """Ask the server for its kind and version (raises BackendUnavailable if it is gone)."""
        self.check_open()
        return self.backend.ping()

    def lock(
        self,
        name: str,
        ttl: float = DEFAULT_TTL,
        timeout: float | None = None,
        auto_renew: bool = True,
        on_lost: OnLost | None = None,
        fair: bool = False,
    ) -> Lock:
        """A handle on the distributed lock ``name`` (nothing is written until acquired).

        ``ttl``: seconds the lock outlives a holder that stops renewing (default 30).
        ``timeout``: how long ``with lock:`` / ``acquire()`` wait (None: for ever).
        ``auto_renew``: extend the held lock every ttl/3 from the client's scheduler
        thread. ``on_lost(lock)``: called if a held lock is lost. ``fair``: grant in
        arrival order (FIFO); etcd locks always are, Redis queues waiters for it, and on
        memory waiters queue in the process (docs/locks.md). See :class:`Lock`.
        """
        self._check("locks")
        return Lock(
            self,
            name,
            ttl=ttl,
            timeout=timeout,
            auto_renew=auto_renew,
            on_lost=on_lost,
            fair=fair,
        )

    def locks(self, prefix: str = "") -> list[LockInfo]:
        """The locks held now in this namespace whose names start with ``prefix``, by
        name: holder (host:pid and the ``label`` option of its client), fence, acquired
        at, TTL left and waiters (see :class:`~dcoord.inspect.LockInfo` for what each
        backend can tell)."""
        self._check("locks")
        return inspect.locks(self.backend, prefix)

    def fence(self, resource: str) -> Fence:
        """The fencing guard of ``resource``: ``fence(resource).admit(lock.fence)``."""
        self._check("locks")
        return Fence(self, resource)

    def election(self, name: str) -> Election:
        """The leader election ``name``: ``campaign()`` to lead it (a fenced, renewed
        :class:`~dcoord.election.Leadership`), ``leader()`` / ``watch()`` to follow it."""
        self._check("elections")
        return Election(self, name)

    def group(self, name: str) -> Group:
        """The membership group ``name``: join it, list or watch its members, or follow
        it with a live consistent-hash ring (see :mod:`dcoord.membership`)."""
        self._check("groups")
        return Group(self, name)

    def coordinator(self, participants: Iterable[Participant] = (), **options: Any) -> Coordinator:
        """A two-phase-commit coordinator over ``participants``, logging in this backend.

        Options: ``retention`` (seconds finished records are kept, default 1 hour),
        ``phase2_timeout`` (how long commit/abort is retried per call before it is left
        to ``recover()``, default 5 s), ``workers`` (size of each of the prepare and
        phase-2 thread pools), ``clock`` and ``max_clock_skew`` (where the backend has
        no clock, as on etcd: this host's wall clock, and how far past a deadline an
        undecided transaction waits before it is presumed aborted, default 1 s). Warns with
        :class:`~dcoord.errors.DurabilityWarning` (or refuses, with the ``require_durable``
        option) when the backend would not keep decisions through a server crash.
        """
        self._check("txlog")
        return Coordinator(self, participants, **options)

    def semaphore(
        self,
        name: str,
        limit: int,
        ttl: float = DEFAULT_TTL,
        timeout: float | None = None,
        auto_renew: bool = True,
        on_lost: OnLost | None = None,
    ) -> Semaphore:
        """A handle on one permit of the counting semaphore ``name``: at most ``limit``
        handles hold it at once. Options as for :meth:`lock`; see :class:`Semaphore`."""
        self._check("semaphores")
        return Semaphore(
            self, name, limit, ttl=ttl, timeout=timeout, auto_renew=auto_renew, on_lost=on_lost
        )

    def rwlock(
        self, name: str, ttl: float = DEFAULT_TTL, timeout: float | None = None
    ) -> ReadWriteLock:
        """The read-write lock ``name``: ``.read()`` / ``.write()`` make holder handles
        (many readers or one writer; a waiting writer blocks new readers). See
        :class:`ReadWriteLock`."""
        self._check("rwlocks")
        return ReadWriteLock(self, name, ttl=ttl, timeout=timeout)

    def on_close(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` when the client closes (before the connection goes), newest first.

        Raises :class:`~dcoord.ClientClosed` if the client is already closing: ``fn``
        would never run.
        """
        with self._close_lock:
            self.check_open()
            self._closers.append(fn)

    def close(self) -> None:
        """Release what the client holds, stop background work, and disconnect. Idempotent
        and thread-safe: the first call closes, a concurrent or later one returns at once.

        In this order, each step whatever the previous ones raised: the primitives (close
        hooks, newest first: locks released, members left, coordinators drained), then
        the backend's stores (:meth:`~dcoord.backends.base.Backend.close_stores`: their
        notifier threads and shared leases), then the scheduler (background work; runs
        in progress end), then the connection, which nothing uses any more. A failing
        close hook is logged at warning with its traceback, not raised: each hook cleans
        up something of its own, and the server drops what a failed one held when its
        TTL runs out.
        """
        with self._close_lock:
            if self.closed:
                return
            self.closed = True
            closers = self._closers[::-1]
        # An ExitStack runs its callbacks newest first, each even if one before it raised.
        with contextlib.ExitStack() as stack:
            stack.callback(self.backend.close)
            stack.callback(self.scheduler.close)
            stack.callback(self.backend.close_stores)
            for fn in closers:
                try:
                    fn()
                except Exception:
                    log.warning(
                        "close hook %r of %s failed",
                        fn,
                        self.url,
                        exc_info=True,
                        extra=client_fields(self.settings),
                    )

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<dcoord.Client {self.url} namespace={self.namespace!r}>"


def connect(
    url: str | Mapping[str, Any] | None = None, *, namespace: str | None = None, **options: Any
) -> Client:
    """Connect to the backend a URL (or a config mapping, or ``DCOORD_URL``) names.

    With no URL and no ``DCOORD_URL`` the embedded ``memory://`` backend is used.
    Raises :class:`~dcoord.ConfigError` for bad configuration and
    :class:`~dcoord.BackendUnavailable` when the server does not answer within
    ``connect_timeout`` seconds (default 5).
    """
    if namespace is not None:
        options["namespace"] = namespace
    return Client(settings_from(url, **options))
