"""Incremental rings: with_changes, the live ring's per-change updates and node_for_many
place every key exactly as a ring built from scratch by the documented rules.

The reference (:func:`_spec_points`) is docs/ring.md's placement written out naively:
every virtual node hashed, ``(point, node)`` pairs sorted as tuples. Node names include
two whose virtual node 0 hash to the same point, so the tie rule (equal points in node
id order) is exercised on every path, not only when hashes happen to collide.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import mmh3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dcoord
from dcoord import ring as ring_module
from dcoord.backends.base import GroupSnapshot
from dcoord.errors import ConfigError
from dcoord.membership import GroupView, LiveRing, Member, _Decoded, _encode, _view
from dcoord.ring import HashRing, key_hash

# mmh3("n16724#0") == mmh3("n100940#0") == 4158874788 (found by a birthday search).
TWINS = ("n16724", "n100940")
POOL = [*TWINS, "a", "b", "c", "d", "node-1", "node-10", "é", "z" * 5, "n1", "n2"]
KEYS = [f"user:{i}" for i in range(3000)] + [b"\x00\xff", "", "héllo"]
WEIGHTS = st.sampled_from([0.5, 1.0, 1.5, 2.0, 0.01])


def _spec_points(weights: Mapping[str, float], vnodes: int) -> list[tuple[int, str]]:
    pairs = []
    for node, w in weights.items():
        for i in range(max(1, round(vnodes * w))):
            pairs.append((mmh3.hash(f"{node}#{i}".encode(), 0, False), node))
    return sorted(pairs)


def _assert_same_as_scratch(ring: HashRing, weights: Mapping[str, float]) -> None:
    scratch = HashRing(dict(weights), vnodes=ring.vnodes)
    assert ring == scratch
    assert ring.points() == scratch.points() == _spec_points(weights, ring.vnodes)
    n = min(3, len(weights))
    for key in KEYS:
        assert ring.node_for(key) == scratch.node_for(key), key
        assert ring.nodes_for(key, n) == scratch.nodes_for(key, n), key
    assert ring.node_for_many(KEYS) == [scratch.node_for(k) for k in KEYS]


def test_twins_share_a_point() -> None:
    # The premise of the tie cases below.
    assert key_hash(f"{TWINS[0]}#0") == key_hash(f"{TWINS[1]}#0")
    ring = HashRing(list(TWINS), vnodes=1)
    assert ring.points() == [(4158874788, "n100940"), (4158874788, "n16724")]
    assert ring.with_node("a").without_node("a").points() == ring.points()


changes = st.lists(
    st.tuples(
        st.lists(st.sampled_from(POOL), max_size=3, unique=True),  # to remove (if present)
        st.dictionaries(st.sampled_from(POOL), WEIGHTS, max_size=3),  # to add or re-weight
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=60, deadline=None)
@given(
    start=st.dictionaries(st.sampled_from(POOL), WEIGHTS, min_size=1, max_size=len(POOL)),
    steps=changes,
    vnodes=st.sampled_from([1, 2, 5, 40]),
)
def test_with_changes_equals_a_ring_from_scratch(
    start: dict[str, float], steps: list[tuple[list[str], dict[str, float]]], vnodes: int
) -> None:
    ring = HashRing(start, vnodes=vnodes)
    weights = dict(start)
    for remove, add in steps:
        gone = [n for n in remove if n in weights] + [n for n in add if n in weights]
        result = {n: w for n, w in weights.items() if n not in gone} | add
        if not result:
            with pytest.raises(ConfigError, match="no node left"):
                ring.with_changes(add=add, remove=gone)
            continue
        ring, weights = ring.with_changes(add=add, remove=gone), result
        _assert_same_as_scratch(ring, weights)


@settings(max_examples=40, deadline=None)
@given(
    start=st.dictionaries(st.sampled_from(POOL), WEIGHTS, min_size=1, max_size=len(POOL)),
    node=st.sampled_from(POOL),
    weight=WEIGHTS,
)
def test_with_node_and_without_node_equal_a_ring_from_scratch(
    start: dict[str, float], node: str, weight: float
) -> None:
    ring = HashRing(start, vnodes=5)
    if node in start:
        if len(start) > 1:
            rest = {n: w for n, w in start.items() if n != node}
            _assert_same_as_scratch(ring.without_node(node), rest)
    else:
        _assert_same_as_scratch(ring.with_node(node, weight), {**start, node: weight})


def test_with_changes_bad_input_names_the_node() -> None:
    ring = HashRing(["a", "b"])
    with pytest.raises(ConfigError, match="'x' is not in the ring"):
        ring.with_changes(remove=["x"])
    with pytest.raises(ConfigError, match="'a' is already in the ring"):
        ring.with_changes(add={"a": 1.0})
    with pytest.raises(ConfigError, match="weight of node 'c'"):
        ring.with_changes(add={"c": -1.0})
    with pytest.raises(ConfigError, match="no node left"):
        ring.with_changes(remove=["a", "b"])
    assert ring.with_changes(remove=["a", "b"], add={"c": 1.0}) == HashRing(["c"])
    assert ring.with_changes() == ring
    # Removing and adding one id re-weights it.
    assert ring.with_changes(remove=["a"], add={"a": 2.0}) == HashRing({"b": 1.0, "a": 2.0})


def test_many_nodes_build_and_splice_match_the_spec() -> None:
    # 300 nodes x 160 vnodes: 48,000 points, where shared points are likely (~0.3).
    nodes = {f"n{i}": 1.0 for i in range(300)} | dict.fromkeys(TWINS, 1.0)
    ring = HashRing(nodes)
    assert ring.points() == _spec_points(nodes, 160)
    smaller = ring.with_changes(remove=["n5", TWINS[0]], add={"new": 2.0})
    want = {n: w for n, w in nodes.items() if n not in ("n5", TWINS[0])} | {"new": 2.0}
    assert smaller.points() == _spec_points(want, 160)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.text(), st.binary()), max_size=20))
def test_node_for_many_equals_node_for(keys: list[str | bytes]) -> None:
    ring = HashRing(["a", "b", "c"], vnodes=8)
    good = []
    for k in keys:
        try:
            k.encode() if isinstance(k, str) else k
        except UnicodeEncodeError:
            continue
        good.append(k)
    assert ring.node_for_many(good) == [ring.node_for(k) for k in good]
    assert ring.node_for_many(iter(good)) == [ring.node_for(k) for k in good]


@pytest.mark.parametrize(
    ("keys", "named"),
    [
        (["ok", 5], "5"),
        (["ok", "\ud800"], "'\\ud800'"),  # a lone surrogate: an error, not a crash in mmh3
        ([b"ok", bytearray(b"k")], "bytearray"),
        ([None], "None"),
    ],
)
def test_node_for_many_bad_key_names_it(keys: list[object], named: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        HashRing(["a"]).node_for_many(keys)  # type: ignore[arg-type]


# -- the live ring ----------------------------------------------------------------------


def _members(weights: Mapping[str, float]) -> dict[str, Member]:
    return {n: Member(n, w, {}) for n, w in weights.items()}


@settings(max_examples=40, deadline=None)
@given(
    views=st.lists(
        st.dictionaries(st.sampled_from(POOL), WEIGHTS, max_size=len(POOL)),
        min_size=1,
        max_size=12,
    ),
    vnodes=st.sampled_from([1, 3, 20]),
)
def test_live_ring_follows_views_like_a_ring_from_scratch(
    views: list[dict[str, float]], vnodes: int
) -> None:
    with dcoord.connect("memory://") as client:
        live = LiveRing(client.group("g"), vnodes)
        for epoch, weights in enumerate(views, 1):
            live._deliver(GroupView(epoch, _members(weights)))
            assert live.epoch == epoch
            if not weights:
                assert live.ring is None
                continue
            assert live.ring is not None
            _assert_same_as_scratch(live.ring, weights)
            assert live.node_for_many(KEYS[:50]) == [live.node_for(k) for k in KEYS[:50]]


def test_view_decodes_only_changed_payloads() -> None:
    decoded = _Decoded()
    first = _view(GroupSnapshot(1, {"a": _encode(1.0, {}), "b": _encode(1.0, {})}, None), decoded)
    second = _view(
        GroupSnapshot(2, {"a": _encode(1.0, {}), "b": _encode(3.0, {"x": 1})}, None), decoded
    )
    assert second["a"] is first["a"]  # unchanged payload: the same decoded member
    assert second["b"] == Member("b", 3.0, {"x": 1})
    third = _view(GroupSnapshot(3, {"b": b"not json", "c": _encode(2.0, {})}, None), decoded)
    assert dict(third) == {"c": Member("c", 2.0, {})}  # "a" left, "b" is unreadable now
    assert dict(_view(GroupSnapshot(4, {"b": _encode(1.0, {})}, None), decoded)) == {
        "b": Member("b", 1.0, {})
    }
    assert second.epoch == 2 and dict(second) == {"a": first["a"], "b": second["b"]}


@settings(max_examples=60, deadline=None)
@given(
    start=st.dictionaries(st.sampled_from(POOL), WEIGHTS, min_size=1, max_size=len(POOL)),
    steps=changes,
    vnodes=st.sampled_from([2, 5, 20]),
)
def test_changes_with_sparse_buckets_equal_a_ring_from_scratch(
    start: dict[str, float], steps: list[tuple[list[str], dict[str, float]]], vnodes: int
) -> None:
    # Buckets of ~1 point, never re-cut: changes empty and refill buckets, so the wrap
    # entries that point past empty buckets are redone on every path.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ring_module, "_FILL", 1)
        mp.setattr(ring_module, "_MIN_FILL", 0)
        mp.setattr(ring_module, "_MAX_FILL", 1 << 32)
        ring = HashRing(start, vnodes=vnodes)
        weights = dict(start)
        for remove, add in steps:
            gone = list(dict.fromkeys([n for n in [*remove, *add] if n in weights]))
            if not {n: w for n, w in weights.items() if n not in gone} | add:
                continue
            # One node at a time: with_changes() rebuilds for many changes at once.
            for node in gone:
                if len(ring) > 1:
                    ring = ring.without_node(node)
                else:  # the last node out and the new ones in, in one step
                    ring = ring.with_changes(remove=[node], add=add)
                    weights = {}
                weights.pop(node, None)
            for node, w in add.items():
                if node not in ring:
                    ring = ring.with_node(node, w)
            weights |= add
            _assert_same_as_scratch(ring, weights)


def test_sparse_buckets_have_empty_ones() -> None:
    # The premise of the test above: with these settings some buckets are empty.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ring_module, "_FILL", 1)
        ring = HashRing(["a", "b", "c"], vnodes=20)
        assert len(ring._buckets) >= 32
        assert any(not pts for pts, _ in ring._buckets)


@settings(max_examples=40, deadline=None)
@given(
    states=st.lists(
        st.dictionaries(
            st.sampled_from(POOL), st.one_of(WEIGHTS, st.just(None)), max_size=len(POOL)
        ),
        min_size=1,
        max_size=12,
    ),
)
def test_live_ring_on_follower_views_equals_a_ring_from_scratch(
    states: list[dict[str, float | None]],
) -> None:
    # Views made as the follower makes them (each with the ids changed since the one
    # before); ``None`` is an unreadable record, which the view leaves out. One ring
    # gets every view (the delta path), one every other view (the delta is against a
    # view it never had: the full diff path).
    decoded = _Decoded()
    with dcoord.connect("memory://") as client:
        every, alternate = LiveRing(client.group("g"), 3), LiveRing(client.group("g"), 3)
        for epoch, state in enumerate(states, 1):
            payloads = {n: b"{" if w is None else _encode(w, {}) for n, w in state.items()}
            view = _view(GroupSnapshot(epoch, payloads, None), decoded)
            weights = {n: w for n, w in state.items() if w is not None}
            assert view.weights() == weights
            for live in (every, alternate) if epoch % 2 else (every,):
                live._deliver(view)
                if weights:
                    assert live.ring is not None
                    _assert_same_as_scratch(live.ring, weights)
                else:
                    assert live.ring is None


def test_views_do_not_chain_every_earlier_view() -> None:
    decoded = _Decoded()
    views = [_view(GroupSnapshot(e, {f"m{e}": _encode(1.0, {})}, None), decoded) for e in range(4)]
    assert views[0]._delta is None and views[2]._delta is None
    assert views[3]._delta == (views[2], {"m2", "m3"})


GROUP = [*TWINS, *(f"member-{i}" for i in range(120))]


@settings(max_examples=25, deadline=None)
@given(
    steps=st.lists(st.tuples(st.sampled_from(GROUP), WEIGHTS), min_size=1, max_size=12),
    vnodes=st.sampled_from([40, 160]),
)
def test_one_change_at_a_time_in_a_large_ring_splices_like_a_ring_from_scratch(
    steps: list[tuple[str, float]], vnodes: int
) -> None:
    # A group's live ring: one member joins, leaves or is re-weighted per change, in a
    # ring large enough that with_changes() splices its buckets: a rebuild (_build)
    # during a change fails the test.
    weights = dict.fromkeys(GROUP[::2], 1.0)
    ring = HashRing(weights, vnodes=vnodes)
    build = ring_module._build

    def no_build(counts: Mapping[str, int]) -> object:
        raise AssertionError(f"rebuilt for {len(counts)} nodes instead of splicing")

    for node, weight in steps:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ring_module, "_build", no_build)
            if node in weights and weight == 1.0:
                ring = ring.without_node(node)
                del weights[node]
            else:
                remove = [node] if node in weights else []
                ring = ring.with_changes(remove=remove, add={node: weight})
                weights[node] = weight
        assert ring_module._build is build
        _assert_same_as_scratch(ring, weights)
