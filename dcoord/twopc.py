"""Two-phase commit with the decision log in the client's backend.

The protocol (presumed abort)::

    1. create the record: started, participants, deadline      (log write, forced)
    2. prepare every participant, slow ones in parallel        (participant round 1)
    3. all voted yes -> compare-and-set started -> committing   (log write, forced)
       else          -> compare-and-set started -> aborting
    4. commit (or abort) every participant, slow ones in       (participant round 2)
       parallel, retried with backoff for a bounded time
    5. committing -> committed once all acknowledged            (off the critical path)

Any process can finish what another started: :meth:`Coordinator.recover` drives every
unfinished record to its end, and :meth:`Coordinator.resolve` answers a participant that
is left in doubt, recording an abort (by compare-and-set) once the deadline has passed.
Because every change of a record is a compare-and-set on the previous one, two
coordinators, recoverers or resolvers can never record different decisions.

Deadlines are set and judged by the backend's clock (Redis ``TIME``; the embedded
store's process), which every coordinator shares, so a host whose clock is wrong can
neither have its transactions presumed aborted early nor hold them open too long. etcd
has no clock to read: there each process uses its own and waits ``max_clock_skew``
beyond a deadline before presuming abort, which tolerates clocks that far apart.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from tenacity import Retrying, stop_after_delay, wait_random_exponential

from . import metrics, txlog
from .backends.base import LogEntry
from .config import positive_seconds
from .errors import (
    BackendUnavailable,
    ClientClosed,
    ConfigError,
    DcoordError,
    DurabilityWarning,
    LogCorrupted,
    TransactionAborted,
    TransactionStateError,
)
from .logfields import tx_fields
from .txlog import Outcome, TxRecord, TxState

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("dcoord.twopc")

DEFAULT_TIMEOUT = 30.0
DEFAULT_RETENTION = 3_600.0
"""Seconds a finished record stays readable (``tx show``, ``tx list``). Nothing needs it
back: recovery reads only unfinished records, and a missing record resolves as aborted,
which is the truth for an aborted transaction and moot for a committed one (every
participant acknowledged it). Sized for memory: see docs/transactions.md, "Retention"."""
#: Records read per store call when :meth:`Coordinator.transactions` lists everything.
LIST_PAGE = 1_000
DEFAULT_PHASE2_TIMEOUT = 5.0
DEFAULT_WORKERS = 32
DEFAULT_MAX_CLOCK_SKEW = 1.0
#: A participant whose last call of a phase answered faster than this (seconds) is asked
#: on the transaction's own thread next time, not from a pool: about what a hand-off to a
#: pool thread costs on a busy host, so that three such answers in a row still cost less
#: than overlapping them would save.
INLINE_BELOW = 0.0005

#: The named points at which a :data:`Failpoint` is called, in protocol order.
FAILPOINTS = (
    "after_record",  # the started record is in the log; no participant asked yet
    "after_prepare",  # one participant voted yes (called once per yes vote)
    "after_decision",  # the commit/abort decision is in the log; nobody told yet
    "after_commit",  # one participant acknowledged commit (once per participant)
    "after_abort",  # one participant acknowledged abort (once per participant)
)

Failpoint = Callable[[str, str, "str | None"], None]
"""``hook(point, txid, participant)``: called at each of :data:`FAILPOINTS` (participant
is None for log points). Tests and fault injection use it to stop or kill a coordinator
at a precise point; it is never needed in production."""

Vote = bool | str


@runtime_checkable
class Participant(Protocol):
    """A resource manager taking part in two-phase commit.

    ``prepare`` must make its prepared state durable before voting yes: after a yes it
    must be able to commit even if its process restarts. ``commit`` and ``abort`` must be
    idempotent, and ``abort`` must accept a txid it never prepared.

    Two optional methods are used when present: ``validate(payload)``, called by
    :meth:`Transaction.enlist`, raises :class:`~dcoord.ConfigError` for a payload that
    could never prepare (so bad input fails before anything is written, not as a "no"
    vote); ``in_doubt()`` lists prepared transactions for :meth:`Coordinator.recover`.
    """

    name: str

    def prepare(self, txid: str, payload: Any) -> bool: ...

    def commit(self, txid: str) -> None: ...

    def abort(self, txid: str) -> None: ...


class TxPage(list[TxRecord]):
    """A list of records from :meth:`Coordinator.transactions`, plus where the next page
    starts: :attr:`cursor`, None when this page reached the end of the log."""

    cursor: str | None = None


def _parse_cursor(cursor: object) -> tuple[float, str]:
    """``"<created>:<txid>"`` (a :attr:`TxPage.cursor`) as ``(created, txid)``."""
    bad = ConfigError(f"not a transaction-list cursor: {cursor!r}")
    if not isinstance(cursor, str):
        raise bad
    created, _, txid = cursor.partition(":")
    try:
        when = float(created)
    except ValueError:
        raise bad from None
    if not math.isfinite(when) or not txid:
        raise bad
    return when, txlog.check_txid(txid)


@dataclass
class RecoveryReport:
    """What :meth:`Coordinator.recover` found and did."""

    scanned: int = 0
    """Unfinished log records examined (recovery never reads finished ones)."""
    committed: list[str] = field(default_factory=list)
    """Decided commits driven to the end (commit re-sent to who had not acknowledged)."""
    aborted: list[str] = field(default_factory=list)
    """Transactions driven to abort (undecided past their deadline, or decided abort)."""
    pending: list[str] = field(default_factory=list)
    """Undecided and before their deadline: left to their coordinator."""
    incomplete: dict[str, str] = field(default_factory=dict)
    """txid -> why it could not be finished now (a participant unreachable or unknown)."""
    corrupted: dict[str, str] = field(default_factory=dict)
    """txid -> the LogCorrupted message; recovery carried on with the others."""
    in_doubt_resolved: list[str] = field(default_factory=list)
    """Prepared states found at participants (``in_doubt()``) whose outcome was sent."""

    @property
    def actions(self) -> int:
        """How many transactions recovery moved forward."""
        return len(self.committed) + len(self.aborted) + len(self.in_doubt_resolved)

    @property
    def clean(self) -> bool:
        """Nothing is left in doubt except transactions still within their deadline."""
        return not self.incomplete and not self.corrupted

    def __str__(self) -> str:
        parts = [
            f"scanned {self.scanned}",
            f"committed {len(self.committed)}",
            f"aborted {len(self.aborted)}",
            f"pending {len(self.pending)}",
            f"incomplete {len(self.incomplete)}",
            f"corrupted {len(self.corrupted)}",
            f"in-doubt resolved {len(self.in_doubt_resolved)}",
        ]
        return ", ".join(parts)


@dataclass(frozen=True)
class _Stored:
    record: TxRecord
    entry: LogEntry


class Transaction:
    """One transaction: enlist participants with their payloads, then commit or abort.

    Nothing is written anywhere until :meth:`commit`; abandoning an uncommitted
    transaction needs no cleanup.
    """

    def __init__(self, coordinator: Coordinator, timeout: float) -> None:
        self.coordinator = coordinator
        self.txid = uuid.uuid4().hex
        self.timeout = timeout
        self.payloads: dict[str, Any] = {}
        self.state: Literal["open", "committed", "aborted", "unknown"] = "open"
        self.record: TxRecord | None = None
        """The log record after commit() decided (None before)."""

    def enlist(self, name: str, payload: Any = None) -> None:
        """Add participant ``name`` (one of the coordinator's) with what it should do.

        Raises :class:`~dcoord.ConfigError` for an unknown or repeated participant and for a
        payload that could never prepare: one the log cannot digest (a self-referencing
        structure), or one the participant's optional ``validate(payload)`` refuses.
        :class:`~dcoord.TransactionStateError` once :meth:`commit` or :meth:`abort` ran.
        """
        self._check_open()
        participant = self.coordinator.participants.get(name)
        if participant is None:
            known = ", ".join(sorted(self.coordinator.participants)) or "none"
            raise ConfigError(f"unknown participant {name!r}; this coordinator has: {known}")
        if name in self.payloads:
            raise ConfigError(f"participant {name!r} is already enlisted in {self.txid!r}")
        validate = getattr(participant, "validate", None)
        if callable(validate):
            validate(payload)
        txlog.digest(payload, what=f"the payload for {name!r}")
        self.payloads[name] = payload

    def commit(self) -> TxRecord:
        """Run two-phase commit; returns the decided record.

        Raises :class:`~dcoord.TransactionAborted` (with the votes) when any participant
        voted no, raised, or did not answer before the deadline. Returns once the commit
        decision is in the log and every participant was asked to commit; one that did not
        acknowledge within the phase-2 timeout is finished later by :meth:`Coordinator.recover`.
        Raises :class:`~dcoord.BackendUnavailable` only when the log could not be reached
        after the decision was attempted: the outcome is then unknown, ask
        :meth:`Coordinator.resolve` with :attr:`txid`.
        """
        self._check_open()
        started = time.monotonic()
        try:
            self.record = self.coordinator._run(self)
            self.state = "committed"
        except TransactionAborted:
            self.state = "aborted"
            raise
        except BaseException:
            self.state = "unknown"
            raise
        finally:
            metrics.tx_ended(self.coordinator, self.state, time.monotonic() - started)
        return self.record

    def abort(self) -> None:
        """Give up before commit: nothing was written or sent, so nothing is undone."""
        if self.state == "open":
            self.state = "aborted"

    def _check_open(self) -> None:
        if self.state != "open":
            raise TransactionStateError(f"transaction {self.txid!r} is already {self.state}")

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def __repr__(self) -> str:
        return f"<dcoord.Transaction {self.txid} {self.state} {sorted(self.payloads)}>"


class Coordinator:
    """Runs two-phase commit over ``participants`` with the decision log in the backend.

    Create it with :meth:`dcoord.Client.coordinator`. One coordinator may be used by many
    threads at once and closes with its client. Participants that answered fast last time
    (within :data:`INLINE_BELOW`) are asked on the calling thread; the others from two
    thread pools of ``workers`` threads each: one for prepares, one for phase 2
    (commit/abort delivery and the ``done`` log writes). A prepare may wait (wait-die at
    a KVParticipant) for the commit of another transaction; if deliveries shared its
    pool, enough waiting prepares would starve the very commits they wait for.

    Deadlines are judged by the backend's clock where it has one (Redis, memory). On
    etcd they are judged by ``clock`` (this host's wall clock; injectable for tests), and
    an undecided transaction is presumed aborted only ``max_clock_skew`` seconds after
    its deadline: hosts whose clocks differ by less than that never abort a live
    coordinator's transaction early.

    ``failpoint`` is for fault injection only: see :data:`FAILPOINTS`.
    """

    def __init__(
        self,
        client: Client,
        participants: Iterable[Participant] = (),
        *,
        retention: float = DEFAULT_RETENTION,
        phase2_timeout: float = DEFAULT_PHASE2_TIMEOUT,
        workers: int = DEFAULT_WORKERS,
        clock: Callable[[], float] = time.time,
        max_clock_skew: float = DEFAULT_MAX_CLOCK_SKEW,
        failpoint: Failpoint | None = None,
    ) -> None:
        self.client = client
        self.participants: dict[str, Participant] = {}
        for participant in participants:
            if not isinstance(participant, Participant) or not isinstance(
                getattr(participant, "name", None), str
            ):
                raise ConfigError(
                    f"{participant!r} is not a Participant "
                    "(needs a str name and prepare/commit/abort)"
                )
            if participant.name in self.participants:
                raise ConfigError(f"two participants are named {participant.name!r}")
            self.participants[participant.name] = participant
        self.retention = positive_seconds("retention", retention)
        self.phase2_timeout = positive_seconds("phase2_timeout", phase2_timeout)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"workers must be a positive integer, got {workers!r}")
        self.max_clock_skew = (
            0.0 if max_clock_skew == 0 else positive_seconds("max_clock_skew", max_clock_skew)
        )
        self.failpoint = failpoint
        self.clock = clock
        self._store = client.backend.txlog
        self._check_durability()
        # Grace given to deadlines set by other hosts' clocks; none when all share one.
        self._skew_grace = 0.0 if self._store.now() is not None else self.max_clock_skew
        self._identity = f"{socket.gethostname()}:{os.getpid()}"
        self._prepares = ThreadPoolExecutor(workers, thread_name_prefix="dcoord-2pc-prepare")
        self._deliveries = ThreadPoolExecutor(workers, thread_name_prefix="dcoord-2pc-phase2")
        self._background: set[Future[None]] = set()
        self._pace = _Pace()
        # The embedded log does no I/O: its done write costs less than a thread hand-off,
        # so it is written before commit() returns instead of in the background.
        self._local_log = client.backend.kind == "memory"
        # Redis with min_replicas: a decision read from the log may sit on the primary
        # alone (its writer's WAIT fell short); it is confirmed before anyone acts on it.
        self._confirm_replicas = (
            client.backend.kind == "redis" and int(client.settings.options["min_replicas"]) > 0
        )
        self._mutex = threading.Lock()
        self._closed = False
        client.on_close(self.close)

    # -- public API ---------------------------------------------------------------

    def begin(self, timeout: float = DEFAULT_TIMEOUT) -> Transaction:
        """A new transaction that must decide within ``timeout`` seconds of its commit()."""
        self._check_usable()
        return Transaction(self, positive_seconds("timeout", timeout))

    @contextmanager
    def transaction(self, timeout: float = DEFAULT_TIMEOUT) -> Iterator[Transaction]:
        """``with coord.transaction() as tx:`` commits on normal exit, aborts on exception."""
        tx = self.begin(timeout)
        with tx:
            yield tx

    def resolve(self, txid: str) -> Literal["committed", "aborted", "pending"]:
        """The outcome of ``txid`` as the log decides it, for a participant left in doubt.

        ``"pending"`` only while undecided and before the deadline. Past the deadline an
        undecided transaction is aborted here, by compare-and-set, so the answer is final.
        No record at all means abort (presumed abort).
        """
        self._check_usable(needs_pools=False)
        outcome = self._resolve(txlog.check_txid(txid))
        metrics.tx_resolved(self, outcome)
        return outcome

    def _resolve(self, txid: str) -> Literal["committed", "aborted", "pending"]:
        stored = self._read(txid)
        if stored is None:
            return "aborted"
        if stored.record.outcome is not None:
            self._durable(stored)  # the participant acts on it: it must not be lost
            return stored.record.outcome
        if not self._expired(stored.record, self._now()):
            return "pending"
        decided = self._decide(stored, "aborted", "deadline passed; presumed abort by resolve")
        outcome = decided.record.outcome
        assert outcome is not None
        return outcome

    def transactions(
        self,
        state: TxState | str | None = None,
        *,
        limit: int | None = None,
        cursor: str | None = None,
        newest_first: bool = False,
    ) -> TxPage:
        """Retained records (optionally only those in ``state``), oldest first, or newest
        first with ``newest_first``; in both orders by creation time, then txid.

        With ``limit``, one page of at most ``limit`` records: pass the page's
        :attr:`TxPage.cursor` as ``cursor`` (with the same ``state`` and order) for the
        next. A page is read through an index of each state, so its cost depends on
        ``limit``, not on how many records the log retains. Without ``limit``, every
        retained record (read page by page; in memory all at once, so mind the size).

        Corrupted records are skipped with a logged warning; :meth:`recover` reports them.
        """
        self._check_usable(needs_pools=False)
        states = [s.value for s in TxState] if state is None else [txlog.check_state(state)]
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            raise ConfigError(f"limit must be a positive integer, got {limit!r}")
        after = None if cursor is None else _parse_cursor(cursor)
        page = TxPage()
        while limit is None or len(page) < limit:
            want = LIST_PAGE if limit is None else limit - len(page)
            entries = self._store.page(states, after=after, limit=want, newest_first=newest_first)
            for created, txid, entry in entries:
                after = (created, txid)
                if entry is None:
                    continue  # expired between the index read and the record read
                try:
                    page.append(txlog.decode(txid, entry.data))
                except LogCorrupted as exc:
                    log.warning("%s", exc, extra=tx_fields(self, exc.txid))
            if len(entries) < want:
                return page  # the end of the log: no cursor
        page.cursor = None if after is None else f"{after[0]!r}:{after[1]}"
        return page

    def get(self, txid: str) -> TxRecord | None:
        """The record of ``txid``, or None; LogCorrupted if it does not parse."""
        self._check_usable(needs_pools=False)
        stored = self._read(txlog.check_txid(txid))
        return None if stored is None else stored.record

    def recover(self) -> RecoveryReport:
        """Drive every unfinished transaction in the log to its end.

        Decided ones get their decision re-sent to the participants that did not
        acknowledge; undecided ones past their deadline are aborted. Then participants
        that can list their prepared transactions (an ``in_doubt()`` method, like XA
        recover) have each resolved against the log, which also cleans up a prepare that
        arrived after its transaction was aborted. Cost is proportional to the unfinished
        transactions, not to the log's history.
        """
        self._check_usable()
        report = RecoveryReport()
        # Read once: a time from before a record was read can only judge it less expired.
        now = self._now()
        for txid, entry in self._store.unfinished():
            report.scanned += 1
            if entry is None:
                report.incomplete[txid] = "indexed as unfinished but the record is missing"
                continue
            try:
                record = txlog.decode(txid, entry.data)
                self._recover_one(_Stored(record, entry), report, now)
            except LogCorrupted as exc:
                report.corrupted[txid] = str(exc)
            except DcoordError as exc:
                report.incomplete[txid] = f"{type(exc).__name__}: {exc}"
        self._recover_in_doubt(report)
        metrics.tx_recovered(self, report)
        return report

    def close(self) -> None:
        """Wait for background log writes (``done`` markers), then stop the pools."""
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            pending = list(self._background)
        wait(pending)
        self._prepares.shutdown(wait=True)
        self._deliveries.shutdown(wait=True)

    def __repr__(self) -> str:
        return f"<dcoord.Coordinator {self.client.url} participants={sorted(self.participants)}>"

    # -- the protocol -------------------------------------------------------------

    def _run(self, tx: Transaction) -> TxRecord:
        self._check_usable()
        # This coordinator times its own deadline on the monotonic clock from before the
        # shared clock was read: it gives up no later than anyone judging the record.
        local_deadline = time.monotonic() + tx.timeout
        record = txlog.new_record(
            tx.txid, tx.payloads, now=self._now(), timeout=tx.timeout, coordinator=self._identity
        )
        stored = self._create(record)
        self._hit("after_record", tx.txid)
        votes = self._prepare_all(record, tx.payloads, local_deadline)
        reason = _abort_reason(votes)
        if reason is None and time.monotonic() >= local_deadline:
            reason = "deadline passed before the decision"
        if reason is None:
            decided = self._commit_decision(stored)
        else:
            decided = self._decide(stored, "aborted", reason)
        self._hit("after_decision", tx.txid)
        self._phase2(decided, background_done=True)
        if decided.record.outcome == "committed":
            return decided.record
        # Lost to a resolver that aborted past the deadline: its reason is the true one.
        raise TransactionAborted(tx.txid, votes, decided.record.reason)

    def _commit_decision(self, stored: _Stored) -> _Stored:
        """Force the COMMIT decision into the log (before any participant hears commit)."""
        return self._decide(stored, "committed", "")

    def _create(self, record: TxRecord) -> _Stored:
        data = txlog.encode(record)
        try:
            entry = self._store.create(record.txid, data, record.deadline, record.created)
        except BackendUnavailable as exc:
            # Maybe written, but no participant was asked: it can only end as an abort.
            raise TransactionAborted(
                record.txid, {}, f"could not write the log record: {exc}"
            ) from exc
        if entry is None:
            raise TransactionStateError(f"transaction {record.txid!r} already exists in the log")
        return _Stored(record, entry)

    def _prepare_all(
        self, record: TxRecord, payloads: Mapping[str, Any], deadline: float
    ) -> dict[str, Vote]:
        """Every participant's vote; ``deadline`` is on the monotonic clock.

        Participants whose last prepare answered within :data:`INLINE_BELOW` are asked
        on this thread, one after the other, while the others (slow, or not seen yet)
        prepare in parallel in the pool: a thread hand-off costs more than such a
        participant's whole answer, and only slow participants gain from overlapping.
        """
        names = record.participants
        inline = [name for name in names if self._pace.fast("prepare", name)]
        futures = {
            self._prepares.submit(self._prepare_one, name, record.txid, payloads[name]): name
            for name in names
            if name not in inline
        }
        votes: dict[str, Vote] = {}
        for name in inline:
            if time.monotonic() >= deadline:
                votes[name] = "no answer before the deadline"
            elif not any(vote is not True for vote in votes.values()):
                votes[name] = self._prepare_one(name, record.txid, payloads[name])
            else:
                votes[name] = "not needed: aborting"
        pending = set(futures)
        while pending and all(vote is True for vote in votes.values()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            done, pending = wait(pending, timeout=remaining, return_when=FIRST_COMPLETED)
            for future in done:
                votes[futures[future]] = future.result()
        late = time.monotonic() >= deadline
        for future in pending:
            name = futures[future]
            votes[name] = "no answer before the deadline" if late else "not needed: aborting"
            # A late yes must not leave a prepared state behind: abort it when it lands.
            future.add_done_callback(self._late_prepare_handler(name, record.txid))
            future.cancel()
        return {name: votes[name] for name in names}

    def _prepare_one(self, name: str, txid: str, payload: Any) -> Vote:
        started = time.monotonic()
        try:
            vote = self.participants[name].prepare(txid, payload)
        except Exception as exc:
            log.info(
                "participant %s failed to prepare %s: %r",
                name,
                txid,
                exc,
                extra=tx_fields(self, txid, name),
            )
            return f"raised {type(exc).__name__}: {exc}"
        finally:
            self._pace.took("prepare", name, time.monotonic() - started)
        if vote is not True:
            return False
        self._hit("after_prepare", txid, name)
        return True

    def _late_prepare_handler(self, name: str, txid: str) -> Callable[[Future[Vote]], None]:
        def abort_if_prepared(future: Future[Vote]) -> None:
            if future.cancelled() or future.exception() is not None or future.result() is not True:
                return
            try:
                self.participants[name].abort(txid)
            except Exception as exc:
                log.warning(
                    "abort of late prepare %s at %s failed: %r",
                    txid,
                    name,
                    exc,
                    extra=tx_fields(self, txid, name),
                )

        return abort_if_prepared

    def _decide(self, stored: _Stored, outcome: Outcome, reason: str) -> _Stored:
        """Move a started record to ``outcome``; returns whatever decision the log holds.

        If someone else decided first, their decision is returned (never overwritten).
        """
        for _ in range(100):  # each round trip loses only to a concurrent change
            if stored.record.outcome is not None:
                return self._durable(stored)
            # decided_at is for operators only: this host's clock is good enough.
            decided = txlog.decide(stored.record, outcome, now=self.clock(), reason=reason)
            result = self._cas(stored, decided)
            if result is not None:
                return result
            fresh = self._read(stored.record.txid)
            if fresh is None:
                raise LogCorrupted(stored.record.txid, "the record vanished before its decision")
            stored = fresh
        raise BackendUnavailable(f"could not decide {stored.record.txid!r}: too much contention")

    def _cas(self, stored: _Stored, new: TxRecord) -> _Stored | None:
        """Compare-and-set ``stored`` -> ``new``; None if the record changed meanwhile."""
        data = txlog.encode(new)
        try:
            entry = self._store.cas(
                new.txid,
                stored.entry,
                data,
                finished=new.state.finished,
                retention=self.retention,
                state=new.state.value,
                created=new.created,
                previous=stored.record.state.value,
            )
        except BackendUnavailable:
            # Unknown outcome: read back; our exact bytes there mean it was applied (but
            # perhaps not replicated: the error may have been a WAIT that fell short).
            fresh = self._read(new.txid)
            if fresh is not None and fresh.entry.data == data:
                return self._durable(fresh)
            if fresh is None and new.state.finished:
                raise  # applied and already expired, or never written: cannot tell
            return None
        return None if entry is None else _Stored(new, entry)

    def _durable(self, stored: _Stored) -> _Stored:
        """``stored``, once its decision is known to be on ``min_replicas`` replicas.

        Only with min_replicas on Redis, and only for a decided, unfinished record: its
        same bytes are written again, and that write's WAIT confirms everything before
        it. Without this, a decision that only the primary holds could be sent to
        participants and then be lost in a failover, and the transaction presumed
        aborted after some of them committed. BackendUnavailable if not confirmed.
        """
        record = stored.record
        if not self._confirm_replicas or record.outcome is None or record.state.finished:
            return stored
        data = txlog.encode(record)
        entry = self._store.cas(
            record.txid,
            stored.entry,
            data,
            finished=False,
            retention=self.retention,
            state=record.state.value,
            created=record.created,
            previous=record.state.value,
        )
        if entry is None:
            raise BackendUnavailable(
                f"transaction {record.txid!r} changed while its decision was being "
                "confirmed on the replicas; retry"
            )
        return _Stored(record, entry)

    def _phase2(self, stored: _Stored, *, background_done: bool) -> _Stored:
        """Send the decision to every participant that has not acknowledged it.

        As in :meth:`_prepare_all`, participants that answered fast last time are sent
        the decision on this thread, the others in parallel from the phase-2 pool.
        """
        outcome = stored.record.outcome
        assert outcome is not None
        txid = stored.record.txid
        targets = [p for p in stored.record.unacked if p in self.participants]
        inline = [name for name in targets if self._pace.fast(outcome, name)]
        futures = {
            self._deliveries.submit(self._deliver, name, txid, outcome): name
            for name in targets
            if name not in inline
        }
        errors: dict[str, BaseException | None] = {}
        for name in inline:
            try:
                self._deliver(name, txid, outcome)
                errors[name] = None
            except BaseException as exc:  # sorted out below, with the pool's
                errors[name] = exc
        if futures:
            wait(futures)
        errors.update({name: future.exception() for future, name in futures.items()})
        for error in errors.values():
            if error is not None and not isinstance(error, Exception):
                raise error  # not a participant failure: the coordinator itself must stop
        acked = [name for name in targets if errors[name] is None]
        if not acked:
            return stored
        if background_done and not self._local_log:
            self._submit_background(lambda: self._record_acks(stored, acked))
            return stored
        return self._record_acks(stored, acked)

    def _deliver(self, name: str, txid: str, outcome: Outcome) -> None:
        participant = self.participants[name]
        send = participant.commit if outcome == "committed" else participant.abort
        started = time.monotonic()
        try:
            try:
                send(txid)
            except Exception:
                # Retried with backoff for what is left of phase2_timeout; building the
                # retrier only here keeps it off the path of a first-time success.
                Retrying(
                    stop=stop_after_delay(self.phase2_timeout - (time.monotonic() - started)),
                    wait=wait_random_exponential(multiplier=0.02, max=1.0),
                    reraise=True,
                )(send, txid)
        except Exception as exc:
            log.warning(
                "%s of %s at %s not acknowledged: %r",
                outcome,
                txid,
                name,
                exc,
                extra=tx_fields(self, txid, name),
            )
            raise
        finally:
            self._pace.took(outcome, name, time.monotonic() - started)
        self._hit("after_commit" if outcome == "committed" else "after_abort", txid, name)

    def _record_acks(self, stored: _Stored, acked: list[str]) -> _Stored:
        for _ in range(100):
            if stored.record.state.finished:  # another coordinator or recoverer got there
                return stored
            new = txlog.acknowledge(stored.record, acked)
            if new == stored.record:
                return stored
            result = self._cas(stored, new)
            if result is not None:
                return result
            fresh = self._read(stored.record.txid)
            if fresh is None:  # finished by someone else and already expired
                return stored
            stored = fresh
        return stored

    def _submit_background(self, fn: Callable[[], object]) -> None:
        def run() -> None:
            try:
                fn()
            except DcoordError as exc:
                log.info(
                    "background log write failed (recover() will redo it): %s",
                    exc,
                    extra=tx_fields(self),
                )

        with self._mutex:
            if self._closed:
                return
            future = self._deliveries.submit(run)
            self._background.add(future)
        future.add_done_callback(self._background_done)

    def _background_done(self, future: Future[None]) -> None:
        with self._mutex:
            self._background.discard(future)

    # -- recovery -----------------------------------------------------------------

    def _recover_one(self, stored: _Stored, report: RecoveryReport, now: float) -> None:
        txid = stored.record.txid
        if stored.record.state is TxState.STARTED:
            if not self._expired(stored.record, now):
                report.pending.append(txid)
                return
            stored = self._decide(stored, "aborted", "deadline passed; aborted by recovery")
        else:
            stored = self._durable(stored)
        unknown = [p for p in stored.record.unacked if p not in self.participants]
        stored = self._phase2(stored, background_done=False)
        if stored.record.state.finished:
            outcome = stored.record.outcome
            (report.committed if outcome == "committed" else report.aborted).append(txid)
        elif unknown:
            report.incomplete[txid] = (
                f"{stored.record.outcome}: participants not known here: {', '.join(unknown)}"
            )
        else:
            waiting = ", ".join(stored.record.unacked)
            report.incomplete[txid] = f"{stored.record.outcome}: no acknowledgement from {waiting}"

    def _recover_in_doubt(self, report: RecoveryReport) -> None:
        seen = set(report.committed) | set(report.aborted) | set(report.incomplete)
        for name, participant in self.participants.items():
            in_doubt = getattr(participant, "in_doubt", None)
            if in_doubt is None:
                continue
            for txid in in_doubt():
                if txid in seen:
                    continue
                try:
                    outcome = self.resolve(txid)
                    if outcome == "pending":
                        continue
                    self._deliver(name, txid, outcome)
                except DcoordError as exc:
                    report.incomplete[txid] = f"in doubt at {name}: {exc}"
                    continue
                except Exception as exc:
                    report.incomplete[txid] = f"in doubt at {name}: {exc!r}"
                    continue
                report.in_doubt_resolved.append(txid)

    # -- helpers ------------------------------------------------------------------

    def _read(self, txid: str) -> _Stored | None:
        entry = self._store.get(txid)
        if entry is None:
            return None
        return _Stored(txlog.decode(txid, entry.data), entry)

    def _now(self) -> float:
        """Wall-clock time by the clock every coordinator shares (else by ``clock``)."""
        shared = self._store.now()
        return self.clock() if shared is None else shared

    def _expired(self, record: TxRecord, now: float) -> bool:
        """Past the deadline by ``now``, with the clock-skew grace where clocks differ."""
        if self._skew_grace and record.created - now > self._skew_grace:
            log.warning(
                "transaction %s was created %.1f s in this host's future: the clock of %s "
                "is ahead of ours by more than max_clock_skew",
                record.txid,
                record.created - now,
                record.coordinator,
                extra=tx_fields(self, record.txid),
            )
        return record.expired(now - self._skew_grace)

    def _hit(self, point: str, txid: str, participant: str | None = None) -> None:
        if self.failpoint is not None:
            self.failpoint(point, txid, participant)

    def _check_usable(self, *, needs_pools: bool = True) -> None:
        """ClientClosed once the client is closed; for what needs the thread pools (a
        commit, a recovery), also once this coordinator is. Reading the log needs neither."""
        if self.client.closed:
            raise ClientClosed(f"the client of this coordinator ({self.client.url}) is closed")
        if needs_pools and self._closed:
            raise ClientClosed(f"this coordinator on {self.client.url} is closed")

    def _check_durability(self) -> None:
        problem = self._store.durability()
        if problem is None:
            return
        if self.client.settings.options.get("require_durable"):
            raise ConfigError(f"require_durable is set but {problem}")
        if self.client.capabilities.persistent:  # embedded: nobody expects durability
            warnings.warn(
                f"the transaction log on {self.client.url} may lose decisions: {problem}",
                DurabilityWarning,
                stacklevel=4,
            )


class _Pace:
    """How long each participant's last call of each phase took: who is asked inline.

    Unseen participants count as slow (asked from the pool) until they answer once; a
    slow answer sends a participant back to the pool. Updates race harmlessly: any
    recent duration is good enough to choose where to ask from.
    """

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], float] = {}

    def fast(self, phase: str, name: str) -> bool:
        return self._last.get((phase, name), INLINE_BELOW) < INLINE_BELOW

    def took(self, phase: str, name: str, seconds: float) -> None:
        self._last[(phase, name)] = seconds


def _abort_reason(votes: Mapping[str, Vote]) -> str | None:
    refused = {name: vote for name, vote in votes.items() if vote is not True}
    if not refused:
        return None
    return "; ".join(
        f"{name} voted no" if vote is False else f"{name}: {vote}" for name, vote in refused.items()
    )
