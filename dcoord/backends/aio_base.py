"""The async side of the backend boundary: the protocols :mod:`dcoord.aio` drives.

They mirror :mod:`.base` (same names, same semantics, same typed errors) with
coroutines in place of blocking calls. An async store does its I/O natively on the
caller's event loop (redis.asyncio, grpc.aio, or the memory store's own wake-ups):
no thread pool, no background thread.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Protocol, TypeVar, runtime_checkable

from ..errors import BackendUnavailable
from .base import GroupChange, GroupSnapshot, LockGrant, LogEntry, Renewed, ServerInfo
from .election_base import LeaderRecord

T = TypeVar("T")

# Jittered exponential backoff of async retries, as base.with_retries (tenacity's
# wait_random_exponential(multiplier=0.05, max=1.0)).
RETRY_FIRST = 0.05
RETRY_MAX = 1.0


class AsyncLockSlot(Protocol):
    """One async lock handle's state on the backend; see :class:`.base.LockSlot`.

    A cancelled :meth:`acquire` leaves nothing of its attempt behind (no grant, no
    queue entry, no registered waiter), as one that timed out.
    """

    async def acquire(self, deadline: float | None) -> LockGrant | None: ...

    async def release(self) -> bool: ...

    async def extend(self, ttl: float) -> LockGrant | None: ...


class AsyncRenewalBatch(Protocol):
    """Extends many slots of one store at once; see :class:`.base.RenewalBatch`.

    A slot that can join one has a method ``renewal_batch() -> AsyncRenewalBatch | None``
    (optional: :mod:`dcoord.aio.renewals` renews slots without it one task each); slots
    whose renewals may share a round trip return the same batch object.
    """

    async def extend_many(self, requests: Sequence[tuple[AsyncLockSlot, float]]) -> list[Renewed]:
        """``await slot.extend(ttl)`` of each ``(slot, ttl)``, sent together; per request
        its grant, None (not held) or the error its own ``extend`` would have raised.
        Raises only if the round trip as a whole failed (each request failed alike)."""
        ...


class ExtendEach:
    """An :class:`AsyncRenewalBatch` for slots whose ``extend`` answers without waiting
    on the network (memory; etcd locks on the client's kept-alive shared leases): one
    pass in one task, each extend still its own answer. Not for slots whose extend is a
    request: one that hangs would hold up the rest."""

    async def extend_many(self, requests: Sequence[tuple[AsyncLockSlot, float]]) -> list[Renewed]:
        answers: list[Renewed] = []
        for slot, ttl in requests:
            try:
                answers.append(await slot.extend(ttl))
            except Exception as exc:  # its own failure, as if renewed alone
                answers.append(exc)
        return answers


EXTEND_EACH = ExtendEach()
"""The one :class:`ExtendEach` batch: its slots' renewals share one task."""


class AsyncLockStore(Protocol):
    """Fenced locks and fences, async; see :class:`.base.LockStore`."""

    def slot(self, name: str, ttl: float, auto_renew: bool, fair: bool = False) -> AsyncLockSlot:
        """As :meth:`.base.LockStore.slot`: ``fair`` grants waiters in arrival order."""
        ...

    async def admit(self, resource: str, token: int) -> bool: ...

    async def write(self, resource: str, token: int, key: str, value: bytes) -> bool: ...

    async def highest(self, resource: str) -> int | None: ...

    async def close(self) -> None:
        """Cancel the store's tasks (notifications, cleanups); idempotent."""
        ...


class AsyncSemaphoreStore(Protocol):
    """Counting semaphores, async; see :class:`.base.SemaphoreStore` (same keys and
    scripts: sync and async handles of one name share its permits)."""

    def slot(self, name: str, limit: int, ttl: float, auto_renew: bool) -> AsyncLockSlot: ...


class AsyncRWLockStore(Protocol):
    """Read-write locks, async; see :class:`.base.RWLockStore` (same keys and scripts:
    sync and async readers and writers of one name share one lock)."""

    def slot(self, name: str, write: bool, ttl: float, auto_renew: bool) -> AsyncLockSlot: ...


class AsyncTxLogStore(Protocol):
    """The 2PC decision log, async; see :class:`.base.TxLogStore` (same records, same
    keys: a sync and an async coordinator share one log)."""

    async def create(
        self, txid: str, data: bytes, deadline: float, created: float | None = None
    ) -> LogEntry | None: ...

    async def cas(
        self,
        txid: str,
        expected: LogEntry,
        data: bytes,
        *,
        finished: bool,
        retention: float,
        state: str,
        created: float,
        previous: str | None = None,
    ) -> LogEntry | None: ...

    async def get(self, txid: str) -> LogEntry | None: ...

    async def unfinished(self, limit: int | None = None) -> list[tuple[str, LogEntry | None]]: ...

    async def page(
        self,
        states: Sequence[str],
        *,
        after: tuple[float, str] | None,
        limit: int,
        newest_first: bool,
    ) -> list[tuple[float, str, LogEntry | None]]: ...

    async def now(self) -> float | None: ...

    async def durability(self) -> str | None: ...


class AsyncKVStore(Protocol):
    """Plain keys, async; see :class:`.base.KVStore` (the same keys as the sync store)."""

    async def get(self, key: str) -> bytes | None: ...

    async def scan(self, prefix: str) -> dict[str, bytes]: ...

    async def swap(
        self,
        puts: Mapping[str, bytes],
        deletes: Iterable[str] = (),
        only_if: Mapping[str, bytes | None] | None = None,
    ) -> dict[str, bytes | None] | None: ...


class AsyncMemberRegistration(Protocol):
    """One member joined by an async client that the core keeps alive: it calls
    :meth:`refresh` every ``ttl / 3`` from a task (memory, Redis); see
    :class:`.base.MemberRegistration`."""

    @property
    def ttl(self) -> float: ...

    @property
    def expires_at(self) -> float: ...

    async def refresh(self) -> bool: ...

    async def leave(self) -> bool: ...


@runtime_checkable
class AsyncSelfKeptRegistration(Protocol):
    """One member joined by an async client that the backend keeps alive itself and
    that reports its own loss (etcd: a key on the client's shared lease, whose one
    keep-alive task tells every member on it): the core runs no task for it."""

    @property
    def ttl(self) -> float: ...

    @property
    def expires_at(self) -> float:
        """Monotonic time by which it has surely expired (0 once known lost)."""
        ...

    async def leave(self) -> bool:
        """Remove the member if it is still this registration's; no ``on_lost`` after."""
        ...

    def on_lost(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(reason)`` once, on the loop, as soon as the backend finds the
        registration lost (at once if it already is)."""
        ...


class AsyncGroupSubscription(Protocol):
    """Change notifications of one group, for the task that follows it."""

    async def wait(self, timeout: float) -> list[GroupChange] | None:
        """Return when the group may have changed, or after ``timeout`` seconds, with the
        changes notified since the last call (None: re-read); raise BackendUnavailable
        when the channel broke (the next call re-establishes it and returns None at once,
        so the caller re-reads and misses nothing). See :meth:`.base.GroupSubscription.wait`."""
        ...

    async def wake(self) -> None:
        """Make a :meth:`wait` in progress (in another task) return now."""
        ...

    async def close(self) -> None: ...


class AsyncGroupStore(Protocol):
    """Group membership, async; see :class:`.base.GroupStore` (same keys and records,
    so sync and async members see each other)."""

    async def join(
        self, group: str, member_id: str, payload: bytes, ttl: float
    ) -> AsyncMemberRegistration | AsyncSelfKeptRegistration | None:
        """As :meth:`.base.GroupStore.join`; a cancelled join leaves no member behind."""
        ...

    async def read(self, group: str) -> GroupSnapshot: ...

    async def subscribe(self, group: str) -> AsyncGroupSubscription:
        """Start listening (before the first read, so no change is missed)."""
        ...


class AsyncCandidateSlot(AsyncLockSlot, Protocol):
    """One async campaign; see :class:`.election_base.CandidateSlot` (acquire = lead,
    fence = term, release = resign). A cancelled acquire leaves no candidate behind."""

    async def proclaim(self, value: bytes) -> bool: ...


class AsyncElectionStore(Protocol):
    """Leader elections, async; see :class:`.election_base.ElectionStore` (same keys and
    scripts: sync and async candidates compete in one election)."""

    def candidate(self, name: str, ttl: float, value: bytes) -> AsyncCandidateSlot: ...

    async def leader(self, name: str) -> LeaderRecord | None: ...

    async def subscribe(self, name: str) -> AsyncGroupSubscription:
        """Start listening for changes of leader (before the first read)."""
        ...


class AsyncBackend(Protocol):
    """A connected async backend, made by :func:`dcoord.aio.connect`."""

    @property
    def kind(self) -> str: ...

    @property
    def locks(self) -> AsyncLockStore: ...

    @property
    def semaphores(self) -> AsyncSemaphoreStore: ...

    @property
    def rwlocks(self) -> AsyncRWLockStore: ...

    @property
    def txlog(self) -> AsyncTxLogStore: ...

    @property
    def kv_store(self) -> AsyncKVStore:
        """Plain keys (``kv`` is taken by the etcd backend's gRPC stub)."""
        ...

    @property
    def groups(self) -> AsyncGroupStore: ...

    @property
    def elections(self) -> AsyncElectionStore: ...

    async def start(self) -> None:
        """Check the server answers (within ``connect_timeout``); closes itself if not."""
        ...

    async def ping(self) -> ServerInfo: ...

    async def close(self) -> None:
        """Close the stores, then the connections; idempotent."""
        ...


async def with_retries_async(
    fn: Callable[[], Awaitable[T]],
    *,
    what: str,
    timeout: float,
    transient: Callable[[BaseException], bool],
) -> T:
    """:func:`.base.with_retries` for coroutines: retry transient errors with jittered
    backoff for up to ``timeout`` seconds, then raise BackendUnavailable naming ``what``
    with the last error chained. Use it only for operations that are safe to repeat."""
    started = time.monotonic()
    ceiling = RETRY_FIRST
    while True:
        try:
            return await fn()
        except Exception as exc:
            if not transient(exc):
                raise
            remaining = timeout - (time.monotonic() - started)
            delay = random.uniform(0, ceiling)
            if remaining <= delay:
                raise BackendUnavailable(f"{what}: {exc} (gave up after {timeout:g} s)") from exc
            ceiling = min(RETRY_MAX, ceiling * 2)
        await asyncio.sleep(delay)
