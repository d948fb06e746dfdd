"""Two-phase commit's decisions, with the log's I/O as requests (no I/O, no threads).

Everything the coordinator decides lives here once, for :class:`dcoord.Coordinator`
(threads) and :class:`dcoord.aio.AsyncCoordinator` (tasks): what the votes decide, when
a record is past its deadline, what recovery does with a record and how it reports it,
which participants still have to hear a decision, and the compare-and-set loops on the
log (decide, acknowledge, confirm on replicas, resolve), and the paged listing.

The loops are generators: each yields a request for the log (:class:`Read`,
:class:`Cas`, :class:`Now`, :class:`Page`) and is sent its answer, or thrown the error
the store raised. :func:`run` drives one with blocking calls; the async coordinator drives it
with awaits (:func:`dcoord.aio.twopc.AsyncCoordinator._run_log`). So a sync and an async
coordinator take the same steps on the same log and can never disagree on an outcome.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from .. import txlog
from ..backends.base import LogEntry
from ..errors import BackendUnavailable, ConfigError, LogCorrupted, TransactionAborted
from ..txlog import Outcome, TxRecord, TxState

T = TypeVar("T")
R = TypeVar("R")

Vote = bool | str
"""True is yes; False a plain no; a str says why there was no yes (raised, too late)."""

Resolution = Literal["committed", "aborted", "pending"]

#: The named points at which a failpoint is called, in protocol order.
FAILPOINTS = (
    "after_record",  # the started record is in the log; no participant asked yet
    "after_prepare",  # one participant voted yes (called once per yes vote)
    "after_decision",  # the commit/abort decision is in the log; nobody told yet
    "after_commit",  # one participant acknowledged commit (once per participant)
    "after_abort",  # one participant acknowledged abort (once per participant)
)

#: A participant whose last call of a phase answered faster than this (seconds) is asked
#: inline next time (on the transaction's own thread or task), not handed off: about
#: what a hand-off costs on a busy host, so that three such answers in a row still cost
#: less than overlapping them would save.
INLINE_BELOW = 0.0005

NO_ANSWER = "no answer before the deadline"
NOT_NEEDED = "not needed: aborting"
# Each compare-and-set loses only to a concurrent change of the same record.
_CAS_ROUNDS = 100


def new_txid() -> str:
    """A fresh transaction id: 128 random bits as 32 hex digits.

    Drawn from a generator of this module's own, seeded from ``os.urandom`` in each
    process and again in a forked child (a copy of the parent's state would repeat its
    ids); not from the application's ``random``, which two processes may seed alike.
    Not ``uuid4``: it reads ``os.urandom`` for every id, which releases the GIL, and
    with threads committing every release handed the GIL to another thread, one thread
    switch per transaction (8 threads on the embedded backend: +30 µs of CPU per commit;
    docs/performance.md, "Coordinator cost, 8 threads"). Ids are names, not secrets: that the
    generator's later output can be inferred from enough of its earlier output is
    harmless here."""
    return f"{_txids.getrandbits(128):032x}"


# random.Random() and its seed() without an argument seed from os.urandom.
_txids = random.Random()
if hasattr(os, "register_at_fork"):  # (not on Windows)
    os.register_at_fork(after_in_child=_txids.seed)


@dataclass(frozen=True)
class Stored:
    """A record and the log entry it was read from (what a compare-and-set compares)."""

    record: TxRecord
    entry: LogEntry


@dataclass(frozen=True)
class Read:
    """Request: the log entry of ``txid`` (None if there is none)."""

    txid: str


@dataclass(frozen=True)
class Cas:
    """Request: compare-and-set ``txid`` from ``expected`` to ``data``; the new entry, or
    None if the record changed meanwhile. ``finished`` records get the retention.

    ``state`` and ``created`` are the new record's, ``previous`` the state ``expected``
    is in: the store moves the record's entry between its state indexes (the listing's)
    in the same atomic step, so every driver keeps them right."""

    txid: str
    expected: LogEntry
    data: bytes
    finished: bool
    state: str
    created: float
    previous: str


@dataclass(frozen=True)
class Page:
    """Request: up to ``limit`` index entries ``(created, txid, entry or None)`` of the
    records in ``states``, strictly past ``after`` in (created, txid) order (reversed
    with ``newest_first``): the store's ``page``."""

    states: tuple[str, ...]
    after: tuple[float, str] | None
    limit: int
    newest_first: bool


@dataclass(frozen=True)
class Now:
    """Request: wall-clock time by the clock every coordinator shares (else this host's)."""


Request = Read | Cas | Now | Page
Steps = Generator[Request, Any, T]
"""A log program: yields requests, is sent their answers (or thrown their errors)."""


def run(steps: Generator[R, Any, T], answer: Callable[[R], Any]) -> T:
    """Drive a program (these log programs, or a KVParticipant's) with blocking calls:
    ``answer(request)`` for each request it yields."""
    reply: Any = None
    error: BaseException | None = None
    while True:
        try:
            request = steps.send(reply) if error is None else steps.throw(error)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        try:
            reply, error = answer(request), None
        except Exception as exc:  # the program re-raises what it does not handle
            reply, error = None, exc


def run_many(
    programs: Sequence[Generator[R, Any, T]], answer_all: Callable[[list[R]], list[Any]]
) -> list[T | Exception]:
    """Drive ``programs`` side by side: each round, the requests of all that are not done
    go to one ``answer_all(requests)`` (so that a store can answer them in one round
    trip), which returns an answer per request, or the Exception that request raised
    (thrown into its program). Returns each program's result, or the Exception it ended
    with (one program's failure does not stop the others)."""
    results: dict[int, T | Exception] = {}
    replies: dict[int, Any] = dict.fromkeys(range(len(programs)))
    while replies:
        requests: dict[int, R] = {}
        for i, reply in replies.items():
            try:
                if isinstance(reply, Exception):
                    requests[i] = programs[i].throw(reply)
                else:
                    requests[i] = programs[i].send(reply)
            except StopIteration as stop:
                results[i] = stop.value
            except Exception as exc:
                results[i] = exc
        answers = answer_all(list(requests.values())) if requests else []
        replies = dict(zip(requests, answers, strict=True))
    return [results[i] for i in range(len(programs))]


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

    def seen(self) -> set[str]:
        """Transactions recovery already handled from the log (in_doubt skips them)."""
        return set(self.committed) | set(self.aborted) | set(self.incomplete)

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


class Pace:
    """How long each participant's last call of each phase took: who is asked inline.

    Unseen participants count as slow (handed off) until they answer once; a slow
    answer sends a participant back. Updates race harmlessly: any recent duration is
    good enough to choose where to ask from.
    """

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], float] = {}

    def fast(self, phase: str, name: str) -> bool:
        return self._last.get((phase, name), INLINE_BELOW) < INLINE_BELOW

    def took(self, phase: str, name: str, seconds: float) -> None:
        self._last[(phase, name)] = seconds


# -- pure rules -----------------------------------------------------------------------


def named_participants(participants: Iterable[Any], kind: type, how: str = "") -> dict[str, Any]:
    """Participants by name; ConfigError for one that is not a ``kind`` or a repeated name
    (``how``: what the message adds about the methods, e.g. that they are coroutines)."""
    named: dict[str, Any] = {}
    for participant in participants:
        name = getattr(participant, "name", None)
        if not isinstance(participant, kind) or not isinstance(name, str):
            raise ConfigError(
                f"{participant!r} is not a Participant "
                f"(needs a str name and prepare/commit/abort{how})"
            )
        if name in named:
            raise ConfigError(f"two participants are named {name!r}")
        named[name] = participant
    return named


def enlisted(
    txid: str, participants: Mapping[str, Any], payloads: Mapping[str, Any], name: str, payload: Any
) -> tuple[Any, str]:
    """What ``enlist(name, payload)`` keeps: a snapshot of ``payload`` (the one its
    participant is sent) and its digest (the one the log records), so that a payload the
    caller changes after enlisting changes neither. ConfigError for an unknown or
    repeated participant, or a payload that could never prepare (the participant's
    optional ``validate`` refuses it, or the log cannot digest or copy it)."""
    participant = participants.get(name)
    if participant is None:
        known = ", ".join(sorted(participants)) or "none"
        raise ConfigError(f"unknown participant {name!r}; this coordinator has: {known}")
    if name in payloads:
        raise ConfigError(f"participant {name!r} is already enlisted in {txid!r}")
    validate = getattr(participant, "validate", None)
    if callable(validate):
        validate(payload)
    what = f"the payload for {name!r}"
    digest = txlog.digest(payload, what=what)
    try:
        snapshot = copy.deepcopy(payload)
    except Exception as exc:  # deepcopy raises whatever a payload's pickling support does
        raise ConfigError(f"{what} cannot be copied for the transaction: {exc!r}") from None
    return snapshot, digest


def abort_reason(votes: Mapping[str, Vote]) -> str | None:
    """Why these votes abort (None: all voted yes)."""
    refused = {name: vote for name, vote in votes.items() if vote is not True}
    if not refused:
        return None
    return "; ".join(
        f"{name} voted no" if vote is False else f"{name}: {vote}" for name, vote in refused.items()
    )


def decision(votes: Mapping[str, Vote], *, late: bool) -> tuple[Outcome, str]:
    """The outcome the votes decide, and its reason; ``late``: the coordinator's own
    deadline passed before it could decide."""
    reason = abort_reason(votes)
    if reason is None and late:
        reason = "deadline passed before the decision"
    return ("committed", "") if reason is None else ("aborted", reason)


def unasked_vote(late: bool) -> str:
    """The vote of a participant whose answer is no longer waited for."""
    return NO_ANSWER if late else NOT_NEEDED


def finished_outcome(tx: str, decided: TxRecord, votes: Mapping[str, Vote]) -> TxRecord:
    """What commit() returns: the decided record; TransactionAborted if it aborted
    (possibly by a resolver past the deadline: its reason is the true one)."""
    if decided.outcome == "committed":
        return decided
    raise TransactionAborted(tx, dict(votes), decided.reason)


def expired(record: TxRecord, now: float, skew_grace: float) -> bool:
    """Past the deadline by ``now``, with the clock-skew grace where clocks differ."""
    return record.expired(now - skew_grace)


def clock_ahead(record: TxRecord, now: float, skew_grace: float) -> float | None:
    """How far in our future ``record`` was created, when that exceeds the skew grace
    (its coordinator's clock is ahead: worth a warning); else None."""
    ahead = record.created - now
    return ahead if skew_grace and ahead > skew_grace else None


def phase2_targets(record: TxRecord, known: Iterable[str]) -> list[str]:
    """The participants known here that have not acknowledged the decision."""
    names = set(known)
    return [p for p in record.unacked if p in names]


def recovery_plan(record: TxRecord, now: float, skew_grace: float) -> str:
    """What recovery does with an unfinished record: ``"pending"`` (undecided, within
    its deadline: left to its coordinator), ``"abort"`` (undecided, past it), or
    ``"finish"`` (decided: send the decision again)."""
    if record.state is TxState.STARTED:
        return "abort" if expired(record, now, skew_grace) else "pending"
    return "finish"


RECOVERY_ABORT_REASON = "deadline passed; aborted by recovery"
RESOLVE_ABORT_REASON = "deadline passed; presumed abort by resolve"


def file_recovered(report: RecoveryReport, record: TxRecord, known: Iterable[str]) -> None:
    """Enter a record recovery drove as far as it could in ``report``."""
    txid = record.txid
    if record.state.finished:
        (report.committed if record.outcome == "committed" else report.aborted).append(txid)
        return
    names = set(known)
    unknown = [p for p in record.unacked if p not in names]
    if unknown:
        report.incomplete[txid] = (
            f"{record.outcome}: participants not known here: {', '.join(unknown)}"
        )
    else:
        report.incomplete[txid] = f"{record.outcome}: no acknowledgement from " + ", ".join(
            record.unacked
        )


# -- log programs ---------------------------------------------------------------------


def read(txid: str) -> Steps[Stored | None]:
    """The record of ``txid`` and its entry (None if absent); LogCorrupted if unparsable."""
    entry: LogEntry | None = yield Read(txid)
    return None if entry is None else Stored(txlog.decode(txid, entry.data), entry)


def cas(stored: Stored, new: TxRecord, confirm: bool) -> Steps[Stored | None]:
    """Compare-and-set ``stored`` -> ``new``; None if the record changed meanwhile."""
    data = txlog.encode(new)
    try:
        entry = yield Cas(
            new.txid,
            stored.entry,
            data,
            new.state.finished,
            new.state.value,
            new.created,
            stored.record.state.value,
        )
    except BackendUnavailable:
        # Unknown outcome: read back; our exact bytes there mean it was applied (but
        # perhaps not replicated: the error may have been a WAIT that fell short).
        fresh = yield from read(new.txid)
        if fresh is not None and fresh.entry.data == data:
            return (yield from durable(fresh, confirm))
        if fresh is None and new.state.finished:
            raise  # applied and already expired, or never written: cannot tell
        return None
    return None if entry is None else Stored(new, entry)


def durable(stored: Stored, confirm: bool) -> Steps[Stored]:
    """``stored``, once its decision is known to be on ``min_replicas`` replicas.

    Only with ``confirm`` (min_replicas on Redis), and only for a decided, unfinished
    record: its same bytes are written again, and that write's WAIT confirms everything
    before it. Without this, a decision that only the primary holds could be sent to
    participants and then be lost in a failover, and the transaction presumed aborted
    after some of them committed. BackendUnavailable if not confirmed.
    """
    record = stored.record
    if not confirm or record.outcome is None or record.state.finished:
        return stored
    state = record.state.value
    entry = yield Cas(
        record.txid, stored.entry, txlog.encode(record), False, state, record.created, state
    )
    if entry is None:
        raise BackendUnavailable(
            f"transaction {record.txid!r} changed while its decision was being "
            "confirmed on the replicas; retry"
        )
    return Stored(record, entry)


def decide(
    stored: Stored, outcome: Outcome, reason: str, *, now: float, confirm: bool
) -> Steps[Stored]:
    """Move a started record to ``outcome``; returns whatever decision the log holds.

    If someone else decided first, their decision is returned (never overwritten).
    ``now`` is for operators only (``decided_at``): any host's clock is good enough.
    """
    for _ in range(_CAS_ROUNDS):
        if stored.record.outcome is not None:
            return (yield from durable(stored, confirm))
        decided = txlog.decide(stored.record, outcome, now=now, reason=reason)
        result = yield from cas(stored, decided, confirm)
        if result is not None:
            return result
        fresh = yield from read(stored.record.txid)
        if fresh is None:
            raise LogCorrupted(stored.record.txid, "the record vanished before its decision")
        stored = fresh
    raise BackendUnavailable(f"could not decide {stored.record.txid!r}: too much contention")


def record_acks(stored: Stored, acked: list[str], confirm: bool) -> Steps[Stored]:
    """Add ``acked`` to the record's acknowledgements (finishing it once all are in)."""
    for _ in range(_CAS_ROUNDS):
        if stored.record.state.finished:  # another coordinator or recoverer got there
            return stored
        new = txlog.acknowledge(stored.record, acked)
        if new.state is stored.record.state and new.acks == stored.record.acks:  # no news
            return stored
        result = yield from cas(stored, new, confirm)
        if result is not None:
            return result
        fresh = yield from read(stored.record.txid)
        if fresh is None:  # finished by someone else and already expired
            return stored
        stored = fresh
    return stored


def resolve(txid: str, *, skew_grace: float, decided_at: float, confirm: bool) -> Steps[Resolution]:
    """The outcome of ``txid`` as the log decides it; past the deadline an undecided
    transaction is aborted here by compare-and-set, so the answer is final. No record
    means abort (presumed abort)."""
    stored = yield from read(txid)
    if stored is None:
        return "aborted"
    if stored.record.outcome is not None:
        yield from durable(stored, confirm)  # the participant acts on it: it must not be lost
        return stored.record.outcome
    now: float = yield Now()
    if not expired(stored.record, now, skew_grace):
        return "pending"
    decided = yield from decide(
        stored, "aborted", RESOLVE_ABORT_REASON, now=decided_at, confirm=confirm
    )
    outcome = decided.record.outcome
    assert outcome is not None
    return outcome


class TxPage(list[TxRecord]):
    """A list of records from ``transactions()``, plus where the next page starts:
    :attr:`cursor`, None when this page reached the end of the log."""

    cursor: str | None = None


#: Records read per store call when ``transactions()`` lists everything.
LIST_PAGE = 1_000


def parse_cursor(cursor: object) -> tuple[float, str]:
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


def listing(
    state: TxState | str | None,
    limit: int | None,
    cursor: str | None,
    newest_first: bool,
    on_corrupted: Callable[[LogCorrupted], None],
) -> Steps[TxPage]:
    """``transactions()``: one page of at most ``limit`` records (every retained record
    without it, read :data:`LIST_PAGE` at a time) in ``state`` (any if None), past
    ``cursor``; unparsable ones are passed to ``on_corrupted`` and skipped. The
    arguments are checked before the first request."""
    states: Sequence[str] = (
        [s.value for s in TxState] if state is None else [txlog.check_state(state)]
    )
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive integer, got {limit!r}")
    after = None if cursor is None else parse_cursor(cursor)
    page = TxPage()
    while limit is None or len(page) < limit:
        want = LIST_PAGE if limit is None else limit - len(page)
        entries: list[tuple[float, str, LogEntry | None]] = yield Page(
            tuple(states), after, want, newest_first
        )
        for created, txid, entry in entries:
            after = (created, txid)
            if entry is None:
                continue  # expired between the index read and the record read
            try:
                page.append(txlog.decode(txid, entry.data))
            except LogCorrupted as exc:
                on_corrupted(exc)
        if len(entries) < want:
            return page  # the end of the log: no cursor
    page.cursor = None if after is None else f"{after[0]!r}:{after[1]}"
    return page


def warn_if_ahead(
    log: logging.Logger, record: TxRecord, now: float, skew_grace: float, extra: Any
) -> None:
    """Log a warning when ``record``'s coordinator clock runs ahead beyond the grace."""
    ahead = clock_ahead(record, now, skew_grace)
    if ahead is not None:
        log.warning(
            "transaction %s was created %.1f s in this host's future: the clock of %s "
            "is ahead of ours by more than max_clock_skew",
            record.txid,
            ahead,
            record.coordinator,
            extra=extra,
        )
