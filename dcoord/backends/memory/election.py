"""Leader elections in the embedded store: one record per election under a condition."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from ...perkey import PerKey
from ..base import LockGrant
from ..election_base import LeaderRecord

if TYPE_CHECKING:
    from . import MemoryServer


class _Election:
    """One election: its leader's token, term, value and deadline; ``version`` counts
    every change so that subscribers can tell one happened."""

    def __init__(self) -> None:
        self.token: object | None = None
        self.term = 0
        self.value = b""
        self.expires_at = 0.0
        self.version = 0

    def leading(self, token: object | None, now: float) -> bool:
        return token is not None and self.token is token and now < self.expires_at

    def vacant(self, now: float) -> bool:
        return self.token is None or now >= self.expires_at


class _Table:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.elections: dict[str, _Election] = {}

    def get(self, key: str) -> _Election:
        election = self.elections.get(key)
        if election is None:
            election = self.elections[key] = _Election()
        return election

    def changed(self, election: _Election) -> None:
        election.version += 1
        self.cond.notify_all()


_table: PerKey[MemoryServer, _Table] = PerKey(lambda server: _Table())


class MemoryElections:
    def __init__(self, server: MemoryServer, prefix: str) -> None:
        self._table = _table(server)
        self._prefix = prefix

    def _key(self, name: str) -> str:
        return f"{self._prefix}election/{name}"

    def candidate(self, name: str, ttl: float, value: bytes) -> MemoryCandidate:
        return MemoryCandidate(self._table, self._key(name), ttl, value)

    def leader(self, name: str) -> LeaderRecord | None:
        with self._table.cond:
            election = self._table.get(self._key(name))
            now = time.monotonic()
            if election.vacant(now):
                return None
            return LeaderRecord(election.term, election.value, election.expires_at - now)

    def subscribe(self, name: str) -> MemorySubscription:
        return MemorySubscription(self._table, self._key(name))

    def close(self) -> None:
        """Nothing runs in the background."""


class MemoryCandidate:
    def __init__(self, table: _Table, key: str, ttl: float, value: bytes) -> None:
        self._table = table
        self._key = key
        self._ttl = ttl
        self._value = value
        self._token: object | None = None

    def acquire(self, deadline: float | None) -> LockGrant | None:
        token = object()
        with self._table.cond:
            election = self._table.get(self._key)
            while True:
                now = time.monotonic()
                if election.vacant(now):
                    election.term += 1
                    election.token, election.value = token, self._value
                    election.expires_at = now + self._ttl
                    self._token = token
                    self._table.changed(election)
                    return LockGrant(election.term, election.expires_at)
                if deadline is not None and now >= deadline:
                    return None
                # Woken by any change; otherwise at the leader's expiry or our deadline.
                wait = election.expires_at - now
                self._table.cond.wait(wait if deadline is None else min(wait, deadline - now))

    def release(self) -> bool:
        token, self._token = self._token, None
        with self._table.cond:
            election = self._table.get(self._key)
            if token is None or election.token is not token:
                return False
            held = election.leading(token, time.monotonic())
            election.token = None
            self._table.changed(election)
            return held

    def extend(self, ttl: float) -> LockGrant | None:
        with self._table.cond:
            election = self._table.get(self._key)
            now = time.monotonic()
            if not election.leading(self._token, now):
                return None
            election.expires_at = now + ttl
            return LockGrant(election.term, election.expires_at)

    def proclaim(self, value: bytes) -> bool:
        with self._table.cond:
            election = self._table.get(self._key)
            if not election.leading(self._token, time.monotonic()):
                return False
            self._value = election.value = value
            self._table.changed(election)
            return True


class MemorySubscription:
    def __init__(self, table: _Table, key: str) -> None:
        self._table = table
        with table.cond:
            self._election = table.get(key)
            self._seen = self._election.version
        self._woken = False

    def wait(self, timeout: float) -> None:
        with self._table.cond:
            self._table.cond.wait_for(
                lambda: self._woken or self._election.version != self._seen, timeout
            )
            self._seen = self._election.version
            self._woken = False

    def wake(self) -> None:
        with self._table.cond:
            self._woken = True
            self._table.cond.notify_all()

    def close(self) -> None:
        """Nothing to release."""
