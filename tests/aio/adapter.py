"""The async API behind the sync API's shape, so the sync conformance tests run on it.

Test-only: one event loop runs on a thread of its own, and every call of a
:class:`SyncView` client, lock or fence runs the async API's coroutine on that loop and
waits for it. The library itself starts no thread; this adapter does, so that the
conformance tests (written with threads) drive dcoord.aio unchanged; the tests' sync
2PC participants are called on threads too (:class:`ThreadedParticipant`). ``backend`` is the
backend of a sync client of the same URL and namespace, for the tests' inspection
helpers (``stored_keys``, ``backend.kv``), which read what the server holds.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar

import dcoord
import dcoord.aio
from dcoord.aio.election import _client_elections
from dcoord.election import Leader
from dcoord.errors import ConfigError
from dcoord.inspect import LockInfo
from tests.aio.membership_adapter import SyncGroup

T = TypeVar("T")


class Loop:
    """An event loop on a daemon thread; :meth:`run` runs a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="test-aio-loop", daemon=True
        )
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


class SyncView:
    """An :class:`dcoord.aio.AsyncClient` with the sync Client's methods."""

    def __init__(self, loop: Loop, url: Any, **options: Any) -> None:
        self._loop = loop
        self._url = url
        self._options = options

        async def connect() -> dcoord.aio.AsyncClient:
            return await dcoord.aio.connect(url, **options)

        self.aio = loop.run(connect())
        # Made at the first use of ``backend``: most tests never read the server
        # directly, and a second connection would add its own log records and traffic.
        self._shadow: dcoord.Client | None = None

    @property
    def backend(self) -> Any:
        if self._shadow is None:
            self._shadow = dcoord.connect(self._url, **self._options)
        return self._shadow.backend

    @property
    def settings(self) -> Any:
        return self.aio.settings

    def on_close(self, hook: Callable[[], object]) -> None:
        """The sync client's close hook (a plain function) as the async client's."""

        async def closer() -> None:
            hook()

        self.aio.on_close(closer)

    def __enter__(self) -> SyncView:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return repr(self.aio)

    @property
    def closed(self) -> bool:
        return self.aio.closed

    @property
    def namespace(self) -> str:
        return self.aio.namespace

    @property
    def url(self) -> str:
        return self.aio.url

    def lock(self, name: str, **options: Any) -> SyncLock:
        return SyncLock(self, functools.partial(self.aio.lock, name), options)

    def semaphore(self, name: Any, limit: Any, **options: Any) -> SyncLock:
        return SyncLock(self, functools.partial(self.aio.semaphore, name, limit), options)

    def rwlock(self, name: Any, **options: Any) -> SyncRWLock:
        return SyncRWLock(self, self.aio.rwlock(name, **options))

    def locks(self, prefix: str = "") -> list[LockInfo]:
        return self._loop.run(self.aio.locks(prefix))

    def group(self, name: str) -> SyncGroup:
        return SyncGroup(self, name)

    def election(self, name: str) -> SyncElection:
        return SyncElection(self, self.aio.election(name))

    @property
    def scheduler(self) -> PausedRenewals:
        """What the election tests close to make a client's leaders go silent."""
        return PausedRenewals(self)

    @property
    def _closers(self) -> list[Any]:
        return self.aio._closers

    def fence(self, resource: str) -> SyncFence:
        return SyncFence(self, self.aio.fence(resource))

    def ping(self) -> Any:
        return self._loop.run(self.aio.ping())

    def coordinator(self, participants: Any = (), **options: Any) -> SyncCoordinator:
        return _coordinator(self, participants, **options)

    @property
    def txlog(self) -> SyncTxLog:
        """The async client's 2PC log store, with the sync store's methods."""
        return SyncTxLog(self, self.aio.backend.txlog)

    def close(self) -> None:
        try:
            self._loop.run(self.aio.close())
        finally:
            if self._shadow is not None:
                self._shadow.close()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._loop.run(coro)


class SyncLock:
    """An :class:`dcoord.aio.AsyncLock` (or a semaphore permit, a read or write side:
    ``make(**options)`` makes it) with :class:`dcoord.Lock`'s methods."""

    def __init__(
        self, client: SyncView, make: Callable[..., dcoord.aio.AsyncLock], options: dict[str, Any]
    ) -> None:
        self._client = client
        on_lost: Callable[[SyncLock], object] | None = options.pop("on_lost", None)
        if on_lost is not None and callable(on_lost):
            user = on_lost
            options["on_lost"] = lambda _: user(self)
        elif on_lost is not None:
            options["on_lost"] = on_lost  # let the library refuse it
        self.aio = make(**options)

    @property
    def name(self) -> str:
        return self.aio.name

    @property
    def held(self) -> bool:
        return self.aio.held

    @property
    def fence(self) -> int:
        return self.aio.fence

    def info(self) -> LockInfo | None:
        return self._client.run(self.aio.info())

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        if not blocking:
            if timeout is not None and timeout != -1:
                raise ConfigError("a non-blocking acquire takes no timeout")
            timeout = 0
        return self._client.run(self.aio.acquire(timeout))

    def release(self) -> None:
        self._client.run(self.aio.release())

    def extend(self, ttl: float | None = None) -> None:
        self._client.run(self.aio.extend(ttl))

    def __enter__(self) -> SyncLock:
        self._client.run(self.aio.__aenter__())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._client.run(self.aio.__aexit__(exc_type, exc, tb))


class SyncRWLock:
    """An :class:`dcoord.aio.AsyncReadWriteLock` with :class:`dcoord.ReadWriteLock`'s
    methods: its handles are :class:`SyncLock` s."""

    def __init__(self, client: SyncView, rwlock: dcoord.aio.AsyncReadWriteLock) -> None:
        self._client = client
        self.aio = rwlock

    @property
    def name(self) -> str:
        return self.aio.name

    def read(self, **options: Any) -> SyncLock:
        return SyncLock(self._client, self.aio.read, options)

    def write(self, **options: Any) -> SyncLock:
        return SyncLock(self._client, self.aio.write, options)


class SyncFence:
    """An :class:`dcoord.aio.AsyncFence` with :class:`dcoord.Fence`'s methods."""

    def __init__(self, client: SyncView, fence: dcoord.aio.AsyncFence) -> None:
        self._client = client
        self.aio = fence

    def admit(self, token: int) -> bool:
        return self._client.run(self.aio.admit(token))

    def write(self, token: int, key: str, value: bytes) -> bool:
        return self._client.run(self.aio.write(token, key, value))

    def highest(self) -> int | None:
        return self._client.run(self.aio.highest())


class PausedRenewals:
    """``client.scheduler.close()`` of the sync tests, which stops a client's renewals
    as a pause would: here it cancels the renewal tasks of the async client's
    leaderships (their server records then expire) and, on etcd, the keep-alive tasks
    of its shared leases (which its candidates' keys are on)."""

    def __init__(self, client: SyncView) -> None:
        self._client = client

    def close(self) -> None:
        async def pause() -> None:
            for item in list(_client_elections(self._client.aio)._items):
                if isinstance(item, dcoord.aio.AsyncLeadership):
                    item._renewal.cancel()
            leases = getattr(self._client.aio.backend.locks, "leases", None)
            for keeper in [] if leases is None else leases._keepers.values():
                keeper.cancel()

        self._client.run(pause())


class SyncElection:
    """An :class:`dcoord.aio.AsyncElection` with :class:`dcoord.Election`'s methods."""

    def __init__(self, client: SyncView, election: dcoord.aio.AsyncElection) -> None:
        self._client = client
        self.aio = election
        self.name = election.name

    def campaign(self, value: Any = b"", **options: Any) -> SyncLeadership | None:
        user: Callable[[SyncLeadership], object] | None = options.pop("on_lost", None)
        holder: list[SyncLeadership] = []
        if user is not None and callable(user):
            options["on_lost"] = lambda _: user(holder[0])
        elif user is not None:
            options["on_lost"] = user  # let the library refuse it
        leadership = self._client.run(self.aio.campaign(value, **options))
        if leadership is None:
            return None
        holder.append(SyncLeadership(self, leadership))
        return holder[0]

    def leader(self) -> Leader | None:
        return self._client.run(self.aio.leader())

    def watch(self, callback: Callable[[Leader | None], object]) -> SyncElectionWatch:
        # The async watch is an iterator and takes no callback: this check is the
        # adapter's (it mirrors dcoord.Election.watch's message).
        if not callable(callback):
            raise ConfigError(f"watch callback must be callable, got {callback!r}")
        return SyncElectionWatch(self._client, self.aio.watch(), callback)


class SyncLeadership:
    """An :class:`dcoord.aio.AsyncLeadership` with :class:`dcoord.Leadership`'s methods."""

    def __init__(self, election: SyncElection, leadership: dcoord.aio.AsyncLeadership) -> None:
        self.election = election
        self._client = election._client
        self.aio = leadership
        self.term = leadership.term

    @property
    def held(self) -> bool:
        return self.aio.held

    @property
    def value(self) -> str:
        return self.aio.value

    @property
    def _slot(self) -> Any:
        """What the tests read of a sync etcd candidate (its key, its lease): the async
        candidate has both, as the sync one."""
        return self.aio._slot

    def proclaim(self, value: Any) -> None:
        self._client.run(self.aio.proclaim(value))

    def resign(self) -> bool:
        return self._client.run(self.aio.resign())

    def __enter__(self) -> SyncLeadership:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._client.run(self.aio.__aexit__(exc_type, exc, tb))


class SyncElectionWatch:
    """``async for`` over :meth:`dcoord.aio.AsyncElection.watch` in a task of the loop,
    calling the sync test's callback with each leader."""

    def __init__(
        self,
        client: SyncView,
        watch: dcoord.aio.AsyncLeaderWatch,
        callback: Callable[[Leader | None], object],
    ) -> None:
        self._client = client
        self.aio = watch

        async def follow() -> None:
            async for leader in watch:
                callback(leader)

        async def start() -> asyncio.Task[None]:
            return asyncio.get_running_loop().create_task(follow())

        self._task = client.run(start())

    def stop(self) -> None:
        async def stop() -> None:
            await self.aio.aclose()
            await self._task

        self._client.run(stop())


class ThreadedParticipant:
    """A sync test participant seen as a :class:`dcoord.aio.AsyncParticipant`: each call
    runs on a thread (``asyncio.to_thread``), so a participant that blocks (a gate, a
    stall) blocks only itself, as it does under the sync coordinator's pools."""

    def __init__(self, sync: Any) -> None:
        self.sync = sync
        self.name = sync.name
        if callable(getattr(sync, "validate", None)):
            self.validate = sync.validate
        if callable(getattr(sync, "in_doubt", None)):
            self.in_doubt = self._in_doubt

    async def prepare(self, txid: str, payload: Any) -> bool:
        vote: bool = await asyncio.to_thread(self.sync.prepare, txid, payload)
        return vote

    async def commit(self, txid: str) -> None:
        await asyncio.to_thread(self.sync.commit, txid)

    async def abort(self, txid: str) -> None:
        await asyncio.to_thread(self.sync.abort, txid)

    async def _in_doubt(self) -> list[str]:
        txids: list[str] = await asyncio.to_thread(self.sync.in_doubt)
        return txids


class SyncKV:
    """An :class:`dcoord.aio.AsyncKVParticipant` with :class:`dcoord.KVParticipant`'s
    methods; a coordinator of the adapter gets the async participant itself."""

    def __init__(self, client: SyncView, name: str, **options: Any) -> None:
        self._client = client
        self.aio = dcoord.aio.AsyncKVParticipant(client.aio, name, **options)
        self.name = name

    def get(self, key: str, default: Any = None) -> Any:
        return self._client.run(self.aio.get(key, default))

    def items(self) -> dict[str, Any]:
        return self._client.run(self.aio.items())

    def in_doubt(self) -> list[str]:
        return self._client.run(self.aio.in_doubt())

    def reserved(self) -> dict[str, str]:
        return self._client.run(self.aio.reserved())

    def validate(self, payload: Any) -> None:
        self.aio.validate(payload)

    def prepare(self, txid: str, payload: Any) -> bool:
        return self._client.run(self.aio.prepare(txid, payload))

    def commit(self, txid: str) -> None:
        self._client.run(self.aio.commit(txid))

    def abort(self, txid: str) -> None:
        self._client.run(self.aio.abort(txid))


def _participant(candidate: Any) -> Any:
    """Sync participants wrapped; anything else passed on for the library to refuse."""
    if isinstance(candidate, SyncKV):
        return candidate.aio
    methods = ("prepare", "commit", "abort")
    if all(callable(getattr(candidate, m, None)) for m in methods):
        return ThreadedParticipant(candidate)
    return candidate


def _coordinator(client: SyncView, participants: Any = (), **options: Any) -> SyncCoordinator:
    failpoint = options.pop("failpoint", None)
    if failpoint is not None:
        hook = failpoint

        async def threaded(point: str, txid: str, participant: str | None) -> None:
            # On a thread: a failpoint may block (gates) or call the coordinator back.
            await asyncio.to_thread(hook, point, txid, participant)

        options["failpoint"] = threaded
    options.pop("workers", None)  # the async coordinator has no pools to size
    coordinator = client.aio.coordinator([_participant(p) for p in participants], **options)
    # The sync coordinator checks the log's durability when made; the async one at its
    # first use or start(): start it here so the same assertions hold.
    client.run(coordinator.start())
    return SyncCoordinator(client, coordinator)


class SyncTxLog:
    """An async 2PC log store (:class:`dcoord.backends.aio_base.AsyncTxLogStore`) with the
    sync store's methods: each call runs the coroutine on the loop and waits."""

    def __init__(self, client: SyncView, store: Any) -> None:
        self._client = client
        self._store = store

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._store, name)
        return lambda *args, **options: self._client.run(method(*args, **options))


class SyncCoordinator:
    """An :class:`dcoord.aio.AsyncCoordinator` with :class:`dcoord.Coordinator`'s methods."""

    def __init__(self, client: SyncView, coordinator: dcoord.aio.AsyncCoordinator) -> None:
        self._client = client
        self.aio = coordinator

    @property
    def participants(self) -> dict[str, Any]:
        return self.aio.participants

    def begin(self, timeout: float = 30.0) -> SyncTransaction:
        return SyncTransaction(self._client, self.aio.begin(timeout))

    def transaction(self, timeout: float = 30.0) -> SyncTransaction:
        return self.begin(timeout)

    def resolve(self, txid: str) -> str:
        return self._client.run(self.aio.resolve(txid))

    def get(self, txid: str) -> Any:
        return self._client.run(self.aio.get(txid))

    @property
    def retention(self) -> float:
        return self.aio.retention

    def transactions(self, state: Any = None, **options: Any) -> Any:
        return self._client.run(self.aio.transactions(state, **options))

    def recover(self) -> Any:
        return self._client.run(self.aio.recover())

    def close(self) -> None:
        self._client.run(self.aio.close())


class SyncTransaction:
    """An :class:`dcoord.aio.AsyncTransaction` with :class:`dcoord.Transaction`'s methods."""

    def __init__(self, client: SyncView, tx: dcoord.aio.AsyncTransaction) -> None:
        self._client = client
        self.aio = tx

    @property
    def txid(self) -> str:
        return self.aio.txid

    @txid.setter
    def txid(self, value: str) -> None:
        self.aio.txid = value

    @property
    def state(self) -> str:
        return self.aio.state

    @property
    def record(self) -> Any:
        return self.aio.record

    @property
    def timeout(self) -> float:
        return self.aio.timeout

    @property
    def payloads(self) -> dict[str, Any]:
        return self.aio.payloads

    def enlist(self, name: str, payload: Any = None) -> None:
        self.aio.enlist(name, payload)

    def commit(self) -> Any:
        return self._client.run(self.aio.commit())

    def abort(self) -> None:
        self.aio.abort()

    def __enter__(self) -> SyncTransaction:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._client.run(self.aio.__aexit__(exc_type, exc, tb))
