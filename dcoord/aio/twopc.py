"""Two-phase commit for asyncio: :class:`AsyncCoordinator` and :class:`AsyncTransaction`.

The protocol is :mod:`dcoord.twopc`'s (presumed abort, the decision forced into the log
before anyone hears it, any process may finish what another started), and so are its
decisions and log loops: they live once in :mod:`dcoord.core.twopc_state`, driven here
with awaits. The log is the sync coordinator's (same keys, same records): a transaction
decided by a sync coordinator is resolved or recovered by an async one, and back.

Participants are :class:`~dcoord.aio.AsyncParticipant` (coroutine methods). Slow ones
are asked in parallel as tasks; ones that answered within
:data:`~dcoord.core.twopc_state.INLINE_BELOW` last time are awaited in turn (a task
costs more than their answer). No thread, no pool.

Cancellation: a cancelled ``async with`` body aborts (nothing was written). A
cancelled :meth:`AsyncTransaction.commit` stops where it stands, its transaction
``unknown``: the record is either undecided (recovery aborts it after its deadline) or
decided (recovery finishes it), exactly as if the process had died there.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import warnings
from collections.abc import Awaitable, Callable, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from .. import metrics, txlog
from ..backends.aio_base import with_retries_async
from ..config import positive_seconds
from ..core import twopc_state as core
from ..core.twopc_state import RecoveryReport, Stored, TxPage, Vote
from ..errors import (
    BackendUnavailable,
    ClientClosed,
    ConfigError,
    DcoordError,
    DurabilityWarning,
    LogCorrupted,
    TransactionAborted,
    TransactionStateError,
)
from ..logfields import tx_fields
from ..twopc import (
    DEFAULT_MAX_CLOCK_SKEW,
    DEFAULT_PHASE2_TIMEOUT,
    DEFAULT_RETENTION,
    DEFAULT_TIMEOUT,
)
from ..txlog import Outcome, TxRecord, TxState
from .participants import AsyncParticipant, check_async, drive

if TYPE_CHECKING:
    from .client import AsyncClient

log = logging.getLogger("dcoord.twopc")
T = TypeVar("T")

AsyncFailpoint = Callable[[str, str, "str | None"], "Awaitable[None] | None"]
"""``hook(point, txid, participant)`` at each of :data:`~dcoord.twopc.FAILPOINTS`, a
plain function or a coroutine function; for fault injection only."""


class AsyncTransaction:
    """One transaction: enlist participants with their payloads, then commit or abort.

    Nothing is written anywhere until :meth:`commit`. ``async with
    coord.transaction() as tx:`` commits on normal exit and aborts on an exception,
    a cancellation included.
    """

    def __init__(self, coordinator: AsyncCoordinator, timeout: float) -> None:
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
        """Add participant ``name`` with what it should do; as :meth:`dcoord.Transaction.enlist`."""
        self._check_open()
        self.payloads[name], self.digests[name] = core.enlisted(
            self.txid, self.coordinator.participants, self.payloads, name, payload
        )

    async def commit(self) -> TxRecord:
        """Run two-phase commit; returns the decided record. Errors as
        :meth:`dcoord.Transaction.commit`; cancelled, the transaction is ``unknown`` and
        :meth:`AsyncCoordinator.recover` finishes it."""
        self._check_open()
        started = time.monotonic()
        try:
            self.record = await self.coordinator._run(self)
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

    async def __aenter__(self) -> AsyncTransaction:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            await self.commit()
        else:
            self.abort()

    def __repr__(self) -> str:
        return f"<dcoord.aio.AsyncTransaction {self.txid} {self.state} {sorted(self.payloads)}>"


class AsyncCoordinator:
    """Runs two-phase commit over async ``participants`` with the decision log in the
    backend. Made by :meth:`dcoord.aio.AsyncClient.coordinator`; options as
    :class:`dcoord.Coordinator` (no ``workers``: participants are asked as tasks).

    The durability of the log is checked at the first commit, resolve or recover, or by
    :meth:`start`: a :class:`~dcoord.DurabilityWarning`, or with ``require_durable`` a
    ConfigError. Use it from the event loop of its client.
    """

    def __init__(
        self,
        client: AsyncClient,
        participants: Iterable[AsyncParticipant] = (),
        *,
        retention: float = DEFAULT_RETENTION,
        phase2_timeout: float = DEFAULT_PHASE2_TIMEOUT,
        clock: Callable[[], float] = time.time,
        max_clock_skew: float = DEFAULT_MAX_CLOCK_SKEW,
        failpoint: AsyncFailpoint | None = None,
    ) -> None:
        self.client = client
        self.participants: dict[str, AsyncParticipant] = core.named_participants(
            participants, AsyncParticipant, " as coroutine functions"
        )
        for participant in self.participants.values():
            check_async(participant)
        self.retention = positive_seconds("retention", retention)
        self.phase2_timeout = positive_seconds("phase2_timeout", phase2_timeout)
        self.max_clock_skew = (
            0.0 if max_clock_skew == 0 else positive_seconds("max_clock_skew", max_clock_skew)
        )
        self.failpoint = failpoint
        self.clock = clock
        self._store = client.backend.txlog
        self._skew_grace: float | None = None  # known after start()
        self._identity = f"{socket.gethostname()}:{os.getpid()}"
        self._pace = core.Pace()
        # As the sync coordinator: the embedded log's done write costs less than a task.
        self._local_log = client.backend.kind == "memory"
        self._confirm_replicas = (
            client.backend.kind == "redis" and int(client.settings.options["min_replicas"]) > 0
        )
        self._background: set[asyncio.Future[Any]] = set()
        self._closed = False

    # -- public API ---------------------------------------------------------------

    async def start(self) -> AsyncCoordinator:
        """Check the log's durability now (warn, or ConfigError with
        ``require_durable``) and learn whether the backend has a shared clock; done by
        the first commit, resolve or recover otherwise. Idempotent."""
        if self._skew_grace is None:
            problem = await self._store.durability()
            if problem is not None:
                if self.client.settings.options.get("require_durable"):
                    raise ConfigError(f"require_durable is set but {problem}")
                if self.client.backend.kind != "memory":  # embedded: nobody expects it
                    warnings.warn(
                        f"the transaction log on {self.client.url} may lose decisions: {problem}",
                        DurabilityWarning,
                        stacklevel=2,
                    )
            # Grace given to deadlines set by other hosts' clocks; none when all share one.
            self._skew_grace = 0.0 if await self._store.now() is not None else self.max_clock_skew
        return self

    def begin(self, timeout: float = DEFAULT_TIMEOUT) -> AsyncTransaction:
        """A new transaction that must decide within ``timeout`` seconds of its commit()."""
        self._check_usable()
        return AsyncTransaction(self, positive_seconds("timeout", timeout))

    def transaction(self, timeout: float = DEFAULT_TIMEOUT) -> AsyncTransaction:
        """``async with coord.transaction() as tx:`` commits on normal exit, aborts on
        an exception or a cancellation."""
        return self.begin(timeout)

    async def resolve(self, txid: str) -> core.Resolution:
        """The outcome of ``txid`` as the log decides it; as :meth:`dcoord.Coordinator.resolve`."""
        self._check_usable(needs_open=False)
        checked = txlog.check_txid(txid)
        grace = await self._grace()
        outcome = await self._log(
            core.resolve(
                checked, skew_grace=grace, decided_at=self.clock(), confirm=self._confirm_replicas
            )
        )
        metrics.tx_resolved(self, outcome)
        return outcome

    async def transactions(
        self,
        state: TxState | str | None = None,
        *,
        limit: int | None = None,
        cursor: str | None = None,
        newest_first: bool = False,
    ) -> TxPage:
        """Retained records (optionally only those in ``state``) by creation time, then
        txid, in pages: as :meth:`dcoord.Coordinator.transactions`, whose cursors this
        accepts (one log, one index, for both APIs)."""
        self._check_usable(needs_open=False)
        return await self._log(core.listing(state, limit, cursor, newest_first, self._corrupted))

    async def get(self, txid: str) -> TxRecord | None:
        """The record of ``txid``, or None; LogCorrupted if it does not parse."""
        self._check_usable(needs_open=False)
        stored = await self._log(core.read(txlog.check_txid(txid)))
        return None if stored is None else stored.record

    async def recover(self) -> RecoveryReport:
        """Drive every unfinished transaction in the log to its end, then resolve what
        participants list as in doubt; as :meth:`dcoord.Coordinator.recover`."""
        self._check_usable()
        grace = await self._grace()
        report = RecoveryReport()
        # Read once: a time from before a record was read can only judge it less expired.
        now = await self._now()
        for txid, entry in await self._store.unfinished():
            report.scanned += 1
            if entry is None:
                report.incomplete[txid] = "indexed as unfinished but the record is missing"
                continue
            try:
                record = txlog.decode(txid, entry.data)
                await self._recover_one(Stored(record, entry), report, now, grace)
            except LogCorrupted as exc:
                report.corrupted[txid] = str(exc)
            except DcoordError as exc:
                report.incomplete[txid] = f"{type(exc).__name__}: {exc}"
        await self._recover_in_doubt(report)
        metrics.tx_recovered(self, report)
        return report

    async def close(self) -> None:
        """Wait for background work (``done`` log writes, aborts of late prepares);
        idempotent. The client's close does it too."""
        if self._closed:
            return
        self._closed = True
        await asyncio.gather(*self._background, return_exceptions=True)

    def __repr__(self) -> str:
        return (
            f"<dcoord.aio.AsyncCoordinator {self.client.url} "
            f"participants={sorted(self.participants)}>"
        )

    # -- the protocol -------------------------------------------------------------

    async def _run(self, tx: AsyncTransaction) -> TxRecord:
        self._check_usable()
        await self._grace()
        # Our own deadline on the monotonic clock from before the shared clock was read:
        # we give up no later than anyone judging the record.
        local_deadline = time.monotonic() + tx.timeout
        record = txlog.new_record(
            tx.txid,
            tx.payloads,
            now=await self._now(),
            timeout=tx.timeout,
            coordinator=self._identity,
            digests=tx.digests,
        )
        stored = await self._create(record)
        await self._hit("after_record", tx.txid)
        votes = await self._prepare_all(record, tx.payloads, local_deadline)
        outcome, reason = core.decision(votes, late=time.monotonic() >= local_deadline)
        decided = await self._decide(stored, outcome, reason)
        await self._hit("after_decision", tx.txid)
        await self._phase2(decided, background_done=True)
        return core.finished_outcome(tx.txid, decided.record, votes)

    async def _create(self, record: TxRecord) -> Stored:
        data = txlog.encode(record)
        try:
            entry = await self._store.create(record.txid, data, record.deadline, record.created)
        except BackendUnavailable as exc:
            # Maybe written, but no participant was asked: it can only end as an abort.
            raise TransactionAborted(
                record.txid, {}, f"could not write the log record: {exc}"
            ) from exc
        if entry is None:
            raise TransactionStateError(f"transaction {record.txid!r} already exists in the log")
        return Stored(record, entry)

    async def _prepare_all(
        self, record: TxRecord, payloads: Mapping[str, Any], deadline: float
    ) -> dict[str, Vote]:
        """Every participant's vote; ``deadline`` is on the monotonic clock.

        Fast participants are awaited in turn, the others prepare in parallel as tasks.
        A task still running when the votes are settled (too late, or not needed) is
        left to finish, and a yes it brings is aborted then: cancelling it could leave
        a prepare in flight that lands after the abort.
        """
        names = record.participants
        inline = [name for name in names if self._pace.fast("prepare", name)]
        tasks: dict[asyncio.Future[Vote], str] = {
            asyncio.ensure_future(self._prepare_one(name, record.txid, payloads[name])): name
            for name in names
            if name not in inline
        }
        votes: dict[str, Vote] = {}
        pending: set[asyncio.Future[Vote]] = set(tasks)
        try:
            for name in inline:
                if time.monotonic() >= deadline:
                    votes[name] = core.NO_ANSWER
                elif all(vote is True for vote in votes.values()):
                    votes[name] = await self._prepare_one(name, record.txid, payloads[name])
                else:
                    votes[name] = core.NOT_NEEDED
            while pending and all(vote is True for vote in votes.values()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                done, pending = await asyncio.wait(
                    pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    votes[tasks[task]] = task.result()
        except BaseException:
            for task in pending:  # cancelled (or a failpoint): recovery aborts them
                task.cancel()
            raise
        late = time.monotonic() >= deadline
        for task in pending:
            name = tasks[task]
            votes[name] = core.unasked_vote(late)
            self._track(asyncio.ensure_future(self._abort_if_prepared(task, name, record.txid)))
        return {name: votes[name] for name in names}

    async def _prepare_one(self, name: str, txid: str, payload: Any) -> Vote:
        started = time.monotonic()
        try:
            vote = await self.participants[name].prepare(txid, payload)
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
        await self._hit("after_prepare", txid, name)
        return True

    async def _abort_if_prepared(self, task: asyncio.Future[Vote], name: str, txid: str) -> None:
        """A late yes must not leave a prepared state behind: abort it when it lands."""
        try:
            if await task is not True:
                return
            await self.participants[name].abort(txid)
        except Exception as exc:
            log.warning(
                "abort of late prepare %s at %s failed: %r",
                txid,
                name,
                exc,
                extra=tx_fields(self, txid, name),
            )

    async def _decide(self, stored: Stored, outcome: Outcome, reason: str) -> Stored:
        return await self._log(
            core.decide(stored, outcome, reason, now=self.clock(), confirm=self._confirm_replicas)
        )

    async def _phase2(self, stored: Stored, *, background_done: bool) -> Stored:
        """Send the decision to every participant that has not acknowledged it: fast
        ones in turn, the others in parallel as tasks."""
        outcome = stored.record.outcome
        assert outcome is not None
        txid = stored.record.txid
        targets = core.phase2_targets(stored.record, self.participants)
        inline = [name for name in targets if self._pace.fast(outcome, name)]
        tasks = {
            asyncio.ensure_future(self._deliver(name, txid, outcome)): name
            for name in targets
            if name not in inline
        }
        errors: dict[str, BaseException | None] = {}
        try:
            for name in inline:
                try:
                    await self._deliver(name, txid, outcome)
                    errors[name] = None
                except asyncio.CancelledError:
                    raise
                except BaseException as exc:  # sorted out below, with the tasks'
                    errors[name] = exc
            results = await asyncio.gather(*tasks, return_exceptions=True)
        except BaseException:
            for task in tasks:  # cancelled: the record stays unfinished for recover()
                task.cancel()
            raise
        errors.update({name: error for name, error in zip(tasks.values(), results, strict=True)})
        for error in errors.values():
            if error is not None and not isinstance(error, Exception):
                raise error  # not a participant failure: the coordinator itself must stop
        acked = [name for name in targets if errors[name] is None]
        if not acked:
            return stored
        if background_done and not self._local_log:
            self._track(asyncio.ensure_future(self._record_acks_quietly(stored, acked)))
            return stored
        return await self._log(core.record_acks(stored, acked, self._confirm_replicas))

    async def _deliver(self, name: str, txid: str, outcome: Outcome) -> None:
        participant = self.participants[name]
        send = participant.commit if outcome == "committed" else participant.abort
        started = time.monotonic()
        try:
            # Retried with backoff for phase2_timeout; any participant error may pass.
            await with_retries_async(
                lambda: send(txid),
                what=f"{outcome} of {txid} at {name}",
                timeout=self.phase2_timeout,
                transient=lambda exc: True,
            )
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
        await self._hit("after_commit" if outcome == "committed" else "after_abort", txid, name)

    async def _record_acks_quietly(self, stored: Stored, acked: list[str]) -> None:
        try:
            await self._log(core.record_acks(stored, acked, self._confirm_replicas))
        except DcoordError as exc:
            log.info(
                "background log write failed (recover() will redo it): %s",
                exc,
                extra=tx_fields(self),
            )

    def _track(self, task: asyncio.Future[Any]) -> None:
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- recovery -----------------------------------------------------------------

    async def _recover_one(
        self, stored: Stored, report: RecoveryReport, now: float, grace: float
    ) -> None:
        core.warn_if_ahead(log, stored.record, now, grace, tx_fields(self, stored.record.txid))
        plan = core.recovery_plan(stored.record, now, grace)
        if plan == "pending":
            report.pending.append(stored.record.txid)
            return
        if plan == "abort":
            stored = await self._decide(stored, "aborted", core.RECOVERY_ABORT_REASON)
        else:
            stored = await self._log(core.durable(stored, self._confirm_replicas))
        stored = await self._phase2(stored, background_done=False)
        core.file_recovered(report, stored.record, self.participants)

    async def _recover_in_doubt(self, report: RecoveryReport) -> None:
        seen = report.seen()
        for name, participant in self.participants.items():
            in_doubt = getattr(participant, "in_doubt", None)
            if in_doubt is None:
                continue
            for txid in await in_doubt():
                if txid in seen:
                    continue
                try:
                    outcome = await self.resolve(txid)
                    if outcome == "pending":
                        continue
                    await self._deliver(name, txid, outcome)
                except DcoordError as exc:
                    report.incomplete[txid] = f"in doubt at {name}: {exc}"
                    continue
                except Exception as exc:
                    report.incomplete[txid] = f"in doubt at {name}: {exc!r}"
                    continue
                report.in_doubt_resolved.append(txid)

    # -- helpers ------------------------------------------------------------------

    async def _log(self, steps: core.Steps[T]) -> T:
        """Run a log program of :mod:`dcoord.core.twopc_state` on the async store."""
        return await drive(steps, self._answer)

    async def _answer(self, request: core.Request) -> Any:
        if isinstance(request, core.Read):
            return await self._store.get(request.txid)
        if isinstance(request, core.Cas):
            return await self._store.cas(
                request.txid,
                request.expected,
                request.data,
                finished=request.finished,
                retention=self.retention,
                state=request.state,
                created=request.created,
                previous=request.previous,
            )
        if isinstance(request, core.Page):
            return await self._store.page(
                request.states,
                after=request.after,
                limit=request.limit,
                newest_first=request.newest_first,
            )
        return await self._now()

    async def _now(self) -> float:
        """Wall-clock time by the clock every coordinator shares (else by ``clock``)."""
        shared = await self._store.now()
        return self.clock() if shared is None else shared

    async def _grace(self) -> float:
        await self.start()
        assert self._skew_grace is not None
        return self._skew_grace

    def _corrupted(self, exc: LogCorrupted) -> None:
        log.warning("%s", exc, extra=tx_fields(self, exc.txid))

    async def _hit(self, point: str, txid: str, participant: str | None = None) -> None:
        if self.failpoint is not None:
            result = self.failpoint(point, txid, participant)
            if result is not None:
                await result

    def _check_usable(self, *, needs_open: bool = True) -> None:
        """ClientClosed once the client is closed; for a commit or a recovery, also
        once this coordinator is. Reading the log needs neither."""
        if self.client.closed:
            raise ClientClosed(f"the client of this coordinator ({self.client.url}) is closed")
        if needs_open and self._closed:
            raise ClientClosed(f"this coordinator on {self.client.url} is closed")
