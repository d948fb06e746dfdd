"""Ready-made 2PC participants: :class:`KVParticipant`, a key-value store in the backend.

It is also the worked example for writing your own participant. Its state lives in the
backend under ``kvp/<name>/``::

    d/<key>    the committed value of <key>: {"v": value, "f": fence of its last writer}
    s/<txid>   the writes <txid> staged at prepare: {"w": {key: value|null}, "f": {key: fence}}
    o/<key>    <txid>: the key is reserved by a prepared transaction

Three mechanisms, each for one failure:

* ``prepare`` takes a dcoord lock per key (sorted order, bounded wait) for the
  read-validate-stage step only. The lock has a TTL, is not renewed and is released as
  soon as the writes are staged, so no lock is held while other participants prepare.
* Staging is one atomic backend write that succeeds only if every key still holds exactly
  the bytes read under the lock and is not reserved. The stored bytes carry the fence of
  the lock that wrote them, so a holder whose lock expired (a pause longer than its TTL)
  can neither stage from a stale read nor slip in behind a newer holder: it votes no.
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

import contextlib
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from numbers import Real
from typing import TYPE_CHECKING, Any

from .config import positive_seconds
from .errors import ConfigError, LockNotOwned
from .logfields import participant_fields

if TYPE_CHECKING:
    from .client import Client
    from .lock import Lock

log = logging.getLogger("dcoord.participants")

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DEFAULT_LOCK_TTL = 10.0
DEFAULT_LOCK_TIMEOUT = 5.0

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


class KVParticipant:
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
        self._kv = client.backend.kv
        self._root = f"kvp/{name}/"
        self._staged_here: dict[str, bytes] = {}  # txid -> staged bytes, until commit/abort
        self._mutex = threading.Lock()

    # -- reading ------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """The committed value of ``key`` (``default`` if it has none)."""
        raw = self._kv.get(self._data(_check_key(key)))
        return default if raw is None else _load(raw)["v"]

    def items(self) -> dict[str, Any]:
        """Every committed key and value."""
        prefix = self._root + "d/"
        return {k[len(prefix) :]: _load(v)["v"] for k, v in self._kv.scan(prefix).items()}

    def in_doubt(self) -> list[str]:
        """Transactions prepared here and not yet committed or aborted (like XA recover)."""
        prefix = self._root + "s/"
        return sorted(k[len(prefix) :] for k in self._kv.scan(prefix))

    # -- the participant protocol ---------------------------------------------------

    def validate(self, payload: Any) -> None:
        """ConfigError naming the problem if ``payload`` could never prepare here.

        :meth:`dcoord.Transaction.enlist` calls it, so bad input fails before anything is
        written. What only the current values decide (adding to a non-number, the
        ``validate`` callback of the constructor) is still a "no" vote at prepare.
        """
        changes = _parse(payload)
        if self.client.backend.kind != "etcd":
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

    def prepare(self, txid: str, payload: Any) -> bool:
        """Validate and stage the writes, reserving their keys; True is a durable yes.

        A key reserved by another prepared transaction is a conflict, settled by
        wait-die on the txids (a total order every participant agrees on): the smaller
        txid waits (up to ``lock_timeout``) for the reservation to go, the larger votes
        no at once. So parallel prepares at several participants never deadlock.
        """
        changes = _parse(payload)
        deadline = time.monotonic() + self.lock_timeout
        while True:
            locks: list[Lock] = []
            try:
                for key in sorted(changes):
                    lock = self.client.lock(
                        f"{self._root}{key}", ttl=self.lock_ttl, auto_renew=False
                    )
                    if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                        log.info(
                            "%s: %s votes no: key %r stayed locked",
                            self.name,
                            txid,
                            key,
                            extra=participant_fields(self.client.settings, self.name, txid),
                        )
                        return False
                    locks.append(lock)
                outcome = self._stage(txid, changes, locks)
            finally:
                for lock in locks:
                    _release(lock)
            if isinstance(outcome, bool):
                return outcome
            key, holder = outcome
            if txid > holder or not self._wait_unreserved(key, holder, deadline):
                log.info(
                    "%s: %s votes no: %r is reserved by %s",
                    self.name,
                    txid,
                    key,
                    holder,
                    extra=participant_fields(self.client.settings, self.name, txid),
                )
                return False

    def _stage(
        self, txid: str, changes: Mapping[str, _Change], locks: list[Lock]
    ) -> bool | tuple[str, str]:
        """Stage under the key locks: True, False (vote no), or (key, reserving txid)."""
        keys = sorted(changes)
        raw = {key: self._kv.get(self._data(key)) for key in keys}
        new: dict[str, Any] = {}
        fences: dict[str, int] = {}
        for key, lock in zip(keys, locks, strict=True):
            stored = raw[key]
            current = None if stored is None else _load(stored)
            if current is not None and current["f"] >= lock.fence:
                # A later lock holder wrote this key: our lock expired under us.
                log.info(
                    "%s: %s votes no: stale fence on %r",
                    self.name,
                    txid,
                    key,
                    extra=participant_fields(self.client.settings, self.name, txid),
                )
                return False
            new[key] = changes[key](None if current is None else current["v"])
            fences[key] = lock.fence
        if self._validate_values is not None and not self._validate_values(new):
            return False
        staged_key = self._staged(txid)
        only_if: dict[str, bytes | None] = {staged_key: None}
        only_if.update({self._data(key): raw[key] for key in keys})
        only_if.update({self._owner(key): None for key in keys})
        puts = {
            staged_key: _dump({"w": new, "f": fences}),
            **{self._owner(key): txid.encode() for key in keys},
        }
        if self._kv.apply(puts, only_if=only_if):
            with self._mutex:
                self._staged_here[txid] = puts[staged_key]
            return True
        for key in keys:
            holder = self._kv.get(self._owner(key))
            if holder is not None and holder.decode() != txid:
                return key, holder.decode()
        # Our own staged record: a repeated prepare, which already voted yes. Otherwise a
        # key changed since read although locked: our lock expired meanwhile.
        return self._kv.get(staged_key) is not None

    def _wait_unreserved(self, key: str, holder: str, deadline: float) -> bool:
        """Wait (bounded backoff) until ``holder`` no longer reserves ``key``."""
        delay = 0.005
        while time.monotonic() + delay < deadline:
            time.sleep(delay)
            current = self._kv.get(self._owner(key))
            if current is None or current.decode() != holder:
                return True
            delay = min(delay * 2, 0.1)
        return False

    def commit(self, txid: str) -> None:
        """Apply the staged writes atomically and release the keys; idempotent."""
        staged_key = self._staged(txid)
        with self._mutex:
            raw = self._staged_here.pop(txid, None)
        # Staged by this instance: skip the read. The apply below is conditional on the
        # staged bytes, so it is a no-op if someone else committed them meanwhile.
        raw = raw or self._kv.get(staged_key)
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
        self._kv.apply(puts, deletes, only_if={staged_key: raw})

    def abort(self, txid: str) -> None:
        """Drop the staged writes and release the keys; idempotent, fine if never prepared."""
        staged_key = self._staged(txid)
        with self._mutex:
            self._staged_here.pop(txid, None)
        raw = self._kv.get(staged_key)
        if raw is None:
            return
        deletes = [staged_key, *(self._owner(key) for key in _load(raw)["w"])]
        self._kv.apply({}, deletes, only_if={staged_key: raw})

    def __repr__(self) -> str:
        return f"<dcoord.KVParticipant {self.name!r} on {self.client.url}>"

    # -- helpers ------------------------------------------------------------------

    def _data(self, key: str) -> str:
        return f"{self._root}d/{key}"

    def _owner(self, key: str) -> str:
        return f"{self._root}o/{key}"

    def _staged(self, txid: str) -> str:
        return f"{self._root}s/{txid}"


def _release(lock: Lock) -> None:
    # LockNotOwned: its TTL ran out first; the reservation kept the key safe meanwhile.
    with contextlib.suppress(LockNotOwned):
        lock.release()


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
