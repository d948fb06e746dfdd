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
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, runtime_checkable

from tenacity import Retrying, stop_after_delay, wait_random_exponential

from . import metrics, txlog
from .backends.base import LogEntry
from .config import positive_seconds
from .core import twopc_state as core
from .core.twopc_state import FAILPOINTS, INLINE_BELOW, RecoveryReport, Stored, TxPage, Vote
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
T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0
DEFAULT_RETENTION = 3_600.0
"""Seconds a finished record stays readable (``tx show``, ``tx list``). Nothing needs it
back: recovery reads only unfinished records, and a missing record resolves as aborted,
which is the truth for an aborted transaction and moot for a committed one (every
participant acknowledged it). Sized for memory: see docs/transactions.md, "Retention"."""
DEFAULT_PHASE2_TIMEOUT = 5.0
DEFAULT_WORKERS = 32
DEFAULT_MAX_CLOCK_SKEW = 1.0
DONE_LINGER = 0.01
"""Seconds the ``done`` log writes of finished commits are gathered before they are made
together, where the store can make many in one round trip (Redis: one fsync for all, not
one per commit on the server that also takes the next commits' forced writes). A crash
in between only leaves records ``committing``, which :meth:`Coordinator.recover` finishes
by sending the decision again (participants' commit is idempotent)."""
DONE_BATCH = 256
"""At most this many ``done`` writes go in one round trip."""
__all__ = [
    "FAILPOINTS",
    "INLINE_BELOW",
    "Coordinator",
    "Failpoint",
    "Participant",
    "RecoveryReport",
    "Transaction",
    "TxPage",
    "Vote",
]

Failpoint = Callable[[str, str, "str | None"], None]
"""``hook(point, txid, participant)``: called at each of :data:`FAILPOINTS` (participant
is None for log points). Tests and fault injection use it to stop or kill a coordinator
at a precise point; it is never needed in production."""


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


class Transaction:
    """One transaction: enlist participants with their payloads, then commit or abort.

    Nothing is written anywhere until :meth:`commit`; abandoning an uncommitted
    transaction needs no cleanup.
    """

    def __init__(self, coordinator: Coordinator, timeout: float) -> None:
        self.coordinator = coordinator
        self.txid = core.new_txid()
        self.timeout = timeout
        self.payloads: dict[str, Any] = {}
        """Participant -> its payload as enlisted (a copy: see :meth:`enlist`)."""
        self.digests: dict[str, str] = {}
        """Participant -> the digest of its payload, made once at enlist for the log."""
        self.state: Literal["open", "committed", "aborted", "unknown"] = "open"
        self.record: TxRecord | None = None
        """The log record after commit() decided (None before)."""

    def enlist(self, name: str, payload: Any = None) -> None:
        """Add participant ``name`` (one of the coordinator's) with what it should do.

        The payload is taken as it is now: the participant is sent a deep copy made here
        and the log records this copy's digest, so changing ``payload`` after enlisting it
        changes neither.

        Raises :class:`~dcoord.ConfigError` for an unknown or repeated participant and for a
        payload that could never prepare: one the log cannot digest (a self-referencing
        structure) or ``copy.deepcopy`` cannot copy, or one the participant's optional
        ``validate(payload)`` refuses.
        :class:`~dcoord.TransactionStateError` once :meth:`commit` or :meth:`abort` ran.
        """
        self._check_open()
        self.payloads[name], self.digests[name] = core.enlisted(
            self.txid, self.coordinator.participants, self.payloads, name, payload
        )

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
    pool, enough waiting prepares would starve the very commits they wait for. Where the
    log can make many writes in one round trip (Redis), the ``done`` writes are instead
    gathered for :data:`DONE_LINGER` and made together by a thread of their own.

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
        self.participants: dict[str, Participant] = core.named_participants(
            participants, Participant
        )
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
        # A store that makes many compare-and-sets in one round trip (Redis) gets the
        # done writes batched (see DONE_LINGER) by a thread of their own: one taken from
        # the phase-2 pool would hold it while gathering, and deliveries wait for it.
        self._cas_many: Callable[..., list[LogEntry | None]] | None = getattr(
            self._store, "cas_many", None
        )
        self._done_queue: list[tuple[Stored, list[str]]] = []
        self._done_writer: threading.Thread | None = None
        self._closing = threading.Event()  # cuts the done writer's gathering short
        self._pace = core.Pace()
        # The embedded log does no I/O: its done write costs less than a thread hand-off,
        # so it is written before commit() returns instead of in the background.
        self._local_log = client.backend.kind == "memory"
        # Redis with min_replicas: a decision read from the log may sit on the primary
        # alone (its writer's WAIT fell short); it is confirmed before anyone acts on it.
        self._confirm_replicas = (
            client.backend.kind == "redis" and int(client.settings.options["min_replicas"]) > 0
        )
        self._mutex = threading.Lock()
        self._done_queued = threading.Condition(self._mutex)  # work for the done writer
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
        outcome = self._log(
            core.resolve(
                txlog.check_txid(txid),
                skew_grace=self._skew_grace,
                decided_at=self.clock(),
                confirm=self._confirm_replicas,
            )
        )
        metrics.tx_resolved(self, outcome)
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
        return self._log(core.listing(state, limit, cursor, newest_first, self._corrupted))

    def get(self, txid: str) -> TxRecord | None:
        """The record of ``txid``, or None; LogCorrupted if it does not parse."""
        self._check_usable(needs_pools=False)
        stored = self._log(core.read(txlog.check_txid(txid)))
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
                self._recover_one(Stored(record, entry), report, now)
            except LogCorrupted as exc:
                report.corrupted[txid] = str(exc)
            except DcoordError as exc:
                report.incomplete[txid] = f"{type(exc).__name__}: {exc}"
        self._recover_in_doubt(report)
        metrics.tx_recovered(self, report)
        return report

    def close(self) -> None:
        """Make the queued ``done`` log writes and wait for the other background ones,
        then stop the pools."""
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            pending = list(self._background)
            writer = self._done_writer
            self._done_queued.notify()
        self._closing.set()
        if writer is not None:
            writer.join()  # it writes what is queued first
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
            tx.txid,
            tx.payloads,
            now=self._now(),
            timeout=tx.timeout,
            coordinator=self._identity,
            digests=tx.digests,
        )
        stored = self._create(record)
        self._hit("after_record", tx.txid)
        votes = self._prepare_all(record, tx.payloads, local_deadline)
        outcome, reason = core.decision(votes, late=time.monotonic() >= local_deadline)
        if outcome == "committed":
            decided = self._commit_decision(stored)
        else:
            decided = self._decide(stored, outcome, reason)
        self._hit("after_decision", tx.txid)
        self._phase2(decided, background_done=True)
        return core.finished_outcome(tx.txid, decided.record, votes)

    def _commit_decision(self, stored: Stored) -> Stored:
        """Force the COMMIT decision into the log (before any participant hears commit);
        the fault tests' negative controls replace it."""
        return self._decide(stored, "committed", "")

    def _create(self, record: TxRecord) -> Stored:
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
        return Stored(record, entry)

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
        yes = True  # every vote so far is a yes
        for name in inline:
            if time.monotonic() >= deadline:
                votes[name] = core.NO_ANSWER
            elif yes:
                votes[name] = self._prepare_one(name, record.txid, payloads[name])
            else:
                votes[name] = core.NOT_NEEDED
            yes = votes[name] is True
        pending = set(futures)
        while pending and yes:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            done, pending = wait(pending, timeout=remaining, return_when=FIRST_COMPLETED)
            for future in done:
                vote = votes[futures[future]] = future.result()
                yes = yes and vote is True
        late = time.monotonic() >= deadline
        for future in pending:
            name = futures[future]
            votes[name] = core.unasked_vote(late)
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

    def _decide(self, stored: Stored, outcome: Outcome, reason: str) -> Stored:
        """Move a started record to ``outcome``; returns whatever decision the log holds
        (someone else's, if they decided first: it is never overwritten)."""
        return self._log(
            core.decide(stored, outcome, reason, now=self.clock(), confirm=self._confirm_replicas)
        )

    def _durable(self, stored: Stored) -> Stored:
        """``stored``, once its decision is confirmed on ``min_replicas`` replicas."""
        return self._log(core.durable(stored, self._confirm_replicas))

    def _phase2(self, stored: Stored, *, background_done: bool) -> Stored:
        """Send the decision to every participant that has not acknowledged it.

        As in :meth:`_prepare_all`, participants that answered fast last time are sent
        the decision on this thread, the others in parallel from the phase-2 pool.
        """
        outcome = stored.record.outcome
        assert outcome is not None
        txid = stored.record.txid
        targets = core.phase2_targets(stored.record, self.participants)
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
            if self._cas_many is None:
                self._submit_background(lambda: self._record_acks(stored, acked))
            else:
                self._queue_done(stored, acked)
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

    def _record_acks(self, stored: Stored, acked: list[str]) -> Stored:
        return self._log(core.record_acks(stored, acked, self._confirm_replicas))

    def _queue_done(self, stored: Stored, acked: list[str]) -> None:
        """Record ``acked`` in the background, batched with other commits' by the done
        writer (the store has ``cas_many``), which starts on first use."""
        with self._mutex:
            if self._closed:
                return  # as for any background write: recover() finishes the record
            self._done_queue.append((stored, acked))
            if self._done_writer is None:
                self._done_writer = threading.Thread(
                    target=self._write_done, name="dcoord-2pc-done", daemon=True
                )
                self._done_writer.start()
            self._done_queued.notify()

    def _write_done(self) -> None:
        """The done writer: once something is queued, gather for :data:`DONE_LINGER`
        (close() cuts it short), then make all that is queued together; until close()."""
        while True:
            with self._mutex:
                self._done_queued.wait_for(lambda: bool(self._done_queue) or self._closed)
                if not self._done_queue:
                    return  # closed, and nothing left
            self._closing.wait(DONE_LINGER)
            with self._mutex:
                batch, self._done_queue = self._done_queue, []
            for start in range(0, len(batch), DONE_BATCH):
                part = batch[start : start + DONE_BATCH]
                programs = [core.record_acks(s, acked, self._confirm_replicas) for s, acked in part]
                try:
                    results = core.run_many(programs, self._answer_all)
                except Exception as exc:  # a bug here must not stop later batches
                    results = [exc] * len(part)
                for (stored, _), result in zip(part, results, strict=True):
                    if isinstance(result, Exception):
                        dcoord_error = isinstance(result, DcoordError)
                        log.log(
                            logging.INFO if dcoord_error else logging.WARNING,
                            "background log write failed (recover() will redo it): %s",
                            result,
                            exc_info=None if dcoord_error else result,
                            extra=tx_fields(self, stored.record.txid),
                        )

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

    def _recover_one(self, stored: Stored, report: RecoveryReport, now: float) -> None:
        core.warn_if_ahead(
            log, stored.record, now, self._skew_grace, tx_fields(self, stored.record.txid)
        )
        plan = core.recovery_plan(stored.record, now, self._skew_grace)
        if plan == "pending":
            report.pending.append(stored.record.txid)
            return
        if plan == "abort":
            stored = self._decide(stored, "aborted", core.RECOVERY_ABORT_REASON)
        else:
            stored = self._durable(stored)
        stored = self._phase2(stored, background_done=False)
        core.file_recovered(report, stored.record, self.participants)

    def _recover_in_doubt(self, report: RecoveryReport) -> None:
        seen = report.seen()
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

    def _log(self, steps: core.Steps[T]) -> T:
        """Run a log program of :mod:`dcoord.core.twopc_state` on this coordinator's store."""
        return core.run(steps, self._answer)

    def _answer_all(self, requests: list[core.Request]) -> list[Any]:
        """Answers to ``requests`` (an Exception for each that failed): compare-and-sets
        in one ``cas_many`` call, anything else one by one."""
        if self._cas_many is not None and all(isinstance(r, core.Cas) for r in requests):
            try:
                return self._cas_many(requests, retention=self.retention)
            except Exception as exc:
                return [exc] * len(requests)
        answers: list[Any] = []
        for request in requests:
            try:
                answers.append(self._answer(request))
            except Exception as exc:
                answers.append(exc)
        return answers

    def _answer(self, request: core.Request) -> Any:
        if isinstance(request, core.Cas):  # first: a commit's decision and done writes
            return self._store.cas(
                request.txid,
                request.expected,
                request.data,
                finished=request.finished,
                retention=self.retention,
                state=request.state,
                created=request.created,
                previous=request.previous,
            )
        if isinstance(request, core.Read):
            return self._store.get(request.txid)
        if isinstance(request, core.Page):
            return self._store.page(
                request.states,
                after=request.after,
                limit=request.limit,
                newest_first=request.newest_first,
            )
        return self._now()

    def _now(self) -> float:
        """Wall-clock time by the clock every coordinator shares (else by ``clock``)."""
        shared = self._store.now()
        return self.clock() if shared is None else shared

    def _corrupted(self, exc: LogCorrupted) -> None:
        log.warning("%s", exc, extra=tx_fields(self, exc.txid))

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
