"""The primitives every backend implements, and the retry helper they share.

Backends implement *primitives*; the semantics (validation, TTL defaults, watchdogs,
context managers, the ring, the 2PC state machine) live once in the core. A backend is
a small object that owns its connection and exposes one store per primitive:

==========  ===================================================================
``kv``      plain keys under the namespace (get / put / delete / scan)
``groups``  group membership (join / refresh / leave / read / subscribe)
``locks``   fenced locks (acquire with notified waiting / release / extend) and fences
``txlog``   transaction records (create / compare-and-set / get / unfinished / scan)
==========  ===================================================================

Keys passed to a store are relative to the client's namespace; the backend maps them
into its own keyspace so two namespaces on one server never see each other's keys.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from tenacity import (
    RetryCallState,
    RetryError,
    Retrying,
    retry_if_exception,
    stop_before_delay,
    wait_random_exponential,
)

from ..errors import BackendUnavailable, ConfigError

if TYPE_CHECKING:
    from .election_base import ElectionStore

T = TypeVar("T")

log = logging.getLogger("dcoord.backend")


@dataclass(frozen=True)
class ServerInfo:
    """What :meth:`dcoord.Client.ping` returns."""

    kind: str
    """``"memory"``, ``"redis"`` or ``"etcd"``."""
    version: str
    """The server's version (for memory: the dcoord version)."""
    endpoint: str
    """Where the client is connected (host:port, or the memory store name)."""


class KVStore(Protocol):
    """Plain keys under the namespace. Values are bytes; keys are non-empty strings."""

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, value: bytes) -> None: ...

    def delete(self, key: str) -> bool:
        """Delete ``key``; True if it existed."""
        ...

    def scan(self, prefix: str) -> dict[str, bytes]:
        """Every key starting with ``prefix`` (relative to the namespace) and its value."""
        ...

    def apply(
        self,
        puts: Mapping[str, bytes],
        deletes: Iterable[str] = (),
        only_if: Mapping[str, bytes | None] | None = None,
    ) -> bool:
        """Atomically: if every key of ``only_if`` holds exactly its value (None: absent),
        write ``puts`` and delete ``deletes`` and return True; else change nothing, False."""
        ...

    def swap(
        self,
        puts: Mapping[str, bytes],
        deletes: Iterable[str] = (),
        only_if: Mapping[str, bytes | None] | None = None,
    ) -> dict[str, bytes | None] | None:
        """:meth:`apply` that tells why it failed, in the same round trip: None if it
        applied, else what every key of ``only_if`` held when the condition was checked."""
        ...


@dataclass(frozen=True)
class LogEntry:
    """A stored transaction record: its bytes and the store's version of them."""

    data: bytes
    version: int | bytes
    """Opaque to the core: what :meth:`TxLogStore.cas` compares (etcd: mod_revision)."""


TX_STATES = ("started", "committing", "aborting", "committed", "aborted")
"""Every state a record can be in (:class:`dcoord.txlog.TxState`): a store indexes each."""


class TxLogStore(Protocol):
    """The 2PC decision log: one record per transaction, changed only by compare-and-set,
    plus an index of unfinished records by deadline. The core owns the record format and
    the state machine (:mod:`dcoord.txlog`); a store only keeps bytes."""

    def create(
        self, txid: str, data: bytes, deadline: float, created: float | None = None
    ) -> LogEntry | None:
        """Write a new record, indexed as unfinished by ``deadline`` and as ``started`` by
        ``created`` (default: ``deadline``, for callers without a record); None if it
        exists."""
        ...

    def cas(
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
    ) -> LogEntry | None:
        """Replace the record only if it is still exactly ``expected``; None if it changed.

        The record moves to the index of ``state`` (one of :data:`TX_STATES`) at
        ``created``, from that of ``previous``, the state ``expected`` is in (None: not
        known, so from whichever it is in, at some more cost). With ``finished`` it
        leaves the unfinished index (in the same atomic step) and expires ``retention``
        seconds later, its index entry with it."""
        ...

    def get(self, txid: str) -> LogEntry | None: ...

    def unfinished(self, limit: int | None = None) -> list[tuple[str, LogEntry | None]]:
        """Unfinished records, earliest deadline first (None: indexed but unreadable).

        Costs time proportional to the unfinished records, not to the log's history."""
        ...

    def page(
        self,
        states: Sequence[str],
        *,
        after: tuple[float, str] | None,
        limit: int,
        newest_first: bool,
    ) -> list[tuple[float, str, LogEntry | None]]:
        """Up to ``limit`` index entries ``(created, txid, record)`` of the given states,
        in ``(created, txid)`` order (reversed with ``newest_first``), strictly past
        ``after``; record None: indexed but gone (expired meanwhile). Fewer than ``limit``
        only at the end of the log. Costs time in proportion to ``limit`` (and a log
        factor of the log's size), for operators' listings."""
        ...

    def durability(self) -> str | None:
        """Why a record might not survive a server crash, or None if it will."""
        ...

    def now(self) -> float | None:
        """The server's wall clock (Unix seconds), the one clock every coordinator shares
        for transaction deadlines; None if the backend has no clock to read (etcd)."""
        ...


@dataclass(frozen=True)
class GroupSnapshot:
    """A group's live members as the server saw them at one point (its epoch)."""

    epoch: int
    """Increases with every change of the group's membership (on etcd: the revision)."""
    members: dict[str, bytes]
    """Member id -> the payload it joined with."""
    next_expiry: float | None
    """Seconds (by the server's clock) until the first member expires unless refreshed;
    None when nobody needs to look: no members, or the server deletes expired members
    itself and notifies subscribers (etcd leases)."""


@dataclass(frozen=True)
class GroupChange:
    """One change of a group's membership, as its notification carried it.

    A follower applies it to the member set it holds at epoch ``e`` when
    ``after <= e < epoch``: nothing else changed the group between ``after`` and
    ``epoch``. A change with ``epoch <= e`` is already in that set; one with
    ``after > e`` means changes were missed, and the follower re-reads.
    """

    epoch: int
    """The group's epoch once the change is made."""
    after: int
    """The epoch this change follows: memory and Redis ``epoch - 1`` (a counter); etcd
    the revision of the watch's previous event of the group (for its first event, the
    revision the watch started at, which precedes any read made while it runs)."""
    joined: Mapping[str, bytes]
    """Member id -> payload of the members that joined."""
    left: tuple[str, ...]
    """The ids of the members that left or expired."""
    ttl: float | None = None
    """Seconds until the joined members expire unless refreshed, when a follower must
    look for that itself (memory, Redis: see :attr:`GroupSnapshot.next_expiry`)."""


class MemberRegistration(Protocol):
    """One member joined by this client: the backend's side of a :class:`dcoord.Member`."""

    @property
    def ttl(self) -> float:
        """The TTL the server granted (etcd rounds up to whole seconds and a minimum)."""
        ...

    @property
    def keepalive_interval(self) -> float | None:
        """How often the core must call :meth:`refresh`; None when the backend keeps the
        registration alive itself (etcd: the client's shared lease)."""
        ...

    @property
    def expires_at(self) -> float:
        """Monotonic time by which the registration has surely expired unless refreshed."""
        ...

    def refresh(self) -> bool:
        """Extend the registration by its TTL; False if the server no longer has it."""
        ...

    def leave(self) -> bool:
        """Remove the member now, only if it is still this registration's; True if it was."""
        ...

    def on_lost(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once when the backend itself finds the registration gone."""
        ...


class TokenGroups(Protocol):
    """A group store whose members are kept alive by the core's heart-beats and owned by
    the random token of their join (memory, Redis)."""

    def refresh(self, group: str, member_id: str, token: str, ttl: float) -> bool: ...

    def leave(self, group: str, member_id: str, token: str) -> bool: ...


class TokenRegistration:
    """A :class:`MemberRegistration` on a :class:`TokenGroups` store: the core refreshes it
    every ``ttl / 3``; refresh and leave act only while the member still has this token."""

    def __init__(
        self,
        groups: TokenGroups,
        group: str,
        member_id: str,
        token: str,
        ttl: float,
        expires_at: float,
    ) -> None:
        self._groups = groups
        self._group = group
        self._member_id = member_id
        self._token = token
        self.ttl = ttl
        self.keepalive_interval: float | None = ttl / 3
        self.expires_at = expires_at

    def refresh(self) -> bool:
        sent = time.monotonic()
        ok = self._groups.refresh(self._group, self._member_id, self._token, self.ttl)
        if ok:
            self.expires_at = sent + self.ttl
        return ok

    def leave(self) -> bool:
        return self._groups.leave(self._group, self._member_id, self._token)

    def on_lost(self, callback: Callable[[], None]) -> None:
        """These stores never drop a registration unseen: a failed heart-beat tells the core."""


class GroupSubscription(Protocol):
    """Change notifications of one group, for the thread that follows it."""

    def wait(self, timeout: float) -> list[GroupChange] | None:
        """Return when the group may have changed, or after ``timeout`` seconds, with the
        changes notified since the last call, in order (``[]``: none, a timeout or a
        :meth:`wake`), or None when a notification did not say what changed (one sent by
        an older client) or the channel was re-established: then the caller re-reads.

        Raises BackendUnavailable when the notification channel broke; the next call
        re-establishes it and returns None at once, so the caller re-reads and misses
        nothing.
        """
        ...

    def wake(self) -> None:
        """Make a :meth:`wait` running in another thread return now (thread-safe)."""
        ...

    def close(self) -> None:
        """Stop listening; called by the thread that waits."""
        ...


class GroupStore(Protocol):
    """Group membership. Liveness is decided by the server's clock, never the client's."""

    def join(
        self, group: str, member_id: str, payload: bytes, ttl: float
    ) -> MemberRegistration | None:
        """Register ``member_id`` with ``payload`` for ``ttl`` seconds; None (and nothing
        written) if another registration of that id is live."""
        ...

    def read(self, group: str) -> GroupSnapshot:
        """The live members; expired ones are pruned (and notified) atomically first."""
        ...

    def subscribe(self, group: str) -> GroupSubscription:
        """Start listening for changes of ``group`` (before reading, so none is missed)."""
        ...


@dataclass(frozen=True)
class LockGrant:
    """What a backend returns for a granted or extended lock."""

    fence: int
    """The fencing token: greater than that of every earlier grant of the lock name."""
    expires_at: float
    """Monotonic time by which the server has surely let the lock go unless extended:
    computed from when the request was *sent*, so it errs early, never late."""


class LockSlot(Protocol):
    """One lock handle's state on the backend (its token, or its etcd queue key).

    Created per handle by :meth:`LockStore.slot`; the core serialises calls on a slot.
    """

    def acquire(self, deadline: float | None) -> LockGrant | None:
        """Acquire the lock, waiting until the monotonic ``deadline`` (None: for ever).

        Waiting is notified (release messages, watches, condition variables) with the
        holder's remaining TTL as a backstop, never fixed-interval polling. A deadline
        already past means one attempt. Returns None when the deadline passed; then
        nothing of this attempt is left on the server (an etcd queue key is deleted).
        """
        ...

    def release(self) -> bool:
        """Let the lock go if this slot's grant still holds it; False if it did not."""
        ...

    def extend(self, ttl: float) -> LockGrant | None:
        """Reset the remaining time of this slot's grant to ``ttl``; None if not held."""
        ...


class RenewalBatch(Protocol):
    """Extends many slots of one store in one round trip (Redis: one pipeline).

    A slot that can join one has a method ``renewal_batch() -> RenewalBatch | None``
    (optional: the core renews slots without it one by one); slots whose renewals may
    share a round trip return the same batch object.
    """

    def extend_many(self, requests: Sequence[tuple[LockSlot, float]]) -> list[Renewed]:
        """``slot.extend(ttl)`` of each ``(slot, ttl)``, sent together; per request its
        grant, None (not held) or the error its own ``extend`` would have raised. Each
        extend is still compare-and-act on its own token. Raises only if the round trip
        as a whole failed (the core then counts that failure for each request)."""
        ...


Renewed = LockGrant | None | Exception
"""What one extend of a :class:`RenewalBatch` came to."""


class LockStore(Protocol):
    """Fenced locks and fences. Lock names are non-empty strings, validated by the core."""

    def slot(self, name: str, ttl: float, auto_renew: bool, fair: bool = False) -> LockSlot:
        """A new slot for one handle of lock ``name`` (nothing is written yet).

        ``auto_renew`` tells a backend whose leases are kept alive by the client (etcd)
        that the core will keep extending this lock, so it may share a lease. ``fair``:
        grant the waiters of fair slots in arrival order.
        """
        ...

    def admit(self, resource: str, token: int) -> bool:
        """Atomically record ``token`` for ``resource`` if it is >= every token recorded
        before; False (and nothing written) if a greater one was."""
        ...

    def write(self, resource: str, token: int, key: str, value: bytes) -> bool:
        """Atomically admit ``token`` as :meth:`admit` does and, only if admitted, put
        ``value`` at the plain key ``key`` (as :meth:`KVStore.put`); False (and nothing
        written) if a greater token was admitted. Never retried on a lost reply."""
        ...

    def highest(self, resource: str) -> int | None:
        """The greatest token admitted for ``resource``, or None."""
        ...

    def close(self) -> None:
        """Stop the store's background work (notification threads); idempotent."""
        ...


class SemaphoreStore(Protocol):
    """Counting semaphores: each slot is one permit, a :class:`LockSlot` whose acquire
    succeeds while fewer than ``limit`` permits of ``name`` are held (dcoord.semaphore)."""

    def slot(self, name: str, limit: int, ttl: float, auto_renew: bool) -> LockSlot: ...


class RWLockStore(Protocol):
    """Read-write locks: a slot reads (shared) or writes (exclusive); a waiting writer
    blocks readers that come after it (dcoord.rwlock)."""

    def slot(self, name: str, write: bool, ttl: float, auto_renew: bool) -> LockSlot: ...


def key_segment(name: str) -> str:
    """``name`` with ``%``, ``/``, ``{`` and ``}`` percent-encoded.

    The mapping is one-to-one, keeps common names readable, and the result is safe as
    one path segment (etcd prefixes: lock ``a`` never sees the keys of lock ``a/b``) and
    inside a Redis hash tag (``{...}`` must not close early).
    """
    return _SEGMENT_SPECIALS.sub(lambda m: f"%{ord(m.group()):02X}", name)


_SEGMENT_SPECIALS = re.compile(r"[%/{}]")


class Backend(Protocol):
    """A connected backend. Created by :func:`dcoord.backends.open_backend`."""

    @property
    def kind(self) -> str: ...

    @property
    def kv(self) -> KVStore: ...

    @property
    def groups(self) -> GroupStore: ...

    @property
    def locks(self) -> LockStore: ...

    @property
    def semaphores(self) -> SemaphoreStore: ...

    @property
    def rwlocks(self) -> RWLockStore: ...

    @property
    def txlog(self) -> TxLogStore: ...

    @property
    def elections(self) -> ElectionStore: ...

    def ping(self) -> ServerInfo: ...

    def close_stores(self) -> None:
        """Stop the stores' own work (notifier threads, cleanups, shared leases), in the
        order they depend on each other; idempotent.

        :meth:`dcoord.Client.close` calls it once the primitives are closed (locks
        released, members gone) and before the client's scheduler stops, so a store may
        still use the connection and cancel its scheduler jobs here.
        """
        ...

    def close(self) -> None:
        """Release the connection; idempotent. Called last, once the scheduler stopped:
        nothing uses the connection any more."""
        ...


def certificate_error(what: str, problem: str) -> ConfigError:
    """The error for a TLS certificate the client or the server refused: configuration,
    so raised at once (a retry gets the same certificate refused again)."""
    return ConfigError(
        f"{what}: TLS certificate problem: {problem}. Check ca_cert (the CA that signed the "
        "server's certificate), the host name in the URL, the certificates' dates, and "
        "cert_file/key_file if the server asks for a client certificate"
    )


def with_retries(
    fn: Callable[[], T],
    *,
    what: str,
    timeout: float,
    transient: tuple[type[BaseException], ...] | Callable[[BaseException], bool],
) -> T:
    """Call ``fn``, retrying transient errors with jittered backoff for up to ``timeout`` s.

    ``transient`` is the exception types to retry, or a predicate on the exception (for
    drivers whose retryable errors are told apart by the server's reply, not by type).
    When the time is up, raise :class:`BackendUnavailable` naming ``what``, with the last
    error chained. Any other error (a dcoord error of a nested call included) passes
    through untouched. Use it only for operations that are safe to repeat.
    """
    is_transient = transient if callable(transient) else lambda exc: isinstance(exc, transient)
    # The first attempt runs bare: building tenacity's machinery costs more than a local
    # round trip, and almost every call succeeds at once.
    started = time.monotonic()
    try:
        return fn()
    except Exception as exc:
        if not is_transient(exc):
            raise
        remaining = timeout - (time.monotonic() - started)
        if remaining <= 0:
            raise BackendUnavailable(f"{what}: {exc} (gave up after {timeout:g} s)") from exc
    retrying = Retrying(
        retry=retry_if_exception(is_transient),
        stop=stop_before_delay(remaining),
        wait=wait_random_exponential(multiplier=0.05, max=1.0),
        before_sleep=lambda state: _log_retry(what, state),
        reraise=False,
    )
    try:
        return retrying(fn)
    except RetryError as exc:
        cause = exc.last_attempt.exception()
        raise BackendUnavailable(
            f"{what}: {cause or 'no answer'} (gave up after {timeout:g} s)"
        ) from cause


def _log_retry(what: str, state: RetryCallState) -> None:
    # At INFO: what `dcoord -v` shows while it waits for a server that does not answer.
    error = state.outcome.exception() if state.outcome is not None else None
    sleep = state.next_action.sleep if state.next_action is not None else 0.0
    # Tenacity counts from the retries: the first, bare attempt is not its own.
    attempt = state.attempt_number + 1
    log.info("%s: attempt %d failed: %s; retrying in %.2f s", what, attempt, error, sleep)
