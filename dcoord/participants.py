"""Ready-made 2PC participants: :class:`KVParticipant`, a key-value store in the backend.

It is also the worked example for writing your own participant. Its state lives in the
backend's plain keys under ``kvp/<name>/`` (on Redis ``kvp/{<name>}/``: one hash tag, so
that every multi-key step of a participant stays in one Redis Cluster slot)::

    d/<key>    the committed value of <key>: {"v": value, "f": version (1, 2, ...)}
    s/<txid>   the writes <txid> staged at prepare: {"w": {key: value|null}, "f": {key: version}}
    o/<key>    <txid>: the key is reserved by a prepared transaction

Three mechanisms, each for one failure:

* ``prepare`` computes the new values from the current ones and stages them in one
  atomic backend write (a Lua script on Redis, a transaction on etcd) that succeeds only
  if every key still holds exactly the bytes computed from and none is reserved. If the
  bytes were out of date the write fails, returns the current ones, and prepare computes
  again: a prepare paused for any time between its read and its write cannot stage from
  what it read. The participant remembers the bytes it last saw or wrote for each key,
  so a prepare usually costs one round trip and takes no lock at all.
* Each write of a key stores the next version with the value, so its bytes never repeat
  and a condition on them cannot be met by an older state come back.
* The reservation (``o/<key>``) has no TTL: it is the durable "prepared" row lock, held
  from prepare to commit/abort. A transaction that meets it settles the conflict by
  wait-die on the txids (the smaller waits, the larger votes no), so prepares running in
  parallel at several participants cannot deadlock. If the participant's process dies
  between prepare and commit nothing is lost: the reservation keeps other transactions
  off the keys until the outcome is known, and then *any* process with
  ``KVParticipant(client, name)`` commits or aborts from the staged record, exactly as
  the dead one would have.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from numbers import Real
from typing import TYPE_CHECKING, Any, TypeVar

from .config import positive_seconds
from .core.twopc_state import run
from .errors import ConfigError
from .logfields import participant_fields

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("dcoord.participants")
T = TypeVar("T")

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DEFAULT_LOCK_TTL = 10.0
DEFAULT_LOCK_TIMEOUT = 5.0
# How many keys' last-seen bytes a participant keeps to prepare in one round trip.
KNOWN_KEYS = 10_000

# etcd refuses a transaction with more than --max-txn-ops (default 128) compares or
# writes; staging or committing k keys takes 2k+1 of each (per key: its value and its
# reservation; plus the staged record).
ETCD_MAX_KEYS = (128 - 1) // 2
# etcd refuses a request above --max-request-bytes (default 1.5 MiB); the staged record
# carries every new value, so leave room for keys and fences.
ETCD_MAX_PAYLOAD_BYTES = 1 << 20

_Change = Callable[[Any], Any]
Validator = Callable[[Mapping[str, Any]], bool]
"""Called at prepare with the new value of every key the payload touches (None for a
delete); returning False votes no."""


@dataclass(frozen=True)
class Get:
    """Request of a participant program: the bytes of ``key`` (None: absent)."""

    key: str


@dataclass(frozen=True)
class Swap:
    """Request: the store's ``swap(puts, deletes, only_if)`` (None: applied, else what
    the condition keys hold)."""

    puts: Mapping[str, bytes]
    deletes: tuple[str, ...] = ()
    only_if: Mapping[str, bytes | None] | None = None


@dataclass(frozen=True)
class Sleep:
    """Request: wait ``seconds`` (a wait-die wait for a reservation to go)."""

    seconds: float


Request = Get | Swap | Sleep
Steps = Generator[Request, Any, T]


class KVCore:
    """What a sync and an async KVParticipant share: checks, keys, the memory of the
    keys' last bytes, and the protocol itself as programs (:data:`Steps`) that yield
    store requests; :class:`KVParticipant` answers them with blocking calls,
    :class:`dcoord.aio.AsyncKVParticipant` with awaits. See :class:`KVParticipant`.
    """

    def __init__(
        self,
        client: Any,
        name: str,
        *,
        validate: Validator | None = None,
        lock_ttl: float = DEFAULT_LOCK_TTL,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    ) -> None:
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise ConfigError(
                "participant name must be 1-64 letters, digits, '_', '.', '-' "
                f"(starting with a letter or digit), got {name!r}"
            )
        self.client = client
        self.name = name
        self._validate_values = validate
        self.lock_ttl = positive_seconds("lock_ttl", lock_ttl)
        self.lock_timeout = positive_seconds("lock_timeout", lock_timeout)
        self._kind: str = client.backend.kind
        # Each prepare, commit and abort is one atomic step over several of these keys:
        # on Redis they share a hash tag (a Cluster runs a step in one slot only). etcd
        # keeps the untagged names it always had.
        tag = f"{{{name}}}" if self._kind == "redis" else name
        self._root = f"kvp/{tag}/"
        self._staged_here: dict[str, bytes] = {}  # txid -> staged bytes, until commit/abort
        self._known: dict[str, bytes | None] = {}  # key -> its bytes as last seen or written
        # Never held across a request: a sync and an async driver may share it.
        self._mutex = threading.Lock()

    # -- what reads return --------------------------------------------------------

    def _value(self, raw: bytes | None, default: Any) -> Any:
        return default if raw is None else _load(raw)["v"]

    def _items(self, found: Mapping[str, bytes]) -> dict[str, Any]:
        prefix = self._root + "d/"
        return {k[len(prefix) :]: _load(v)["v"] for k, v in found.items()}

    def _txids(self, found: Mapping[str, bytes]) -> list[str]:
        prefix = self._root + "s/"
        return sorted(k[len(prefix) :] for k in found)

    def _owners(self, found: Mapping[str, bytes]) -> dict[str, str]:
        prefix = self._root + "o/"
        return {k[len(prefix) :]: v.decode() for k, v in found.items()}

    # -- the participant protocol ---------------------------------------------------

    def validate(self, payload: Any) -> None:
        """ConfigError naming the problem if ``payload`` could never prepare here.

        :meth:`dcoord.Transaction.enlist` calls it, so bad input fails before anything is
        written. What only the current values decide (adding to a non-number, the
        ``validate`` callback of the constructor) is still a "no" vote at prepare.
        """
        changes = _parse(payload)
        if self._kind != "etcd":
            return
        if len(changes) > ETCD_MAX_KEYS:
            raise ConfigError(
                f"payload for {self.name!r} touches {len(changes)} keys; on etcd one "
                f"transaction can apply at most {ETCD_MAX_KEYS} (--max-txn-ops 128)"
            )
        size = len(_dump(payload))
        if size > ETCD_MAX_PAYLOAD_BYTES:
            raise ConfigError(
                f"payload for {self.name!r} is {size} bytes as JSON; on etcd at most "
                f"{ETCD_MAX_PAYLOAD_BYTES} fit in one transaction (--max-request-bytes)"
            )

    def _prepare_steps(self, txid: str, payload: Any) -> Steps[bool]:
        """The prepare of :meth:`KVParticipant.prepare`, as a program."""
        changes = _parse(payload)
        deadline = time.monotonic() + self.lock_timeout
        keys = sorted(changes)
        with self._mutex:
            # A guess (None: absent) until the backend confirms it, by applying or by
            # answering with the truth.
            seen = {key: self._known.get(key) for key in keys}
        confirmed = False
        while True:
            staged = self._compute(changes, seen)
            if isinstance(staged, ConfigError | str):
                if confirmed:
                    if isinstance(staged, ConfigError):
                        raise staged  # adding to a non-number: the vote says why
                    return self._vote_no(txid, staged)
                # Refuse only on confirmed values: a stale guess must not cost a no.
                truth = yield Swap({}, (), {self._data(k): v for k, v in seen.items()})
                confirmed = True
                if truth is not None:
                    seen = self._learn(keys, truth)
                continue
            current = yield from self._stage(txid, keys, seen, staged)
            if current is None:
                return True
            if current[self._staged(txid)] is not None:
                return True  # our own staged record: a repeated prepare, already a yes
            seen = self._learn(keys, current)
            confirmed = True
            for key in keys:
                holder = current[self._owner(key)]
                if holder is not None and holder.decode() != txid:
                    if txid > holder.decode() or not (
                        yield from self._wait_unreserved(key, holder.decode(), deadline)
                    ):
                        return self._vote_no(txid, f"{key!r} is reserved by {holder.decode()}")
                    break
            if time.monotonic() >= deadline:
                return self._vote_no(txid, "its keys kept changing until lock_timeout")

    def _compute(self, changes: Mapping[str, _Change], seen: Mapping[str, bytes | None]) -> Any:
        """The staged record from the values in ``seen``, or why it cannot be: the
        ConfigError of an ``add`` to a non-number, or the validate callback's no (a str)."""
        new: dict[str, Any] = {}
        versions: dict[str, int] = {}
        for key, change in changes.items():
            stored = seen[key]
            current = None if stored is None else _load(stored)
            try:
                new[key] = change(None if current is None else current["v"])
            except ConfigError as exc:
                return exc
            # Each write of a key gets the next version: its stored bytes never repeat,
            # so a condition on them cannot be met by an older state come back.
            versions[key] = 1 if current is None else current["f"] + 1
        if self._validate_values is not None and not self._validate_values(new):
            return "the validate callback refused the new values"
        return {"w": new, "f": versions}

    def _stage(
        self, txid: str, keys: list[str], seen: Mapping[str, bytes | None], staged: Any
    ) -> Steps[dict[str, bytes | None] | None]:
        """One atomic write: stage and reserve if every key still holds ``seen`` and is
        unreserved. None if staged, else what the condition keys hold."""
        staged_key = self._staged(txid)
        only_if: dict[str, bytes | None] = {staged_key: None}
        only_if.update({self._data(key): seen[key] for key in keys})
        only_if.update({self._owner(key): None for key in keys})
        record = _dump(staged)
        puts = {staged_key: record, **{self._owner(key): txid.encode() for key in keys}}
        current: dict[str, bytes | None] | None = yield Swap(puts, (), only_if)
        if current is None:
            with self._mutex:
                self._staged_here[txid] = record
        return current

    def _learn(
        self, keys: list[str], current: Mapping[str, bytes | None]
    ) -> dict[str, bytes | None]:
        """The data values in a backend answer, remembered for the next prepare."""
        seen = {key: current[self._data(key)] for key in keys}
        with self._mutex:
            self._remember(seen)
        return seen

    def _remember(self, values: Mapping[str, bytes | None]) -> None:
        # Called with _mutex held. A bounded memory: a forgotten key costs one round trip.
        if len(self._known) + len(values) > KNOWN_KEYS:
            self._known.clear()
        self._known.update(values)

    def _vote_no(self, txid: str, why: str) -> bool:
        log.info(
            "%s: %s votes no: %s",
            self.name,
            txid,
            why,
            extra=participant_fields(self.client.settings, self.name, txid),
        )
        return False

    def _wait_unreserved(self, key: str, holder: str, deadline: float) -> Steps[bool]:
        """Wait (bounded backoff) until ``holder`` no longer reserves ``key``."""
        delay = 0.005
        while time.monotonic() + delay < deadline:
            yield Sleep(delay)
            current = yield Get(self._owner(key))
            if current is None or current.decode() != holder:
                return True
            delay = min(delay * 2, 0.1)
        return False

    def _commit_steps(self, txid: str) -> Steps[None]:
        """The commit of :meth:`KVParticipant.commit`, as a program."""
        staged_key = self._staged(txid)
        with self._mutex:
            raw = self._staged_here.pop(txid, None)
        # Staged by this instance: skip the read. The apply below is conditional on the
        # staged bytes, so it is a no-op if someone else committed them meanwhile.
        raw = raw or (yield Get(staged_key))
        if raw is None:
            return  # already committed (or never prepared: nothing of ours to apply)
        staged = _load(raw)
        puts: dict[str, bytes] = {}
        deletes = [staged_key]
        for key, value in staged["w"].items():
            deletes.append(self._owner(key))
            if value is None:
                deletes.append(self._data(key))
            else:
                puts[self._data(key)] = _dump({"v": value, "f": staged["f"][key]})
        if (yield Swap(puts, tuple(deletes), {staged_key: raw})) is None:
            with self._mutex:
                self._remember({key: puts.get(self._data(key)) for key in staged["w"]})

    def _abort_steps(self, txid: str) -> Steps[None]:
        """The abort of :meth:`KVParticipant.abort`, as a program."""
        staged_key = self._staged(txid)
        with self._mutex:
            raw = self._staged_here.pop(txid, None)
        # As in commit: staged here, the conditional apply needs no read first.
        raw = raw or (yield Get(staged_key))
        if raw is None:
            return
        deletes = (staged_key, *(self._owner(key) for key in _load(raw)["w"]))
        yield Swap({}, deletes, {staged_key: raw})

    # -- helpers ------------------------------------------------------------------

    def _data(self, key: str) -> str:
        return f"{self._root}d/{key}"

    def _owner(self, key: str) -> str:
        return f"{self._root}o/{key}"

    def _staged(self, txid: str) -> str:
        return f"{self._root}s/{txid}"


class KVParticipant(KVCore):
    """A key-value store in the client's backend that takes part in two-phase commit.

    The payload of a transaction is a mapping of operations::

        {"set": {"k": value}, "add": {"balance:alice": -10}, "delete": ["k2"]}

    Values are anything JSON can hold; ``add`` adds a number to a numeric value (a
    missing key counts as 0). Each key may appear in one operation only. On etcd one
    payload may touch at most :data:`ETCD_MAX_KEYS` keys (63). :meth:`validate` checks
    all this when the payload is enlisted.
    """

    def __init__(
        self,
        client: Client,
        name: str,
        *,
        validate: Validator | None = None,
        lock_ttl: float = DEFAULT_LOCK_TTL,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    ) -> None:
        """``lock_timeout`` bounds how long a prepare waits for a reservation to go (and
        retries keys that keep changing) before it votes no. ``lock_ttl`` is only checked:
        prepare takes no key locks any more; it is accepted so existing callers keep
        working."""
        super().__init__(
            client, name, validate=validate, lock_ttl=lock_ttl, lock_timeout=lock_timeout
        )
        self._kv = client.backend.kv

    # -- reading ------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """The committed value of ``key`` (``default`` if it has none)."""
        return self._value(self._kv.get(self._data(_check_key(key))), default)

    def items(self) -> dict[str, Any]:
        """Every committed key and value."""
        return self._items(self._kv.scan(self._root + "d/"))

    def in_doubt(self) -> list[str]:
        """Transactions prepared here and not yet committed or aborted (like XA recover)."""
        return self._txids(self._kv.scan(self._root + "s/"))

    def reserved(self) -> dict[str, str]:
        """Key -> the txid of the prepared transaction that reserves it."""
        return self._owners(self._kv.scan(self._root + "o/"))

    # -- the participant protocol ---------------------------------------------------

    def prepare(self, txid: str, payload: Any) -> bool:
        """Validate and stage the writes, reserving their keys; True is a durable yes.

        One round trip when this instance knows the keys' current bytes (it wrote or
        read them last): the staging write is conditional on those bytes, and when they
        were out of date it fails and returns the current ones, to compute from again.

        A key reserved by another prepared transaction is a conflict, settled by
        wait-die on the txids (a total order every participant agrees on): the smaller
        txid waits (up to ``lock_timeout``) for the reservation to go, the larger votes
        no at once. So parallel prepares at several participants never deadlock.
        """
        return run(self._prepare_steps(txid, payload), self._answer)

    def commit(self, txid: str) -> None:
        """Apply the staged writes atomically and release the keys; idempotent."""
        run(self._commit_steps(txid), self._answer)

    def abort(self, txid: str) -> None:
        """Drop the staged writes and release the keys; idempotent, fine if never prepared."""
        run(self._abort_steps(txid), self._answer)

    def _answer(self, request: Request) -> Any:
        if isinstance(request, Get):
            return self._kv.get(request.key)
        if isinstance(request, Swap):
            return self._kv.swap(request.puts, request.deletes, request.only_if)
        time.sleep(request.seconds)
        return None

    def __repr__(self) -> str:
        return f"<dcoord.KVParticipant {self.name!r} on {self.client.url}>"


def _check_key(key: object) -> str:
    if not isinstance(key, str) or not key:
        raise ConfigError(f"a KVParticipant key must be a non-empty str, got {key!r}")
    return key


def _parse(payload: Any) -> dict[str, _Change]:
    """Payload -> {key: function from the current value to the new one (None: delete)}."""
    if not isinstance(payload, Mapping) or not payload:
        raise ConfigError(f"KVParticipant payload must be a non-empty mapping, got {payload!r}")
    unknown = sorted(set(payload) - {"set", "add", "delete"})
    if unknown:
        raise ConfigError(f"unknown KVParticipant operation {unknown[0]!r} (set, add, delete)")
    changes: dict[str, _Change] = {}

    def claim(key: object, change: _Change) -> None:
        if _check_key(key) in changes:
            raise ConfigError(f"key {key!r} appears in more than one operation")
        changes[str(key)] = change

    for key, value in _mapping(payload, "set").items():
        try:
            _dump(value)
        except (TypeError, ValueError, RecursionError) as exc:
            raise ConfigError(f"set value for {key!r} cannot be stored as JSON: {exc}") from None
        claim(key, _constant(value))
    for key, amount in _mapping(payload, "add").items():
        if isinstance(amount, bool) or not isinstance(amount, Real):
            raise ConfigError(f"add amount for {key!r} must be a number, got {amount!r}")
        if not math.isfinite(amount):
            raise ConfigError(f"add amount for {key!r} must be finite, got {amount!r}")
        claim(key, _adder(key, amount))
    deletes = payload.get("delete", [])
    if not isinstance(deletes, list | tuple):
        raise ConfigError(f"delete must be a list of keys, got {deletes!r}")
    for key in deletes:
        claim(key, lambda _old: None)
    return changes


def _mapping(payload: Mapping[str, Any], op: str) -> Mapping[str, Any]:
    value = payload.get(op, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"{op} must be a mapping of key to value, got {value!r}")
    return value


def _constant(value: Any) -> _Change:
    return lambda _old: value


def _adder(key: str, amount: Any) -> _Change:
    def add(old: Any) -> Any:
        if old is None:
            return amount
        if isinstance(old, bool) or not isinstance(old, Real):
            raise ConfigError(f"cannot add to {key!r}: its value {old!r} is not a number")
        return old + amount

    return add


def _dump(doc: object) -> bytes:
    # allow_nan=False: NaN and infinities are not JSON; other readers could not parse them.
    return json.dumps(doc, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()


def _load(raw: bytes) -> Any:
    return json.loads(raw)
