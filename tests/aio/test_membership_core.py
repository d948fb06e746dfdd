"""The membership decisions of dcoord.core.membership, with ``now`` as an argument."""

from __future__ import annotations

from dcoord.core.membership import beat_verdict, next_ring
from dcoord.errors import BackendUnavailable
from dcoord.membership import GroupView, Member
from dcoord.ring import HashRing


def _view(epoch: int, weights: dict[str, float]) -> GroupView:
    return GroupView(epoch, {n: Member(n, w, {}) for n, w in weights.items()})


def test_a_failed_heart_beat_loses_the_member_only_past_its_deadline() -> None:
    failure = BackendUnavailable("down")
    assert beat_verdict(False, failure, now=9.9, expires_at=10.0) is None
    reason = beat_verdict(False, failure, now=10.0, expires_at=10.0)
    assert reason is not None and "failed for longer than its ttl" in reason and "down" in reason


def test_a_refused_heart_beat_loses_the_member_at_once() -> None:
    reason = beat_verdict(False, None, now=1.0, expires_at=10.0)
    assert reason is not None and "no longer has it" in reason
    assert beat_verdict(True, None, now=1.0, expires_at=10.0) is None


def test_next_ring_follows_changes_and_empties() -> None:
    empty = GroupView(0, {})
    first = _view(1, {"a": 1.0, "b": 2.0})
    ring = next_ring(None, empty, first, 20)
    assert ring == HashRing({"a": 1.0, "b": 2.0}, vnodes=20)
    second = _view(2, {"a": 1.0, "c": 0.5})
    ring2 = next_ring(ring, first, second, 20)
    assert ring2 == HashRing({"a": 1.0, "c": 0.5}, vnodes=20)
    assert next_ring(ring2, second, _view(3, {"a": 1.0, "c": 0.5}), 20) is ring2  # no change
    assert next_ring(ring2, second, GroupView(4, {}), 20) is None
