"""The lock's timing rules, with the clock as an argument (no I/O, no threads).

Every decision a lock handle makes about time lives here once: how the server's grant
is shortened into the client's conservative deadline, when the watchdog looks at a
held lock again, whether it renews or declares the lock lost, and what a renewal's
answer (or failure) means. :class:`dcoord.Lock` (threads) and
:class:`dcoord.aio.AsyncLock` (tasks) call these functions with ``time.monotonic()``;
unit tests call them with any ``now`` they like.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..backends.base import LockGrant

# Renew at a third of the TTL, as etcd sessions and Redisson do: two renewals may fail
# (or be late) before the lock is at risk.
RENEW_FRACTION = 1 / 3
# Client and server clocks may run at slightly different rates; the client-side
# deadline is shortened by this fraction of the TTL so that it errs early.
CLOCK_DRIFT = 0.01
# A failed renewal is retried no sooner than this (seconds), however close the deadline.
MIN_RETRY = 0.01
# Renewals due within one grain (seconds) of each other go out together: each due time
# is rounded down to this grid of the monotonic clock (coalesced), never later. A lock is
# renewed at most a grain early, so a client holding thousands pays one timer and one
# batch per grain, not one per lock.
RENEWAL_GRAIN = 0.01


def conservative(grant: LockGrant, ttl: float) -> LockGrant:
    """The grant as the client trusts it: its deadline moved earlier by the clock drift
    allowance, so that :attr:`held` errs towards False."""
    return LockGrant(grant.fence, grant.expires_at - CLOCK_DRIFT * ttl)


def is_held(grant: LockGrant | None, lost: bool, now: float) -> bool:
    """Whether a handle with this (conservative) ``grant`` holds the lock at ``now``."""
    return grant is not None and not lost and now < grant.expires_at


def first_due(grant: LockGrant, ttl: float, auto_renew: bool, now: float) -> float:
    """When the watchdog first looks at a new grant: its first renewal, or (without
    renewal) its deadline, when it is declared lost.

    The renewal comes after a third of what the grant has left, which for a grant of
    the full TTL is a third of the TTL: a grant shorter than the TTL (a fair Redis
    waiter is handed a provisional one that lasts as long as its queue entry) is
    extended to the TTL well before its own deadline, not after it.
    """
    if not auto_renew:
        return grant.expires_at
    return now + min(ttl, grant.expires_at - now) * RENEW_FRACTION


def coalesced(due: float) -> float:
    """When to renew a lock due at ``due``: rounded down to the :data:`RENEWAL_GRAIN`
    grid, so that renewals due within a grain of each other share one tick (and one
    round trip). Never later than ``due``: only renewals are coalesced, a deadline is
    looked at exactly when it passes."""
    return min(due, math.floor(due / RENEWAL_GRAIN) * RENEWAL_GRAIN)


@dataclass(frozen=True)
class Tick:
    """The watchdog's decision for one held lock at one instant."""

    lost: str | None
    """Why the lock is lost now, or None while it is still held."""
    renew: bool
    """Whether to send a renewal now."""
    due: float | None
    """When to look again (None once lost): the deadline at the latest, so the handle is
    lost on time even while a renewal hangs."""


def tick(grant: LockGrant, now: float, *, auto_renew: bool, in_flight: bool) -> Tick:
    """Look at a held lock at ``now``; ``in_flight``: a renewal is still unanswered."""
    if now >= grant.expires_at:
        suffix = " (a renewal request is still unanswered)" if in_flight else ""
        return Tick("its TTL passed without a successful renewal" + suffix, False, None)
    return Tick(None, auto_renew and not in_flight, grant.expires_at)


@dataclass(frozen=True)
class Renewal:
    """What a renewal's outcome means for the handle."""

    grant: LockGrant | None
    """The new conservative grant, when renewed."""
    due: float | None
    """When to renew (or retry) next; None once lost."""
    lost: str | None
    """Why the lock is lost, or None."""
    retrying: bool = False
    """The renewal failed with an error and is retried at ``due`` (log a warning)."""


def after_renewal(
    grant: LockGrant,
    ttl: float,
    now: float,
    new: LockGrant | None,
    failure: BaseException | None = None,
) -> Renewal:
    """Decide on a renewal of ``grant`` answered (or failed) at ``now``.

    ``new`` is the backend's answer (None: the server no longer has the lock),
    ``failure`` the error it raised instead. A failure is this lock's alone: it is
    retried, sooner as the deadline nears, until the deadline; an answer that arrives
    after the deadline never makes a lost handle held again.
    """
    if failure is not None:
        remaining = grant.expires_at - now
        if remaining <= 0:
            return Renewal(None, None, f"renewal failed: {failure!r}")
        delay = max(MIN_RETRY, min(ttl * RENEW_FRACTION, remaining / 4))
        return Renewal(None, now + delay, None, retrying=True)
    if new is None:
        return Renewal(None, None, "the server no longer has it (expired or taken over)")
    if now >= grant.expires_at:
        return Renewal(None, None, "its TTL passed before the renewal was answered")
    return Renewal(conservative(new, ttl), now + ttl * RENEW_FRACTION, None)


def release_problem(lost_reason: str | None, expired: bool, released: bool) -> str | None:
    """Why a release did not end a valid hold (None if it did), for LockNotOwned."""
    if lost_reason is not None:
        return f"it was lost ({lost_reason})"
    if expired or not released:
        return "its TTL passed before the release"
    return None
