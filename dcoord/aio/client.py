"""The AsyncClient: one async backend, its namespace, and the tasks of its locks."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterable, Mapping
from types import TracebackType
from typing import Any

from .. import inspect
from ..backends import registry
from ..backends.aio_base import AsyncBackend
from ..backends.base import ServerInfo
from ..config import Settings, settings_from
from ..errors import ClientClosed
from ..inspect import LockInfo
from ..lock import DEFAULT_TTL
from ..logfields import client_fields
from .election import AsyncElection
from .fence import AsyncFence
from .lock import AsyncLock, OnLost
from .membership import AsyncGroup
from .participants import AsyncParticipant
from .rwlock import AsyncReadWriteLock
from .semaphore import AsyncSemaphore
from .twopc import AsyncCoordinator

log = logging.getLogger("dcoord")


def _open(settings: Settings) -> AsyncBackend:
    """The async backend of ``settings``, from its registered driver (not connected yet:
    see AsyncClient.start)."""
    backend: AsyncBackend = registry.driver(settings.kind).load(asynchronous=True)(settings)
    return backend


class AsyncClient:
    """A connection to one backend under one namespace, for asyncio code.

    Made by :func:`connect`; ``async with`` (or ``await``) connects it, :meth:`close`
    releases the locks it holds, cancels its tasks (renewals, pub/sub reader, cleanups)
    and disconnects. Use it from one event loop: its tasks run on that loop.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.backend: AsyncBackend = _open(settings)
        self.closed = False
        self._started = False
        self._held: set[AsyncLock] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._coordinators: list[AsyncCoordinator] = []
        self._closers: list[Callable[[], Awaitable[None]]] = []

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

    async def start(self) -> AsyncClient:
        """Connect now (within ``connect_timeout``), so a bad URL or a server that does
        not answer fails here rather than at the first lock; idempotent."""
        self.check_open()
        if not self._started:
            # The sync client's records (docs/observability.md), with the same fields.
            log.info(
                "connecting to %s (connect_timeout %g s)",
                self.url,
                self.settings.connect_timeout,
                extra=client_fields(self.settings),
            )
            await self.backend.start()
            log.info("connected to %s", self.url, extra=client_fields(self.settings))
            self._started = True
        return self

    def __await__(self) -> Generator[Any, None, AsyncClient]:
        return self.start().__await__()

    async def ping(self) -> ServerInfo:
        """Ask the server for its kind and version (raises BackendUnavailable if gone)."""
        self.check_open()
        return await self.backend.ping()

    def lock(
        self,
        name: str,
        ttl: float = DEFAULT_TTL,
        timeout: float | None = None,
        auto_renew: bool = True,
        on_lost: OnLost | None = None,
        fair: bool = False,
    ) -> AsyncLock:
        """A handle on the distributed lock ``name``, as :meth:`dcoord.Client.lock`
        (``on_lost`` may be a plain function or a coroutine function; ``fair``: grant in
        arrival order, in one queue with the sync clients' fair waiters)."""
        self.check_open()
        return AsyncLock(
            self, name, ttl=ttl, timeout=timeout, auto_renew=auto_renew, on_lost=on_lost, fair=fair
        )

    def semaphore(
        self,
        name: str,
        limit: int,
        ttl: float = DEFAULT_TTL,
        timeout: float | None = None,
        auto_renew: bool = True,
        on_lost: OnLost | None = None,
    ) -> AsyncSemaphore:
        """A handle on one permit of the counting semaphore ``name`` (at most ``limit``
        holders at once), as :meth:`dcoord.Client.semaphore`; see :class:`AsyncSemaphore`."""
        self.check_open()
        return AsyncSemaphore(
            self, name, limit, ttl=ttl, timeout=timeout, auto_renew=auto_renew, on_lost=on_lost
        )

    def rwlock(
        self, name: str, ttl: float = DEFAULT_TTL, timeout: float | None = None
    ) -> AsyncReadWriteLock:
        """The read-write lock ``name``, as :meth:`dcoord.Client.rwlock`: make handles
        with ``.read()`` and ``.write()``; see :class:`AsyncReadWriteLock`."""
        self.check_open()
        return AsyncReadWriteLock(self, name, ttl=ttl, timeout=timeout)

    async def locks(self, prefix: str = "") -> list[LockInfo]:
        """The locks held now in this namespace whose names start with ``prefix``, by
        name, as :meth:`dcoord.Client.locks` (sync and async holders alike)."""
        self.check_open()
        lister = inspect.backend_part(self.backend.kind, asynchronous=True).locks
        return inspect.by_name(await lister(self.backend, prefix))

    async def groups(self) -> list[str]:
        """The names of the groups that have (or recently had) members in the namespace,
        sorted, as ``dcoord status`` lists them (:func:`dcoord.inspect.groups`); read a
        group's live members with ``await client.group(name).members()``."""
        self.check_open()
        lister = inspect.backend_part(self.backend.kind, asynchronous=True).groups
        return sorted(await lister(self.backend))

    def fence(self, resource: str) -> AsyncFence:
        """The fencing guard of ``resource``: ``await fence(resource).admit(lock.fence)``."""
        self.check_open()
        return AsyncFence(self, resource)

    def coordinator(
        self, participants: Iterable[AsyncParticipant] = (), **options: Any
    ) -> AsyncCoordinator:
        """A two-phase-commit coordinator over async ``participants``, logging in this
        backend (the log sync coordinators use); options as
        :meth:`dcoord.Client.coordinator` but ``workers``. Closes with the client."""
        self.check_open()
        coordinator = AsyncCoordinator(self, participants, **options)
        self._coordinators.append(coordinator)
        return coordinator

    def group(self, name: str) -> AsyncGroup:
        """The group ``name`` in this client's namespace (see :class:`AsyncGroup`)."""
        self.check_open()
        return AsyncGroup(self, name)

    def election(self, name: str) -> AsyncElection:
        """The leader election ``name`` in this client's namespace (see
        :class:`AsyncElection`); sync clients campaign in the same election."""
        self.check_open()
        return AsyncElection(self, name)

    def on_close(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Await ``closer()`` when the client closes, before it disconnects.

        Raises ClientClosed once the client is closed (the hook would never run)."""
        self.check_open()
        self._closers.append(closer)

    def _holding(self, lock: AsyncLock, held: bool) -> None:
        if held:
            self._held.add(lock)
        else:
            self._held.discard(lock)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``coro`` (a lock's on_lost) as a task of this client, cancelled at close."""
        task = asyncio.get_running_loop().create_task(coro, name=f"dcoord lock {name!r}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Release held locks (best effort: their TTL covers the rest), cancel the
        client's tasks, then disconnect. Idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            await asyncio.gather(*(c.close() for c in self._coordinators))
            # Newest first, as the sync client; a failing hook is logged, not raised, and
            # stops no other: each cleans up its own, and the TTLs cover a failed one.
            closers, self._closers = self._closers[::-1], []
            outcomes = await asyncio.gather(*(c() for c in closers), return_exceptions=True)
            for closer, outcome in zip(closers, outcomes, strict=True):
                if isinstance(outcome, Exception):
                    log.warning(
                        "close hook %r of %s failed",
                        closer,
                        self.url,
                        exc_info=outcome,
                        extra=client_fields(self.settings),
                    )
            locks, self._held = list(self._held), set()
            await asyncio.gather(*(lock._abandon() for lock in locks))
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            await self.backend.close()

    async def __aenter__(self) -> AsyncClient:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<dcoord.aio.AsyncClient {self.url} namespace={self.namespace!r}>"


def connect(
    url: str | Mapping[str, Any] | None = None, *, namespace: str | None = None, **options: Any
) -> AsyncClient:
    """An async client of the backend a URL (or mapping, or ``DCOORD_URL``) names.

    Configuration as :func:`dcoord.connect` (raises ConfigError at once). Use it as
    ``async with dcoord.aio.connect(url) as client:`` or ``client = await connect(url)``;
    both connect within ``connect_timeout`` or raise BackendUnavailable.
    """
    if namespace is not None:
        options["namespace"] = namespace
    return AsyncClient(settings_from(url, **options))
