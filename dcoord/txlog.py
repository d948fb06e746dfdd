"""Transaction log records and their state machine: pure, no I/O.

A record is written when a transaction starts (before any participant is asked to
prepare) and changes only along these edges, each a compare-and-set in the backend::

    started ──> committing ──> committed        (committing ──> committing: more acks)
       └──────> aborting ───> aborted           (aborting ──> aborting: more acks)

``committing`` and ``aborting`` *are* the decision: once a record leaves ``started`` its
outcome never changes. ``committed`` / ``aborted`` mean every participant acknowledged
(the record is "done" and may be forgotten after the retention period). No record, or a
``started`` record whose deadline passed, means abort (presumed abort).

Records are JSON with a schema version; a record that does not parse raises
:class:`~dcoord.LogCorrupted` naming the transaction.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any, Literal

from .errors import ConfigError, InvalidTransition, LogCorrupted

SCHEMA_VERSION = 1
# json's C encoder, called directly: JSONEncoder.encode() builds one per call behind a
# few layers of Python, which cost more than encoding a record's small dicts (a few per
# transaction). The record encoder is built once: it walks only dcoord's own values
# (no cycles), so it needs no markers and can be shared by threads. A payload's may
# contain itself: its encoder gets fresh markers per call (a shared dict would see one
# thread's marks from another digesting the same payload: a false "circular").
_COMPACT = c_make_encoder(
    None, json.JSONEncoder().default, encode_basestring_ascii, None, ":", ",", False, False, True
)
_TXID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")

Outcome = Literal["committed", "aborted"]
# What a transition may change; every other field is fixed when the record is created.
_CHANGING = frozenset({"decided_at", "acks", "reason"})


class TxState(StrEnum):
    """Where a transaction is; see the module docstring for the allowed edges."""

    STARTED = "started"
    COMMITTING = "committing"
    COMMITTED = "committed"
    ABORTING = "aborting"
    ABORTED = "aborted"

    # Looked up, not worked out: every commit asks these several times, and an Enum's
    # member lookups (TxState.COMMITTED) cost more than one dict lookup.
    @property
    def finished(self) -> bool:
        """Every participant acknowledged the outcome: nothing is left to do."""
        return _FINISHED[self]

    @property
    def outcome(self) -> Outcome | None:
        """The decision this state carries, or None while undecided (``started``)."""
        return _OUTCOMES[self]


_OUTCOMES: Mapping[TxState, Outcome | None] = {
    TxState.STARTED: None,
    TxState.COMMITTING: "committed",
    TxState.COMMITTED: "committed",
    TxState.ABORTING: "aborted",
    TxState.ABORTED: "aborted",
}
_FINISHED: Mapping[TxState, bool] = {
    state: state in (TxState.COMMITTED, TxState.ABORTED) for state in TxState
}


TRANSITIONS: Mapping[TxState, frozenset[TxState]] = {
    TxState.STARTED: frozenset({TxState.COMMITTING, TxState.ABORTING}),
    TxState.COMMITTING: frozenset({TxState.COMMITTING, TxState.COMMITTED}),
    TxState.ABORTING: frozenset({TxState.ABORTING, TxState.ABORTED}),
    TxState.COMMITTED: frozenset(),
    TxState.ABORTED: frozenset(),
}


@dataclass(frozen=True)
class TxRecord:
    """One transaction as the log holds it. Times are Unix seconds."""

    txid: str
    state: TxState
    participants: tuple[str, ...]
    created: float
    deadline: float
    digests: Mapping[str, str] = field(default_factory=dict)
    """Participant name -> SHA-256 of its payload, so an operator can match what was sent."""
    decided_at: float | None = None
    acks: tuple[str, ...] = ()
    """Participants that acknowledged the decision (commit or abort)."""
    coordinator: str = ""
    """Who started it (host:pid), for operators."""
    reason: str = ""
    """Why it aborted (votes, timeout, resolver), empty when it committed."""
    version: int = SCHEMA_VERSION
    head: str = field(default="", compare=False, repr=False)
    """Internal: the fields no transition changes (txid, participants, digests, times,
    coordinator, version) as the opening of the record's JSON, made once by
    :func:`new_record` and carried to every later version (:func:`transition` only
    changes the others), so that each of a transaction's writes encodes only what
    changed. Empty (a record read from the log): :func:`encode` makes it."""

    @property
    def outcome(self) -> Outcome | None:
        return self.state.outcome

    @property
    def unacked(self) -> tuple[str, ...]:
        """Participants that still have to hear the decision."""
        return tuple(p for p in self.participants if p not in self.acks)

    def expired(self, now: float) -> bool:
        """The deadline passed: an undecided transaction may now be presumed aborted."""
        return now >= self.deadline


def check_txid(txid: object) -> str:
    """Validate a transaction id (what ``tx show`` / ``resolve`` accept)."""
    if not isinstance(txid, str) or not _TXID_RE.fullmatch(txid):
        raise ConfigError(
            f"transaction id must be 1-128 letters, digits, '_', '.', ':', '-', got {txid!r}"
        )
    return txid


def check_state(state: object) -> TxState:
    """Turn a state name into a :class:`TxState` (ConfigError naming it otherwise)."""
    try:
        return TxState(str(state))
    except ValueError:
        known = ", ".join(s.value for s in TxState)
        raise ConfigError(f"unknown transaction state {state!r}; known: {known}") from None


def digest(payload: object, *, what: str = "payload") -> str:
    """A stable short digest of a payload (canonical JSON, repr for what JSON cannot hold).

    ConfigError naming ``what`` for a structure that cannot be walked (it contains itself,
    or nests deeper than Python's recursion limit).
    """
    canonical = c_make_encoder({}, repr, encode_basestring_ascii, None, ":", ",", True, False, True)
    try:
        text = "".join(canonical(payload, 0))
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{what} cannot be digested for the log: {exc}") from None
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def new_record(
    txid: str,
    payloads: Mapping[str, object],
    *,
    now: float,
    timeout: float,
    coordinator: str = "",
    digests: Mapping[str, str] | None = None,
) -> TxRecord:
    """The ``started`` record of a transaction with these participants and payloads.

    ``digests`` (participant -> :func:`digest` of its payload, for every participant)
    are used as given when the caller already made them, as ``enlist()`` does: the log
    then records the payloads as they were enlisted.
    """
    if not payloads:
        raise ConfigError(f"transaction {txid!r} has no participants: enlist at least one")
    if digests is None:
        digests = {name: digest(p) for name, p in payloads.items()}
    elif digests.keys() != payloads.keys():
        raise ConfigError(
            f"transaction {txid!r}: digests for {sorted(digests)}, payloads for {sorted(payloads)}"
        )
    # Built as _evolve builds, not by the frozen dataclass's __init__ (a few us per
    # transaction): every field is set here, from values of the right types.
    record = object.__new__(TxRecord)
    record.__dict__.update(
        txid=check_txid(txid),
        state=TxState.STARTED,
        participants=tuple(payloads),
        created=now,
        deadline=now + timeout,
        digests=dict(digests),
        decided_at=None,
        acks=(),
        coordinator=coordinator,
        reason="",
        version=SCHEMA_VERSION,
    )
    record.__dict__["head"] = _head(record)
    return record


def transition(record: TxRecord, to: TxState, **changes: Any) -> TxRecord:
    """``record`` moved to state ``to`` with ``changes`` (of ``decided_at``, ``acks``,
    ``reason``: nothing else changes after creation); InvalidTransition if not allowed."""
    if not changes.keys() <= _CHANGING:
        raise ConfigError(f"a transition changes only {sorted(_CHANGING)}, not {sorted(changes)}")
    if to not in TRANSITIONS[record.state]:
        raise InvalidTransition(record.txid, record.state.value, to.value)
    return _evolve(record, state=to, **changes)


def _evolve(record: TxRecord, **changes: Any) -> TxRecord:
    """``dataclasses.replace(record, **changes)`` for fields that need no checking, at a
    tenth of its cost (it re-runs ``__init__`` field by field): a few per commit."""
    new = object.__new__(TxRecord)
    new.__dict__.update(record.__dict__, **changes)
    return new


def decide(record: TxRecord, outcome: Outcome, *, now: float, reason: str = "") -> TxRecord:
    """Record the decision: ``started`` -> ``committing`` or ``aborting``."""
    to = TxState.COMMITTING if outcome == "committed" else TxState.ABORTING
    return transition(record, to, decided_at=now, reason=reason)


def acknowledge(record: TxRecord, names: Iterable[str]) -> TxRecord:
    """Add acknowledgements; moves to ``committed``/``aborted`` once everyone has acked."""
    new = set(names)
    unknown = sorted(new - set(record.participants))
    if unknown:
        raise ConfigError(f"transaction {record.txid!r} has no participant {unknown[0]!r}")
    acks = tuple(p for p in record.participants if p in record.acks or p in new)
    if set(acks) != set(record.participants):
        return transition(record, record.state, acks=acks)
    done = TxState.COMMITTED if record.state is TxState.COMMITTING else TxState.ABORTED
    return transition(record, done, acks=acks)


def encode(record: TxRecord) -> bytes:
    """The record as compact JSON bytes (what the backend stores): its :attr:`~TxRecord.head`
    (made here if the record has none), then the fields that change."""
    changing = {
        "state": record.state.value,
        "decided_at": record.decided_at,
        "acks": list(record.acks),
        "reason": record.reason,
    }
    # "{...}" without its "{", after the head's "{...," (a JSON object either way).
    return (record.head or _head(record)).encode() + "".join(_COMPACT(changing, 0))[1:].encode()


def _head(record: TxRecord) -> str:
    """The fields no transition changes, as the opening of a JSON object: ``{...,``."""
    fixed = {
        "v": record.version,
        "txid": record.txid,
        "participants": list(record.participants),
        "digests": dict(record.digests),
        "created": record.created,
        "deadline": record.deadline,
        "coordinator": record.coordinator,
    }
    return "".join(_COMPACT(fixed, 0))[:-1] + ","


def decode(txid: str, data: bytes) -> TxRecord:
    """Parse stored bytes; LogCorrupted naming ``txid`` if they are not a valid record."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise LogCorrupted(txid, f"not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise LogCorrupted(txid, f"expected a JSON object, got {type(doc).__name__}")
    version = doc.get("v")
    if version != SCHEMA_VERSION:
        raise LogCorrupted(txid, f"schema version {version!r} (this dcoord reads {SCHEMA_VERSION})")
    try:
        record = TxRecord(
            txid=_typed(doc, "txid", str),
            state=TxState(_typed(doc, "state", str)),
            participants=tuple(_str_list(doc, "participants")),
            created=float(_typed(doc, "created", (int, float))),
            deadline=float(_typed(doc, "deadline", (int, float))),
            digests={str(k): str(v) for k, v in _typed(doc, "digests", dict).items()},
            decided_at=_optional_float(doc.get("decided_at")),
            acks=tuple(_str_list(doc, "acks")),
            coordinator=_typed(doc, "coordinator", str),
            reason=_typed(doc, "reason", str),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise LogCorrupted(txid, f"bad field: {exc}") from None
    if record.txid != txid:
        raise LogCorrupted(txid, f"record names another transaction {record.txid!r}")
    if not record.participants or not set(record.acks) <= set(record.participants):
        raise LogCorrupted(txid, "participants/acks are inconsistent")
    return record


def _typed(doc: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = doc[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"{name}={value!r}")
    return value


def _str_list(doc: Mapping[str, Any], name: str) -> list[str]:
    value = _typed(doc, name, list)
    if not all(isinstance(v, str) for v in value):
        raise TypeError(f"{name}={value!r}")
    return list(value)


def _optional_float(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"decided_at={value!r}")
    return float(value)
