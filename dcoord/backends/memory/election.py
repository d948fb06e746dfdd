"""Leader elections in the embedded store: one record per election under a condition."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ...convoyfree import convoy_free_condition
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
        self.cond = convoy_free_condition()
        self.elections: dict[str, _Election] = {}
        # Async candidates and watchers (aio_election.py): called under ``cond`` on every
        # change, each wakes its task on its own loop, thread-safely.
        self.wakers: set[Callable[[], None]] = set()

    def get(self, key: str) -> _Election:
        election = self.elections.get(key)
        if election is None:
            election = self.elections[key] = _Election()
        return election

    def changed(self, election: _Election) -> None:
        election.version += 1
        self.cond.notify_all()
        for wake in self.wakers:
            wake()


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

    def try_lead(self, token: object, now: float) -> LockGrant | None:
        """Lead if the election is vacant (under the table's ``cond``); else None."""
        election = self._table.get(self._key)
        if not election.vacant(now):
            return None
        election.term += 1
        election.token, election.value = token, self._value
        election.expires_at = now + self._ttl
        self._token = token
        self._table.changed(election)
        return LockGrant(election.term, election.expires_at)

    def wait_for(self, now: float, deadline: float | None) -> float:
        """How long a candidate that did not lead waits unless woken by a change: until
        the leader's expiry or its own deadline (under the table's ``cond``)."""
        wait = self._table.get(self._key).expires_at - now
        return wait if deadline is None else min(wait, deadline - now)

    def acquire(self, deadline: float | None) -> LockGrant | None:
        token = object()
        with self._table.cond:
            while True:
                now = time.monotonic()
                grant = self.try_lead(token, now)
                if grant is not None:
                    return grant
                if deadline is not None and now >= deadline:
                    return None
                self._table.cond.wait(self.wait_for(now, deadline))

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
