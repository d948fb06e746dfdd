"""A follower that applies notified changes (deltas) ends where a full read would.

:class:`~dcoord.core.membership.MemberSet` is fed random change sequences as a
subscription would deliver them, perturbed (changes dropped, duplicated, swapped,
notifications without their change), with a full read whenever it asks for one; after
every step its member set, the decoded view and the live ring derived change by change
must equal the group's state at the set's epoch and a ring built from scratch from it,
key by key. Then the backends' decoders of notifications: Redis messages, etcd watch
events, the embedded store's change log.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dcoord.backends.base import GroupChange, GroupSnapshot
from dcoord.backends.etcd.membership import changes_of
from dcoord.backends.memory import memory_server
from dcoord.backends.memory.membership import LOG_LENGTH, MemoryGroups
from dcoord.backends.redis.membership import change_of, collect
from dcoord.core import membership as core
from dcoord.core.membership import MemberSet
from dcoord.membership import GroupView, _Decoded, _encode, _view, _view_of
from dcoord.ring import HashRing

POOL = [f"n{i}" for i in range(12)] + ["é", "a b"]
KEYS = [f"user:{i}" for i in range(600)] + [b"\x00\xff", ""]
VNODES = 8

# One server operation: join (id, weight), leave (id), expire (ids), restart (id: it
# leaves and joins again with its weight, as in a rolling deploy).
operation = st.one_of(
    st.tuples(st.just("join"), st.sampled_from(POOL), st.sampled_from([0.5, 1.0, 2.0])),
    st.tuples(st.just("leave"), st.sampled_from(POOL)),
    st.tuples(st.just("expire"), st.lists(st.sampled_from(POOL), min_size=1, unique=True)),
    st.tuples(st.just("restart"), st.sampled_from(POOL)),
)
# What the channel does to one change: deliver it, drop it, send it twice, swap it with
# the next, or replace it by a notification without its change (an older client's).
fate = st.sampled_from(["ok", "ok", "ok", "ok", "drop", "twice", "swap", "bare"])


def _history(
    ops: list[tuple], steps: list[int]
) -> tuple[list[GroupChange], list[dict[str, bytes]], list[int]]:
    """The changes the operations make (no-ops skipped), the member set after each
    (``states[0]``: empty) and each one's epoch: epochs advance by ``steps`` (1 as on
    memory and Redis; more as etcd revisions, which other keys advance too)."""
    states: list[dict[str, bytes]] = [{}]
    changes: list[GroupChange] = []
    epochs = [0]
    for i, op in enumerate(ops):
        if op[0] == "restart":
            if op[1] not in states[-1]:
                continue
            weight = json.loads(states[-1][op[1]])["weight"]
            made = [({}, (op[1],)), ({op[1]: _encode(weight, {"i": i})}, ())]
        elif op[0] == "join":
            if op[1] in states[-1]:
                continue
            made = [({op[1]: _encode(op[2], {"i": i})}, ())]
        else:
            ids = [op[1]] if op[0] == "leave" else op[1]
            left = tuple(m for m in ids if m in states[-1])
            if not left:
                continue
            made = [({}, left)]
        for joined, left in made:
            members = dict(states[-1])
            for member_id in left:
                del members[member_id]
            members.update(joined)
            epoch = epochs[-1] + steps[len(changes) % len(steps)]
            changes.append(GroupChange(epoch, epochs[-1], joined, left))
            states.append(members)
            epochs.append(epoch)
    return changes, states, epochs


def _state_at(epoch: int, states: list[dict[str, bytes]], epochs: list[int]) -> dict[str, bytes]:
    return states[max(i for i, e in enumerate(epochs) if e <= epoch)]


def _assert_ring(ring: HashRing | None, weights: Mapping[str, float]) -> None:
    if not weights:
        assert ring is None
        return
    assert ring is not None
    scratch = HashRing(dict(weights), vnodes=VNODES)
    assert ring == scratch
    assert ring.node_for_many(KEYS) == scratch.node_for_many(KEYS)
    n = min(2, len(weights))
    for key in KEYS[::7]:
        assert ring.nodes_for(key, n) == scratch.nodes_for(key, n), key


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(operation, min_size=1, max_size=25),
    steps=st.lists(st.integers(1, 3), min_size=1, max_size=4),
    fates=st.lists(fate, max_size=30),
    batch=st.integers(1, 4),
    start=st.integers(0, 30),
)
# Restarts delivered one by one, and one swapped with the next: the live ring steps back.
@example(
    ops=[
        ("join", "n1", 1.0),
        ("join", "n2", 2.0),
        ("restart", "n1"),
        ("restart", "n2"),
        ("join", "n3", 0.5),
        ("restart", "n3"),
        ("restart", "n1"),
    ],
    steps=[1, 2],
    fates=["ok"] * 7 + ["swap", "ok"],
    batch=1,
    start=0,
)
def test_deltas_give_the_view_and_ring_of_a_read_from_scratch(
    ops: list[tuple], steps: list[int], fates: list[str], batch: int, start: int
) -> None:
    changes, states, epochs = _history(ops, steps)
    # The channel: every change after the follower subscribed, perturbed.
    sent: list[GroupChange | None] = []
    pending = list(changes)
    i = 0
    while pending:
        change = pending.pop(0)
        what = fates[i % len(fates)] if fates else "ok"
        i += 1
        if what == "drop":
            continue
        if what == "twice":
            sent += [change, change]
        elif what == "swap" and pending:
            sent += [pending.pop(0), change]
        elif what == "bare":
            sent.append(None)
        else:
            sent.append(change)
    # The server is at least as far as anything the follower has been sent: a read
    # returns that state, at an epoch up to the next change's (etcd: a later revision).
    server = min(start, len(changes))
    members, decoded = MemberSet(), _Decoded()
    ring: HashRing | None = None
    live = core.RingSteps()  # as a LiveRing derives its rings
    last_view = GroupView(0, {})

    def read() -> None:
        upper = epochs[server + 1] - 1 if server + 1 < len(epochs) else epochs[server] + 2
        epoch = min(upper, epochs[server] + start % 3)
        members.read(GroupSnapshot(epoch, dict(states[server]), None), 0.0)

    def check() -> None:
        nonlocal ring, last_view
        # The follower's member set is the group's state at its epoch...
        assert members.members == _state_at(members.epoch, states, epochs)
        # ...and so are the view and the ring derived from the previous ones (as a
        # LiveRing derives it: a restart may take back the ring before the leave).
        view = _view_of(members, decoded)
        assert dict(view) == dict(_view(GroupSnapshot(view.epoch, members.members, None)))
        ring = live.next(ring, last_view, view, VNODES)
        last_view = view
        _assert_ring(ring, view.weights())

    read()
    check()
    for at in range(0, len(sent), batch):
        delivered = sent[at : at + batch]
        reached = [epochs.index(c.epoch) for c in delivered if c is not None]
        server = max([server, *reached])
        notes = None if None in delivered else [c for c in delivered if c is not None]
        if not members.apply(notes, 0.0):
            read()
        check()
    # Once the follower re-reads (the resync interval), it holds the final state.
    server = len(changes)
    read()
    assert members.members == states[-1]
    check()


def _change(
    epoch: int, joined: Mapping[str, bytes] | None = None, left: tuple[str, ...] = ()
) -> GroupChange:
    return GroupChange(epoch, epoch - 1, dict(joined or {}), left)


def test_member_set_asks_for_a_read_on_a_gap_a_bare_notification_or_when_due(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(core, "RESYNC_INTERVAL", 5.0)
    members = MemberSet()
    members.read(GroupSnapshot(3, {"a": b"1"}, None), now=100.0)
    assert members.timeout(101.0) == 4.0
    assert members.changed() is None  # before the first view: everything
    assert members.apply([_change(4, {"b": b"2"}), _change(4, {"b": b"2"})], 101.0)
    assert members.members == {"a": b"1", "b": b"2"} and members.epoch == 4
    assert members.changed() == {"b"}
    assert members.changed() == set()
    assert members.apply([_change(2, left=("a",))], 101.0)  # older than the set: no-op
    assert members.members == {"a": b"1", "b": b"2"}
    assert not members.apply([_change(6, left=("a",))], 101.0)  # epoch 5 is missing
    assert not members.apply(None, 101.0)  # a notification without its change
    members.read(GroupSnapshot(6, {"b": b"2", "c": b"3"}, None), now=102.0)
    assert members.changed() == {"a", "c"}  # what the read found changed, too
    assert not members.apply([], 107.0)  # the resync interval is up
    # An expiry falls due at the soonest seen: the read's, or a joined member's TTL.
    members.read(GroupSnapshot(6, {"b": b"2"}, 1.0), now=200.0)
    assert members.timeout(200.0) == pytest.approx(1.0 + core.EXPIRY_SLACK)
    joined = GroupChange(7, 6, {"c": b"3"}, (), ttl=0.3)
    assert members.apply([joined], 200.5)
    assert members.timeout(200.5) == pytest.approx(0.3 + core.EXPIRY_SLACK)


def test_member_set_version_counts_only_real_changes() -> None:
    members = MemberSet()
    members.read(GroupSnapshot(1, {"a": b"1"}, None), now=0.0)
    version = members.version
    members.read(GroupSnapshot(9, {"a": b"1"}, None), now=0.0)  # a new epoch, same set
    assert members.version == version
    assert members.apply([GroupChange(12, 9, {}, ("gone-already",))], 0.0)
    assert members.version == version and members.epoch == 12
    assert members.apply([_change(13, {"a": b"2"})], 0.0)
    assert members.version == version + 1


def test_a_restart_takes_the_live_ring_back_to_the_ring_before_it() -> None:
    """A member that leaves and joins again with its weight (a restart) takes a live ring
    back to its ring before the leave: that ring is reused, nothing spliced. A re-join
    with another weight, or another member's change in between, is derived as before;
    after a ring was kept for nothing the next restart is spliced, and the one after it
    is taken back again."""
    members, decoded = MemberSet(), _Decoded()
    members.read(GroupSnapshot(1, {n: _encode(1.0, {}) for n in "abc"}, None), 0.0)
    view = _view_of(members, decoded)
    steps = core.RingSteps()
    ring = steps.next(None, GroupView(0, {}), view, VNODES)
    rings = [ring]
    for epoch, joined, left in [
        (2, {}, ("a",)),
        (3, {"a": _encode(1.0, {"v": 2})}, ()),  # back, new meta, same weight
        (4, {}, ("b",)),
        (5, {"b": _encode(2.0, {})}, ()),  # back with another weight: kept for nothing
        (6, {}, ("c",)),
        (7, {"c": _encode(1.0, {})}, ()),  # back, but no ring was kept this time
        (8, {}, ("a",)),
        (9, {"a": _encode(1.0, {})}, ()),  # back, and kept again
        (10, {}, ("c",)),
        (11, {"d": _encode(1.0, {})}, ()),
        (12, {"c": _encode(1.0, {})}, ()),  # back, but d joined in between
    ]:
        assert members.apply([_change(epoch, joined, left)], 0.0)
        new = _view_of(members, decoded)
        ring, view = steps.next(ring, view, new, VNODES), new
        _assert_ring(ring, view.weights())
        rings.append(ring)
    assert rings[2] is rings[0]
    assert rings[4] is not rings[2] and rings[6] is not rings[4]
    assert rings[8] is rings[6]
    assert rings[10] is not rings[8]


# -- Redis: the messages membership.lua publishes -------------------------------------


def test_redis_change_messages_decode() -> None:
    payload = _encode(1.5, {"zone": "é/1"})
    message = json.dumps(["7", "join", ["m 1"], payload.decode(), 3000]).encode()
    assert change_of(message) == GroupChange(7, 6, {"m 1": payload}, (), 3.0)
    assert change_of(b'["8","leave",["m 1"],"",0]') == GroupChange(8, 7, {}, ("m 1",))
    assert change_of(b'["9","expire",["a","b"],"",0]') == GroupChange(9, 8, {}, ("a", "b"))


@pytest.mark.parametrize(
    "message",
    [
        b"17",  # a client before deltas: the bare epoch
        b"wake",
        b'["9","rename",["a"],"",0]',
        b'["9","join",["a","b"],"",0]',
        b'["x","leave",["a"],"",0]',
        b'["9","join",["a"],"\xff",0]',  # not UTF-8
    ],
)
def test_redis_messages_without_a_change_mean_re_read(message: bytes) -> None:
    assert change_of(message) is None
    change = _change(1, {"a": b"x"})
    assert collect([change], {"channel": b"c", "data": message}, b"c") is None


def test_redis_wake_ups_are_not_changes() -> None:
    change = _change(1, {"a": b"x"})
    assert collect([change], {"channel": b"c:wake:1", "data": b"wake"}, b"c") == [change]
    assert collect(None, {"channel": b"c", "data": b'["2","leave",["a"],"",0]'}, b"c") is None


# -- etcd: watch events ---------------------------------------------------------------


def test_etcd_events_are_one_change_per_revision() -> None:
    prefix = "/dcoord/ns/groups/g/members/"
    events = [
        (True, f"{prefix}a".encode(), b"token1 {}", 10),
        (False, f"{prefix}b".encode(), b"", 14),  # a lease's expiry: one revision
        (False, f"{prefix}c".encode(), b"", 14),
        (True, f"{prefix}d e".encode(), b'token2 {"x": 1}', 15),
    ]
    changes, last = changes_of(events, prefix, 3)
    assert changes == [
        GroupChange(10, 3, {"a": b"{}"}, ()),
        GroupChange(14, 10, {}, ("b", "c")),
        GroupChange(15, 14, {"d e": b'{"x": 1}'}, ()),
    ]
    assert last == 15
    assert changes_of([], prefix, 15) == ([], 15)


# -- memory: the change log -----------------------------------------------------------


def test_memory_change_log_hands_out_what_a_subscriber_missed() -> None:
    groups = MemoryGroups(memory_server("test-member-deltas"), "ns/")
    a = groups.join("g", "a", b"A", 30)
    assert a is not None
    groups.join("g", "b", b"B", 30)
    assert groups.leave("g", "a", a._token)
    with groups.cond:
        assert groups.changes("g", 3) == (3, [])
        last, changes = groups.changes("g", 1)
    assert last == 3
    assert changes == [GroupChange(2, 1, {"b": b"B"}, (), 30), GroupChange(3, 2, {}, ("a",))]
    # Another client's MemoryGroups on the same store shares the log.
    other = MemoryGroups(memory_server("test-member-deltas"), "ns/")
    with other.cond:
        assert other.changes("g", 2)[1] == [GroupChange(3, 2, {}, ("a",))]
    for i in range(LOG_LENGTH):
        groups.join("g", f"m{i}", b"M", 30)
    with groups.cond:
        assert groups.changes("g", 1) == (3 + LOG_LENGTH, None)  # older than the log
        assert groups.changes("g", 99_999) == (3 + LOG_LENGTH, None)  # not an epoch it had
