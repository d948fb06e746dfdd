"""Membership decisions shared by the sync and async groups (no I/O, no clock reads).

:class:`MemberSet` is a follower's copy of a group's members between full reads: it
applies the changes notifications carry while their epochs follow on, and says when the
follower must re-read instead. :func:`next_ring` derives a live ring's next
:class:`~dcoord.HashRing` from its last one and a new member set (hashing only the
changed members' points); :func:`beat_verdict` says whether a member's heart-beat
outcome at ``now`` means it is lost. The sync follower (:mod:`dcoord.membership`,
a thread) and the async one (:mod:`dcoord.aio.membership`, a task) both drive them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..backends.base import GroupChange, GroupSnapshot
from ..ring import HashRing

if TYPE_CHECKING:
    from ..membership import GroupView

#: A follower re-reads its group at least this often, even without notifications.
RESYNC_INTERVAL = 5.0
# Re-read this long after the earliest expiry a follower saw, so the member is surely due.
EXPIRY_SLACK = 0.005


class MemberSet:
    """A follower's member set (id -> payload) at :attr:`epoch`, kept current by
    :meth:`apply` from the changes its subscription delivers, and by :meth:`read` from a
    full read whenever :meth:`apply` says one is needed: a notification without its
    change (an older client's), a gap in the epochs, or a read falling due (every
    :data:`RESYNC_INTERVAL`, and at the earliest expiry the last read saw: on memory and
    Redis expired members are pruned, and notified, only by an operation on the group).

    :attr:`version` counts the changes of the member set itself (not every epoch is
    one: an etcd revision of another key, a duplicate notification); :meth:`changed`
    hands over the ids changed since its last call, so that a new view decodes only
    those.
    """

    def __init__(self) -> None:
        self.epoch = 0
        self.members: dict[str, bytes] = {}
        self.version = 0
        self._changed: set[str] | None = None
        self._due = 0.0

    def read(self, snapshot: GroupSnapshot, now: float) -> None:
        """Take a full read made at monotonic time ``now`` (the subscription was
        listening before it started)."""
        new, old = snapshot.members, self.members
        if new != old:
            if self._changed is not None:
                # Set operations in C: the next view decodes only these members.
                self._changed.update(old.keys() - new.keys())
                self._changed.update(member_id for member_id, _ in new.items() - old.items())
            self.members = dict(new)
            self.version += 1
        self.epoch = snapshot.epoch
        self._due = now + RESYNC_INTERVAL
        if snapshot.next_expiry is not None:
            self._due = min(self._due, now + snapshot.next_expiry + EXPIRY_SLACK)

    def timeout(self, now: float) -> float:
        """Seconds the follower may wait for notifications before it must re-read."""
        return max(0.0, self._due - now)

    def apply(self, changes: Sequence[GroupChange] | None, now: float) -> bool:
        """Apply ``changes`` (as a subscription's ``wait`` returned them); False when the
        follower must re-read instead (see the class)."""
        if changes is None:
            return False
        members, changed = self.members, self._changed
        for change in changes:
            if change.epoch <= self.epoch:
                continue  # already in the set: a duplicate, or sent before the last read
            if change.after > self.epoch:
                return False  # some change between the two was missed
            self.epoch = change.epoch
            if change.ttl is not None:
                # A new member: should it die unrefreshed, an operation must prune it.
                self._due = min(self._due, now + change.ttl + EXPIRY_SLACK)
            for member_id in change.left:
                if members.pop(member_id, None) is not None:
                    self.version += 1
                    if changed is not None:
                        changed.add(member_id)
            for member_id, payload in change.joined.items():
                if members.get(member_id) != payload:
                    members[member_id] = payload
                    self.version += 1
                    if changed is not None:
                        changed.add(member_id)
        return now < self._due

    def changed(self) -> set[str] | None:
        """The ids changed since the last call (None only before the first: all), reset."""
        changed, self._changed = self._changed, set()
        return changed


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
        members = view._members
        weights = {n: m.weight for n in ids if (m := members.get(n)) is not None}
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


class RingSteps:
    """A live ring's way from view to view (:meth:`next`): :func:`next_ring`, except
    that a step bringing back the members the step before removed, with their weights
    (they restarted: the common change of a rolling deploy), takes the ring from before
    their leave again, with no splice.

    That ring is kept one step longer only while restarts come: kept and not taken back
    (members replaced by new ids instead), it is freed a step later with cold caches,
    which cost ~0.1 ms per change at 1,000 members; then only the left members' ids and
    weights are kept, to notice when restarts begin.
    """

    __slots__ = ("_ids", "_keep", "_ring", "_weights")

    def __init__(self) -> None:
        self._ids: set[str] | None = None  # those of the last step, if it only removed
        self._weights: dict[str, float | None] = {}  # and their weights before it
        self._ring: HashRing | None = None  # and the ring before it, while _keep
        self._keep = True

    def next(
        self, old: HashRing | None, old_view: GroupView, view: GroupView, vnodes: int
    ) -> HashRing | None:
        """The ring of ``view``, given ``old`` (the ring of ``old_view``, the view this
        was last called with)."""
        delta = view._delta
        ids = delta[1] if delta is not None and delta[0] is old_view else None
        members = view._members
        # Only ``ids`` differ between the two views, so comparing those suffices.
        back = (
            ids is not None
            and ids == self._ids
            and all(
                (None if (m := members.get(n)) is None else m.weight) == self._weights[n]
                for n in ids
            )
        )
        ring = self._ring if back and self._ring is not None else None
        if ring is None:
            if back:
                self._keep = True  # a restart: keep the ring before the next leave
            elif self._ring is not None:
                self._keep = False  # kept for nothing
            ring = next_ring(old, old_view, view, vnodes)
        self._ids, self._ring = None, None
        if ids is not None and old is not None and not any(n in members for n in ids):
            self._ids, self._weights = ids, {n: old.nodes.get(n) for n in ids}
            if self._keep:
                self._ring = old
        return ring


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
