"""What a backend implements for leader election (the semantics live in dcoord/election.py).

A candidate is a :class:`~dcoord.backends.base.LockSlot` whose grant's fence is the
leader's *term*, plus :meth:`CandidateSlot.proclaim`; the store also reads the current
leader and tells followers when it changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .base import GroupSubscription, LockSlot


@dataclass(frozen=True)
class LeaderRecord:
    """The current leader of an election as the server sees it."""

    term: int
    """The leader's term: the fence of its grant, greater than every earlier term."""
    value: bytes
    """The value the leader campaigned with or last proclaimed."""
    expires_in: float | None
    """Seconds (server clock) until the leader expires unless renewed; None when the
    server deletes it itself and notifies subscribers (etcd leases)."""


class CandidateSlot(LockSlot, Protocol):
    """One campaign: acquire = become leader (fence = term), release = resign."""

    def proclaim(self, value: bytes) -> bool:
        """Replace the leader's value if this slot still leads; False if it does not."""
        ...


class ElectionStore(Protocol):
    """Leader elections of one backend. Names are validated by the core."""

    def candidate(self, name: str, ttl: float, value: bytes) -> CandidateSlot:
        """A new candidate for election ``name`` (nothing is written until it campaigns)."""
        ...

    def leader(self, name: str) -> LeaderRecord | None:
        """The current leader of ``name``, or None."""
        ...

    def subscribe(self, name: str) -> GroupSubscription:
        """Start listening for changes of leader of ``name`` (before reading it)."""
        ...

    def close(self) -> None:
        """Stop background work; idempotent."""
        ...
