"""Building a ring: however the build is done, every key goes where it went before.

Old and new clients share a ring through the documented placement only, so a faster
build must not move one key. The digests below were computed by the ring code of main
at ccb8b08 (before the packed-key build) over the same rings and keys; the 1,000-node
ring holds three pairs of equal points (member-56/member-768, member-595/member-828,
member-369/member-384), so the tie rule is part of what they pin down.
"""

from __future__ import annotations

import gc
import hashlib
from bisect import bisect_left
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcoord import ring as ring_module
from dcoord.ring import HashRing, key_hash
from tests.unit.test_ring_incremental import _spec_points

KEYS = [f"user:{i}" for i in range(5000)]
MEMBERS = [f"member-{i}" for i in range(1000)]
WEIGHTED = {"n16724": 1.0, "n100940": 0.5, "é": 2.0, "zzzzz": 1.5, "node-1": 0.01, "a": 1.0}


def _digest(lines: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _points_digest(ring: HashRing) -> str:
    return _digest(f"{point} {node}" for point, node in ring.points())


def test_thousand_nodes_place_keys_as_before() -> None:
    ring = HashRing(MEMBERS)
    want = "39da6f150f870bb3f0de5440b2ccfd044017caa3bbdb6cf0862936253b5c5dd1"
    assert _points_digest(ring) == want
    # Insertion order is not id order here (member-10 < member-2): same ring.
    assert _points_digest(HashRing(MEMBERS[::-1])) == want
    assert _digest(ring.node_for_many(KEYS)) == (
        "16c99da48aefe0d29e1596566d8a2e2abba05b29571afd5c1e865af0ae0da03e"
    )
    assert [ring.node_for(k) for k in ("user:0", "user:1", "user:42", "", "héllo")] == [
        "member-34",
        "member-691",
        "member-609",
        "member-735",
        "member-855",
    ]
    assert ring.node_for(b"\x00\xff") == "member-297"


def test_weighted_ring_with_twins_places_keys_as_before() -> None:
    ring = HashRing(WEIGHTED, vnodes=40)
    assert len(ring.points()) == 241
    assert _points_digest(ring) == (
        "e5c741d09c5f63a7ccda144823609ca2702e4c3cfb0c510066657d643199ae96"
    )
    assert _digest(ring.node_for_many(KEYS)) == (
        "01dcef29f271bc0bb6305cd88dc5e64672e5d89449faeb7598f3d0f3b0b6d8f6"
    )


@pytest.fixture(params=["float keys", "int keys"])
def build_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways a ring is built: packed float keys, and the packed ints that rings of
    more than 2**16 nodes use (forced here by letting the float keys rank no node)."""
    if request.param == "int keys":
        monkeypatch.setattr(ring_module, "_FLOAT_RANKS", 0)
    return str(request.param)


def test_both_build_paths_place_keys_as_before(build_path: str) -> None:
    assert _points_digest(HashRing(MEMBERS[::-1])) == (
        "39da6f150f870bb3f0de5440b2ccfd044017caa3bbdb6cf0862936253b5c5dd1"
    )
    assert _points_digest(HashRing(WEIGHTED, vnodes=40)) == (
        "e5c741d09c5f63a7ccda144823609ca2702e4c3cfb0c510066657d643199ae96"
    )
    # 1,280 virtual nodes: more than the name ends made once (1,024).
    heavy = {"big": 8.0, "small": 1.0}
    assert HashRing(heavy).points() == _spec_points(heavy, 160)


# Ids whose order as str is not their order as given, non-ASCII ones (node id order is
# code point order), and the twins of test_ring_incremental (their vnode 0 share a point).
IDS = ["n16724", "n100940", "a", "b", "B", "é", "z" * 3, "\U0001f600", "日本", "n1", "n10", "n2"]


@settings(max_examples=60, deadline=None)
@given(
    weights=st.dictionaries(
        st.sampled_from(IDS), st.sampled_from([0.01, 0.5, 1.0, 3.0]), min_size=1
    ),
    # 400 x 3.0: more virtual nodes than the name ends made once (1,024).
    vnodes=st.sampled_from([1, 3, 40, 160, 400]),
)
def test_build_follows_the_spec(weights: dict[str, float], vnodes: int) -> None:
    spec = _spec_points(weights, vnodes)
    points = [p for p, _ in spec]
    for path in ("float keys", "int keys"):
        with pytest.MonkeyPatch.context() as mp:
            if path == "int keys":
                mp.setattr(ring_module, "_FLOAT_RANKS", 0)
            ring = HashRing(weights, vnodes=vnodes)
        assert ring.points() == spec, path
        for key in KEYS[:300]:
            i = bisect_left(points, key_hash(key)) % len(points)
            assert ring.node_for(key) == spec[i][1], (path, key)


def test_buckets_are_left_alone_by_the_garbage_collector() -> None:
    # Tuples of ints and strs stop being tracked at their first collection; a ring of
    # list buckets was traversed by every full collection of the process, for as long
    # as it lived. Changes make tuples too.
    ring = HashRing(MEMBERS[:100]).with_node("joiner").without_node("member-7")
    gc.collect()
    assert not any(gc.is_tracked(pts) or gc.is_tracked(own) for pts, own in ring._buckets)
