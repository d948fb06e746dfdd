"""Membership decisions shared by the sync and async groups (no I/O, no clock reads).

:func:`next_ring` derives a live ring's next :class:`~dcoord.HashRing` from its last one
and a new member set (hashing only the changed members' points); :func:`beat_verdict`
says whether a member's heart-beat outcome at ``now`` means it is lost.
:class:`dcoord.membership.LiveRing` (threads) and
:class:`dcoord.aio.membership.AsyncLiveRing` (tasks) both call them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..ring import HashRing

if TYPE_CHECKING:
    from ..membership import GroupView


def next_ring(
    old: HashRing | None, old_view: GroupView, view: GroupView, vnodes: int
) -> HashRing | None:
    """The ring of ``view``'s members, given ``old`` (built from ``old_view``)."""
    if not view:
        return None
    if old is None:
        return HashRing(view.weights(), vnodes=vnodes)
    if view._delta is not None and view._delta[0] is old_view:
        # The follower knows which ids changed since the view this ring was built
        # from: look at those only.
        ids = view._delta[1]
        weights = {n: view[n].weight for n in ids if n in view}
        nodes = old.nodes
        gone = [n for n in ids if n in nodes and weights.get(n) != nodes[n]]
        new = {n: w for n, w in weights.items() if nodes.get(n) != w}
    else:
        # Set operations on the (id, weight) pairs run in C: no Python step per member.
        weights = view.weights()
        gone = [n for n, _ in old.nodes.items() - weights.items()]
        new = dict(weights.items() - old.nodes.items())
    # Only the changed members' points are hashed (cached) and spliced in or out;
    # with_changes() itself rebuilds from cached points when that is cheaper.
    return old.with_changes(add=new, remove=gone) if gone or new else old


def beat_verdict(
    still_there: bool, failure: BaseException | None, now: float, expires_at: float
) -> str | None:
    """Why a member is lost after a heart-beat at ``now`` (None: it is not).

    ``failure`` is the error the heart-beat raised (then ``still_there`` is ignored):
    the member is lost only once its registration's ``expires_at`` has passed
    unconfirmed; a refusal by the server (``still_there`` False) loses it at once.
    """
    if failure is not None:
        if now >= expires_at:
            return f"heart-beats failed for longer than its ttl: {failure}"
        return None
    if not still_there:
        return "the server no longer has it: it expired before a heart-beat"
    return None
