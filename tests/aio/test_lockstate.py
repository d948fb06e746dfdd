"""The lock timing rules (dcoord.core.lockstate) on a fake clock: no sleeps."""

from __future__ import annotations

import pytest

from dcoord.backends.base import LockGrant
from dcoord.core.lockstate import (
    CLOCK_DRIFT,
    MIN_RETRY,
    RENEW_FRACTION,
    after_renewal,
    conservative,
    first_due,
    is_held,
    release_problem,
    tick,
)

TTL = 30.0


def test_conservative_deadline_errs_early() -> None:
    grant = conservative(LockGrant(7, 130.0), TTL)
    assert grant == LockGrant(7, 130.0 - CLOCK_DRIFT * TTL)
    assert is_held(grant, False, 129.0)
    assert not is_held(grant, False, grant.expires_at), "held ends at the deadline, not after"
    assert not is_held(grant, True, 100.0), "a lost grant is never held"
    assert not is_held(None, False, 100.0)


def test_first_look_is_the_renewal_or_the_deadline() -> None:
    grant = LockGrant(1, 130.0)
    assert first_due(grant, TTL, True, 100.0) == pytest.approx(100.0 + TTL * RENEW_FRACTION)
    assert first_due(grant, TTL, False, 100.0) == 130.0


def test_first_renewal_of_a_short_grant_comes_before_its_own_deadline() -> None:
    """A grant shorter than the TTL (a fair waiter's provisional hand-over: 5 s of a 30 s
    TTL) is renewed after a third of what it has left, not a third of the TTL (10 s,
    when it would be gone); a full grant is renewed at a third of the TTL, as before."""
    short = LockGrant(1, 105.0)
    assert first_due(short, TTL, True, 100.0) == pytest.approx(100.0 + 5.0 * RENEW_FRACTION)
    assert first_due(short, TTL, True, 100.0) < short.expires_at
    assert first_due(short, TTL, False, 100.0) == 105.0
    # Never later than a third of the TTL, however far out the deadline.
    assert first_due(LockGrant(1, 200.0), TTL, True, 100.0) == pytest.approx(110.0)


def test_tick_renews_once_and_loses_at_the_deadline() -> None:
    grant = LockGrant(1, 130.0)
    now = tick(grant, 110.0, auto_renew=True, in_flight=False)
    assert (now.lost, now.renew, now.due) == (None, True, 130.0)
    busy = tick(grant, 110.0, auto_renew=True, in_flight=True)
    assert not busy.renew, "at most one renewal in flight per grant"
    assert not tick(grant, 110.0, auto_renew=False, in_flight=False).renew
    late = tick(grant, 130.0, auto_renew=True, in_flight=True)
    assert late.lost is not None and "still unanswered" in late.lost and late.due is None


def test_a_renewal_answered_in_time_moves_the_deadline() -> None:
    outcome = after_renewal(LockGrant(1, 130.0), TTL, 111.0, LockGrant(1, 141.0))
    assert outcome.lost is None and not outcome.retrying
    assert outcome.grant == conservative(LockGrant(1, 141.0), TTL)
    assert outcome.due == pytest.approx(111.0 + TTL * RENEW_FRACTION)


def test_a_late_or_refused_renewal_loses_the_lock() -> None:
    late = after_renewal(LockGrant(1, 130.0), TTL, 130.0, LockGrant(1, 150.0))
    assert late.grant is None and late.lost == "its TTL passed before the renewal was answered"
    gone = after_renewal(LockGrant(1, 130.0), TTL, 120.0, None)
    assert gone.lost is not None and "no longer has it" in gone.lost


def test_failed_renewals_retry_sooner_as_the_deadline_nears() -> None:
    grant = LockGrant(1, 130.0)
    error = ConnectionError("down")
    early = after_renewal(grant, TTL, 80.0, None, error)
    assert early.retrying and early.lost is None
    assert early.due == pytest.approx(80.0 + TTL * RENEW_FRACTION)  # capped at ttl/3
    assert after_renewal(grant, TTL, 100.0, None, error).due == pytest.approx(107.5)
    near = after_renewal(grant, TTL, 129.0, None, error)
    assert near.due == pytest.approx(129.25)  # a quarter of the 1 s left
    last = after_renewal(grant, TTL, 129.99999, None, error)
    assert last.due == pytest.approx(129.99999 + MIN_RETRY)
    over = after_renewal(grant, TTL, 130.0, None, error)
    assert over.lost is not None and "down" in over.lost and over.due is None


def test_release_problem_names_why() -> None:
    assert release_problem(None, False, True) is None
    assert release_problem("x", False, True) == "it was lost (x)"
    assert release_problem(None, True, True) == "its TTL passed before the release"
    assert release_problem(None, False, False) == "its TTL passed before the release"
