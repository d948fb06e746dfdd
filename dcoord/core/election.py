"""The rules of a leader election, shared by :mod:`dcoord.election` and
:mod:`dcoord.aio.election` (no I/O, no clock: ``now`` is an argument).

What a value may be, what a leader looks like to a reader, when a leadership is no
longer held and what its errors say, and how long a watcher may sleep before it
re-reads. Renewal timing is :mod:`.lockstate`'s (a leadership is renewed as a lock).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..backends.election_base import LeaderRecord
from ..errors import ConfigError, LockLost, LockNotOwned

MAX_VALUE_BYTES = 64 * 1024
# A watcher re-reads the leader at least this often even if no notification came: a
# backstop for notifications lost with a broken connection, not the way changes arrive.
WATCH_BACKSTOP = 10.0
# After a failed read a watcher retries after this long (the backend already retried).
WATCH_RETRY = 0.5
TTL_PASSED = "its TTL passed without a successful renewal"


def value_bytes(value: object) -> bytes:
    """A campaign's or proclamation's value as stored; ConfigError naming a bad one."""
    if isinstance(value, str):
        data = value.encode()
    elif isinstance(value, bytes | bytearray):
        data = bytes(value)
    else:
        raise ConfigError(f"election value must be str or bytes, got {value!r}")
    if len(data) > MAX_VALUE_BYTES:
        raise ConfigError(
            f"election value must be at most {MAX_VALUE_BYTES} bytes, got {len(data)} bytes "
            f"starting {data[:40]!r}"
        )
    return data


@dataclass(frozen=True)
class Leader:
    """The leader of an election at one moment: what ``election.leader()`` returns."""

    term: int
    """The leader's term (greater than that of every earlier leader of the election)."""
    raw: bytes
    """The leader's value as stored."""

    @property
    def value(self) -> str:
        """The value as text (UTF-8; undecodable bytes, say from another tool, replaced)."""
        return self.raw.decode(errors="replace")


def leader_of(record: LeaderRecord | None) -> Leader | None:
    """What a reader sees of the backend's record."""
    return None if record is None else Leader(record.term, record.value)


def watch_wait(record: LeaderRecord | None) -> float:
    """How long a watcher waits for a notification before it reads again: a leader that
    stops renewing expires without one (Redis), so no longer than its remaining TTL."""
    if record is not None and record.expires_in is not None:
        return min(WATCH_BACKSTOP, record.expires_in + 0.001)
    return WATCH_BACKSTOP


def not_held_reason(
    resigned: bool, lost_reason: str | None, expires_at: float, now: float
) -> str | None:
    """Why a leadership is not held at ``now`` (None while it is); ``expires_at`` is
    its conservative client-side deadline."""
    if lost_reason is not None:
        return lost_reason
    if resigned:
        return "resigned"
    if now >= expires_at:
        return TTL_PASSED
    return None


def not_held_error(name: str, term: int, what: str, reason: str) -> LockNotOwned:
    """The error of ``what`` (say "proclaim") on a leadership that is not held."""
    return LockNotOwned(
        f"cannot {what}: leadership of election {name!r} (term {term}) is not held: {reason}"
    )


def replaced_error(name: str, term: int) -> LockNotOwned:
    """The error of a proclamation the server refused: someone else leads now."""
    return LockNotOwned(
        f"cannot proclaim: election {name!r} term {term} is not led by this process any more"
    )


def lost_in_block_error(name: str, term: int, reason: str) -> LockLost:
    """Raised at the end of a clean ``with`` block during which leadership was lost."""
    return LockLost(
        f"leadership of election {name!r} (term {term}) was lost while the with-block ran: "
        f"{reason}. Another leader may have run at the same time; guard writes with the "
        "term (client.fence(...).admit(leadership.term))."
    )
