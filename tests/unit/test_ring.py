"""HashRing: the documented placement, distribution, movement, bounded loads, bad input.

Each property is checked exactly where it is exact (movement, replica order, bounded
loads), and against a bound where it is statistical (distribution, weights). Checkers
that could pass vacuously have a negative control run against a deliberately broken
placement.
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import pickle
import random
import re
import subprocess
import sys
import threading
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import mmh3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcoord.cli import ring as cli_ring
from dcoord.errors import ConfigError, DcoordError
from dcoord.ring import MAX_POINTS, HashRing, Key, key_hash

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "ring.md"
NODES10 = [f"node-{i}" for i in range(10)]
KEYS = [f"user:{i}" for i in range(20_000)]

# Small rings keep hypothesis examples fast; ids may be any non-empty UTF-8 string.
node_ids = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=8)
keys_st = st.one_of(st.text(alphabet=st.characters(codec="utf-8")), st.binary())


def _doc_table(name: str) -> list[list[str]]:
    text = DOC.read_text(encoding="utf-8")
    m = re.search(rf"<!-- worked-example:{name} -->\n(.*?)<!-- /worked-example -->", text, re.S)
    assert m, f"table {name!r} missing from {DOC}"
    rows = [line for line in m.group(1).splitlines() if line.startswith("|")]
    return [[c.strip().strip("`") for c in row.strip("|").split("|")] for row in rows[2:]]


def _reference_walk(ring: HashRing, key: Key) -> list[str]:
    """Distinct owners clockwise from the key, straight from the documented rules."""
    pts = ring.points()
    h = mmh3.hash(key.encode() if isinstance(key, str) else key, 0, False)
    start = next((i for i, (p, _) in enumerate(pts) if p >= h), 0)
    out: list[str] = []
    for _, node in pts[start:] + pts[:start]:
        if node not in out:
            out.append(node)
    return out


# -- the documented scheme ---------------------------------------------------------------


def test_doc_points_table_matches_ring() -> None:
    rows = _doc_table("points")
    ring = HashRing(["a", "b", "c"], vnodes=2)
    assert len(rows) == 6
    expected = []
    for vnode, hexbytes, hexpoint, point, node in rows:
        assert bytes.fromhex(hexbytes.replace(" ", "")) == vnode.encode()
        assert int(hexpoint, 16) == int(point) == mmh3.hash(vnode.encode(), 0, False)
        assert vnode.rpartition("#")[0] == node
        expected.append((int(point), node))
    assert ring.points() == expected


def test_doc_keys_table_matches_ring() -> None:
    rows = _doc_table("keys")
    ring = HashRing(["a", "b", "c"], vnodes=2)
    assert len(rows) == 7
    for key_lit, hexbytes, hexhash, h, node, replicas in rows:
        key = ast.literal_eval(key_lit)
        raw = key.encode() if isinstance(key, str) else key
        assert raw.hex(" ") == ("" if hexbytes == "(empty)" else hexbytes)
        assert key_hash(key) == int(h) == int(hexhash, 16)
        assert ring.node_for(key) == node
        assert ring.nodes_for(key, 3) == replicas.split(", ")


def test_doc_default_ring_table() -> None:
    rows = _doc_table("default")
    ring = HashRing(["cache-1", "cache-2", "cache-3"])
    assert len(rows) == 7
    for key_lit, node, replicas in rows:
        key = ast.literal_eval(key_lit)
        assert ring.node_for(key) == node
        assert ring.nodes_for(key, 2) == replicas.split(", ")


def test_weight_rounds_half_to_even_with_at_least_one_vnode() -> None:
    counts = Counter(n for _, n in HashRing({"a": 0.5, "b": 0.7, "c": 0.01}, vnodes=5).points())
    assert counts == {"a": 2, "b": 4, "c": 1}
    assert Counter(n for _, n in HashRing({"a": 2, "b": 1}).points()) == {"a": 320, "b": 160}


def test_equal_points_are_ordered_by_node_id() -> None:
    # n16724#0 and n100940#0 collide on 4158874788; "n100940" < "n16724" wins the arc.
    assert mmh3.hash("n16724#0", 0, False) == mmh3.hash("n100940#0", 0, False)
    for order in (["n16724", "n100940"], ["n100940", "n16724"]):
        ring = HashRing(order, vnodes=1)
        assert ring.points() == [(4158874788, "n100940"), (4158874788, "n16724")]
        assert {ring.node_for(k) for k in KEYS[:200]} == {"n100940"}
        assert ring.nodes_for("x", 2) == ["n100940", "n16724"]
        assert ring.shares() == {"n16724": 0.0, "n100940": 1.0} or ring.shares() == {
            "n100940": 1.0,
            "n16724": 0.0,
        }


def test_a_key_on_a_point_belongs_to_that_point() -> None:
    # The vnode string itself hashes exactly onto its point: ">= H(key)" is inclusive.
    ring = HashRing(["a", "b", "c"], vnodes=50)
    for node in "abc":
        for i in range(50):
            assert ring.node_for(f"{node}#{i}") == node


@settings(max_examples=200, deadline=None)
@given(keys_st)
def test_str_hashes_as_its_utf8_bytes(key: Key) -> None:
    raw = key.encode() if isinstance(key, str) else key
    assert key_hash(key) == key_hash(raw) == mmh3.hash(raw, 0, False)
    ring = HashRing(["a", "b", "c"], vnodes=8)
    assert ring.node_for(key) == ring.node_for(raw) == _reference_walk(ring, key)[0]


_SUBPROCESS = """
import json, sys
from dcoord.ring import HashRing
ring = HashRing({"a": 1.0, "b": 2.0, "c": 0.5, "d": 1.0})
keys = [f"user:{i}" for i in range(2000)]
print(json.dumps([ring.node_for(k) for k in keys] + ring.nodes_for("user:7", 4)))
"""


def test_same_placement_in_other_processes_with_other_hash_seeds() -> None:
    ring = HashRing({"a": 1.0, "b": 2.0, "c": 0.5, "d": 1.0})
    expected = [ring.node_for(f"user:{i}") for i in range(2000)] + ring.nodes_for("user:7", 4)
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        out = subprocess.run(
            [sys.executable, "-c", _SUBPROCESS], env=env, capture_output=True, check=True
        )
        assert ast.literal_eval(out.stdout.decode()) == expected


# -- distribution and weights ------------------------------------------------------------


def test_ten_nodes_spread_evenly_at_160_vnodes() -> None:
    ring = HashRing(NODES10, vnodes=160)
    counts = Counter(ring.node_for(k) for k in KEYS)
    mean = len(KEYS) / 10
    assert set(counts) == set(NODES10)
    assert max(counts.values()) / mean < 1.15
    assert min(counts.values()) / mean > 0.85
    shares = ring.shares()
    assert math.isclose(sum(shares.values()), 1.0)
    # The exact arc shares predict the sampled counts (20k keys: sd ~ 0.2 points).
    for node in NODES10:
        assert abs(counts[node] / len(KEYS) - shares[node]) < 0.01


def test_more_vnodes_spread_better() -> None:
    def spread(v: int) -> float:
        return max(HashRing(NODES10, vnodes=v).shares().values()) * 10

    assert spread(640) < spread(160) < spread(10)


def test_weight_two_gets_about_twice_the_keys() -> None:
    ring = HashRing({"heavy": 2.0, "b": 1.0, "c": 1.0, "d": 1.0})
    counts = Counter(ring.node_for(k) for k in KEYS)
    others = (counts["b"] + counts["c"] + counts["d"]) / 3
    assert 1.7 < counts["heavy"] / others < 2.3
    assert abs(ring.shares()["heavy"] - 0.4) < 0.03


# -- replicas ----------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    nodes=st.dictionaries(node_ids, st.sampled_from([0.5, 1.0, 2.0]), min_size=1, max_size=6),
    vnodes=st.integers(1, 12),
    key=keys_st,
    data=st.data(),
)
def test_replicas_are_distinct_and_in_ring_order(
    nodes: dict[str, float], vnodes: int, key: Key, data: st.DataObject
) -> None:
    ring = HashRing(nodes, vnodes=vnodes)
    n = data.draw(st.integers(1, len(nodes)))
    got = ring.nodes_for(key, n)
    assert len(got) == len(set(got)) == n
    assert got[0] == ring.node_for(key)
    assert got == _reference_walk(ring, key)[:n]


def test_all_replicas_is_every_node() -> None:
    ring = HashRing(NODES10, vnodes=3)
    for key in KEYS[:100]:
        assert sorted(ring.nodes_for(key, 10)) == sorted(NODES10)


# -- movement ----------------------------------------------------------------------------


def _bad_moves(
    before: Mapping[Key, str], after: Mapping[Key, str], added: set[str], removed: set[str]
) -> list[Key]:
    """Keys that moved although neither end of the move is an added/removed node."""
    return [
        k
        for k, old in before.items()
        if after[k] != old and old not in removed and after[k] not in added
    ]


def _place(ring: HashRing, keys: Iterable[Key]) -> dict[Key, str]:
    return {k: ring.node_for(k) for k in keys}


def test_movement_checker_catches_modulo_placement() -> None:
    # Negative control: hash-mod-N placement moves almost everything on a resize.
    def mod(nodes: list[str]) -> dict[Key, str]:
        return {k: nodes[key_hash(k) % len(nodes)] for k in KEYS[:2000]}

    assert len(_bad_moves(mod(NODES10), mod([*NODES10, "new"]), {"new"}, set())) > 1000


@settings(max_examples=60, deadline=None)
@given(
    nodes=st.dictionaries(node_ids, st.sampled_from([0.5, 1.0, 3.0]), min_size=2, max_size=6),
    vnodes=st.integers(1, 40),
    new=node_ids,
    weight=st.sampled_from([0.25, 1.0, 2.0]),
)
def test_add_and_remove_move_only_that_nodes_keys(
    nodes: dict[str, float], vnodes: int, new: str, weight: float
) -> None:
    keys = KEYS[:500]
    ring = HashRing(nodes, vnodes=vnodes)
    before = _place(ring, keys)
    if new not in nodes:
        grown = ring.with_node(new, weight)
        after = _place(grown, keys)
        assert _bad_moves(before, after, {new}, set()) == []
        assert grown.without_node(new).points() == ring.points()
    gone = next(iter(nodes))
    after = _place(ring.without_node(gone), keys)
    assert _bad_moves(before, after, set(), {gone}) == []
    assert all(after[k] == before[k] for k in keys if before[k] != gone)


def test_moved_fraction_is_near_ideal() -> None:
    ring = HashRing(NODES10)
    before = _place(ring, KEYS)
    added = _place(ring.with_node("node-10"), KEYS)
    moved = sum(before[k] != added[k] for k in KEYS) / len(KEYS)
    assert abs(moved - 1 / 11) / (1 / 11) < 0.15
    assert abs(moved - ring.with_node("node-10").shares()["node-10"]) < 0.01
    removed = _place(ring.without_node("node-3"), KEYS)
    moved = sum(before[k] != removed[k] for k in KEYS) / len(KEYS)
    assert moved == sum(v == "node-3" for v in before.values()) / len(KEYS)


def test_derived_rings_equal_fresh_builds() -> None:
    ring = HashRing({"a": 1.0, "b": 2.0})
    grown = ring.with_node("c", 0.5)
    fresh = HashRing({"a": 1.0, "b": 2.0, "c": 0.5})
    assert grown.points() == fresh.points() and grown == fresh and hash(grown) == hash(fresh)
    assert grown.without_node("b").points() == HashRing({"a": 1.0, "c": 0.5}).points()
    assert dict(ring.nodes) == {"a": 1.0, "b": 2.0}  # the original is untouched
    assert list(grown) == ["a", "b", "c"] and len(grown) == 3 and "c" in grown


# -- immutability and value semantics -----------------------------------------------------


def test_ring_is_immutable() -> None:
    ring = HashRing(["a", "b"])
    with pytest.raises(AttributeError):
        ring._points = []
    with pytest.raises(AttributeError):
        del ring._owners
    with pytest.raises(TypeError):
        ring.nodes["a"] = 5.0  # type: ignore[index]
    assert ring.vnodes == 160


def test_equality_pickle_and_repr() -> None:
    ring = HashRing({"a": 1.0, "b": 2.0}, vnodes=50)
    assert ring == HashRing({"b": 2.0, "a": 1.0}, vnodes=50)
    assert ring != HashRing({"a": 1.0, "b": 2.0}, vnodes=51)
    assert ring != HashRing({"a": 1.0, "b": 1.5}, vnodes=50)
    assert ring != "not a ring"
    clone = pickle.loads(pickle.dumps(ring))
    assert clone == ring and clone.points() == ring.points()
    assert eval(repr(ring), {"HashRing": HashRing}) == ring


def test_concurrent_lookups_on_a_shared_ring() -> None:
    ring = HashRing(NODES10)
    expected = [ring.node_for(k) for k in KEYS[:3000]]
    results: list[list[str]] = []

    def work() -> None:
        results.append([ring.node_for(k) for k in KEYS[:3000]])

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in range(20):
        ring.with_node(f"x{_}")  # derived rings never disturb the shared one
    for t in threads:
        t.join()
    assert results == [expected] * 4


# -- bounded loads -----------------------------------------------------------------------


def _reference_assign(ring: HashRing, keys: Iterable[Key], c: float) -> dict[Key, str]:
    """Naive bounded-load placement from the documented rules (walk vnode by vnode)."""
    from fractions import Fraction

    distinct = list(dict.fromkeys(keys))
    total = sum(Fraction(repr(w)) for w in ring.nodes.values())
    room = {
        n: math.ceil(Fraction(repr(c)) * len(distinct) * Fraction(repr(w)) / total)
        for n, w in ring.nodes.items()
    }
    pts = ring.points()
    order = sorted(
        distinct,
        key=lambda k: (key_hash(k), k.encode() if isinstance(k, str) else k, isinstance(k, str)),
    )
    out: dict[Key, str] = {}
    for key in order:
        i = bisect_left([p for p, _ in pts], key_hash(key))
        for j in range(len(pts)):
            node = pts[(i + j) % len(pts)][1]
            if room[node] > 0:
                room[node] -= 1
                out[key] = node
                break
    return out


def _cap_violations(ring: HashRing, placed: Mapping[Any, str], c: float) -> dict[str, int]:
    # Decimal arithmetic, as documented: c=1.1, m=1000, 10 nodes gives a cap of 110.
    m = len(placed)
    dec = {n: Decimal(repr(w)) for n, w in ring.nodes.items()}
    total = sum(dec.values())
    loads = Counter(placed.values())
    return {
        n: loads[n]
        for n, w in dec.items()
        if loads[n] > math.ceil(Decimal(repr(c)) * m * w / total)
    }


def test_cap_checker_catches_unbounded_placement() -> None:
    # Negative control: a skewed ring placed without bounds breaks the cap.
    ring = HashRing({"a": 1.0, "b": 1.0}, vnodes=1)
    plain = _place(ring, KEYS[:1000])
    assert _cap_violations(ring, plain, 1.05)


@pytest.mark.parametrize("c", [1.01, 1.1, 1.25, 2.0])
def test_bounded_load_caps_every_node_and_places_every_key(c: float) -> None:
    ring = HashRing(NODES10, vnodes=20)
    keys = KEYS[:5000]
    placed = ring.assign(keys, capacity=c)
    assert set(placed) == set(keys)
    assert _cap_violations(ring, placed, c) == {}
    assert set(placed.values()) <= set(NODES10)
    assert max(Counter(placed.values()).values()) <= {1.01: 505, 1.1: 550, 1.25: 625, 2.0: 1000}[c]


def test_bounded_load_is_deterministic_and_order_free() -> None:
    ring = HashRing(NODES10, vnodes=20)
    # Equal hashes: b"user:1" and "user:1"; "k15599" and "k97211" (mmh3 1186588479).
    keys: list[Key] = [*KEYS[:3000], b"user:1", b"\xff", "k97211", "k15599"]
    assert key_hash("k15599") == key_hash("k97211")
    first = ring.assign(keys, capacity=1.1)
    for seed in range(3):
        shuffled = keys[:]
        random.Random(seed).shuffle(shuffled)
        assert ring.assign(shuffled, capacity=1.1) == first
    assert ring.assign(keys + keys[:100], capacity=1.1) == first  # duplicates placed once
    assert first == _reference_assign(ring, keys, 1.1)


def test_bounded_load_breaks_hash_ties_by_key_bytes() -> None:
    # Both keys hash to 1186588479, owned by "e", which has room for one (ceil(1.2*2/4)):
    # the smaller key bytes, "k15599", gets it whichever order the keys come in.
    ring = HashRing({"e": 1.0, "z": 3.0}, vnodes=1)
    assert ring.node_for("k15599") == ring.node_for("k97211") == "e"
    for keys in (["k97211", "k15599"], ["k15599", "k97211"]):
        assert ring.assign(keys, capacity=1.2) == {"k15599": "e", "k97211": "z"}


@settings(max_examples=60, deadline=None)
@given(
    nodes=st.dictionaries(node_ids, st.sampled_from([0.3, 1.0, 2.5]), min_size=1, max_size=5),
    vnodes=st.integers(1, 10),
    keys=st.lists(keys_st, max_size=60),
    c=st.sampled_from([1.0001, 1.2, 1.5, 3.0]),
)
def test_bounded_load_matches_reference(
    nodes: dict[str, float], vnodes: int, keys: list[Key], c: float
) -> None:
    ring = HashRing(nodes, vnodes=vnodes)
    placed = ring.assign(keys, capacity=c)
    assert placed == _reference_assign(ring, keys, c)
    assert set(placed) == set(keys)
    assert _cap_violations(ring, placed, c) == {}


def test_bounded_load_with_roomy_capacity_is_plain_placement() -> None:
    ring = HashRing(NODES10)
    assert ring.assign(KEYS[:2000], capacity=100) == _place(ring, KEYS[:2000])
    assert ring.assign([], capacity=1.25) == {}


def test_bounded_load_weighted_caps() -> None:
    ring = HashRing({"big": 3.0, "s1": 1.0, "s2": 1.0}, vnodes=4)
    placed = ring.assign(KEYS[:1000], capacity=1.1)
    loads = Counter(placed.values())
    assert loads["big"] <= 660  # ceil(1.1 * 1000 * 3/5), in decimal
    assert loads["s1"] <= 220 and loads["s2"] <= 220


# -- bad input ---------------------------------------------------------------------------

_ring = HashRing(["a", "b", "c"])

BAD: list[tuple[str, Callable[[], Any], str]] = [
    ("no nodes", lambda: HashRing([]), "[]"),
    ("empty mapping", lambda: HashRing({}), "{}"),
    ("bare string", lambda: HashRing("abc"), "'abc'"),
    ("not iterable", lambda: HashRing(5), "5"),  # type: ignore[arg-type]
    ("int node id", lambda: HashRing(["a", 7]), "7"),  # type: ignore[list-item]
    ("empty node id", lambda: HashRing(["a", ""]), "''"),
    ("duplicate", lambda: HashRing(["a", "b", "a"]), "'a'"),
    ("zero weight", lambda: HashRing({"a": 0}), "0"),
    ("negative weight", lambda: HashRing({"a": -1.5}), "-1.5"),
    ("nan weight", lambda: HashRing({"a": float("nan")}), "nan"),
    ("inf weight", lambda: HashRing({"a": float("inf")}), "inf"),
    ("str weight", lambda: HashRing({"a": "2"}), "'2'"),
    ("bool weight", lambda: HashRing({"a": True}), "True"),
    ("huge weight", lambda: HashRing({"a": 1e9}), "160000000000"),
    ("zero vnodes", lambda: HashRing(["a"], vnodes=0), "0"),
    ("float vnodes", lambda: HashRing(["a"], vnodes=1.5), "1.5"),  # type: ignore[arg-type]
    ("bool vnodes", lambda: HashRing(["a"], vnodes=True), "True"),
    ("int key", lambda: _ring.node_for(42), "42"),  # type: ignore[arg-type]
    ("none key", lambda: _ring.node_for(None), "None"),  # type: ignore[arg-type]
    ("bytearray key", lambda: _ring.node_for(bytearray(b"k")), "bytearray(b'k')"),  # type: ignore[arg-type]
    ("nodes_for key", lambda: _ring.nodes_for(4.5, 1), "4.5"),  # type: ignore[arg-type]
    ("n zero", lambda: _ring.nodes_for("k", 0), "0"),
    ("n too big", lambda: _ring.nodes_for("k", 4), "n=4"),
    ("n float", lambda: _ring.nodes_for("k", 1.0), "1.0"),  # type: ignore[arg-type]
    ("add present", lambda: _ring.with_node("a"), "'a'"),
    ("add bad weight", lambda: _ring.with_node("d", 0.0), "0.0"),
    ("add non-str", lambda: _ring.with_node(3), "3"),  # type: ignore[arg-type]
    ("remove unknown", lambda: _ring.without_node("zz"), "'zz'"),
    ("remove last", lambda: HashRing(["a"]).without_node("a"), "'a'"),
    ("capacity one", lambda: _ring.assign(["k"], capacity=1.0), "1.0"),
    ("capacity nan", lambda: _ring.assign(["k"], capacity=float("nan")), "nan"),
    ("capacity str", lambda: _ring.assign(["k"], capacity="2"), "'2'"),  # type: ignore[arg-type]
    ("assign bad key", lambda: _ring.assign(["k", 9]), "9"),
    ("assign unhashable key", lambda: _ring.assign([["k"]]), "['k']"),
]


@pytest.mark.parametrize(("call", "named"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises_config_error_naming_the_value(
    call: Callable[[], Any], named: str
) -> None:
    with pytest.raises(ConfigError) as info:
        call()
    assert named in str(info.value)
    assert isinstance(info.value, DcoordError) and isinstance(info.value, ValueError)


def test_max_points_bound_is_what_the_message_says() -> None:
    assert MAX_POINTS == 1 << 22
    with pytest.raises(ConfigError, match=str(MAX_POINTS)):
        HashRing(["a", "b"], vnodes=MAX_POINTS // 2 + 1)


_SURROGATES = r"""
from dcoord.ring import HashRing
from dcoord.errors import ConfigError
r = HashRing(["a", "b"])
calls = [
    lambda: r.node_for("k\udc80"),
    lambda: r.nodes_for("k\udc80", 2),
    lambda: r.assign(["k\udc80"]),
    lambda: HashRing(["a\ud800"]),
    lambda: r.with_node("a\ud800"),
]
for call in calls:
    try:
        call()
    except ConfigError as e:
        print(e)
"""


def test_lone_surrogates_are_rejected_without_crashing_the_interpreter() -> None:
    # mmh3 5.x segfaults when handed such a str; a child process turns a regression into
    # a failed test instead of a dead test run.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _SURROGATES], env=env, capture_output=True)
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    lines = out.stdout.decode().splitlines()
    assert len(lines) == 5
    assert all("'k\\udc80'" in line for line in lines[:3]), lines
    assert all("'a\\ud800'" in line for line in lines[3:]), lines


# -- CLI ---------------------------------------------------------------------------------


def _cli(**kw: Any) -> argparse.Namespace:
    base: dict[str, Any] = dict(
        nodes="a,b,c", vnodes=160, keys=None, sample=3000, add=None, remove=None, json=False
    )
    return argparse.Namespace(**{**base, **kw})


def test_cli_prints_shares(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_ring.run(_cli(nodes="a=2,b,c")) == 0
    out = capsys.readouterr().out
    ring = HashRing({"a": 2.0, "b": 1.0, "c": 1.0})
    count_a = sum(ring.node_for(f"key:{i}") == "a" for i in range(3000))
    assert re.search(rf"^  a\s+2\s+{count_a}\s+[\d.]+%\s+50\.00%\s+#+$", out, re.M), out
    assert "3 nodes, vnodes=160, 3000 keys (sample)" in out


def test_cli_add_and_remove_report_moves(capsys: pytest.CaptureFixture[str]) -> None:
    keys = [f"key:{i}" for i in range(3000)]
    ring = HashRing(["a", "b", "c"])
    to_d = sum(ring.with_node("d").node_for(k) == "d" for k in keys)
    from_a = sum(ring.node_for(k) == "a" for k in keys)
    cli_ring.run(_cli(add="d"))
    assert f"moved by --add d: {to_d} of 3000 keys" in capsys.readouterr().out
    cli_ring.run(_cli(remove="a", add="d"))
    out = capsys.readouterr().out
    assert f"moved by --remove a: {from_a} of 3000 keys" in out
    # Each step against its own ideal: a's share of 3 nodes, then d's share of 3 nodes.
    assert out.count("ideal 33.33%") == 2 and "total:" in out


def test_cli_reads_keys_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "keys.txt"
    path.write_bytes(b"user:1\r\nuser:2\n\n\xff\xfe\nuser:42\n")
    cli_ring.run(_cli(keys=str(path), sample=None, nodes="a,b,c", vnodes=2))
    out = capsys.readouterr().out
    assert "4 keys" in out
    ring = HashRing(["a", "b", "c"], vnodes=2)
    counts = Counter(ring.node_for(k) for k in [b"user:1", b"user:2", b"\xff\xfe", b"user:42"])
    for node in "abc":
        assert re.search(rf"^  {node}\s+1\s+{counts[node]}\s", out, re.M)


@pytest.mark.parametrize(
    ("kw", "named"),
    [
        ({"nodes": "a,,b"}, "''"),
        ({"nodes": "a=x"}, "'x'"),
        ({"nodes": "a,a"}, "'a'"),
        ({"nodes": "a=0"}, "0.0"),
        ({"vnodes": 0}, "0"),
        ({"sample": 0}, "0"),
        ({"remove": "zz"}, "'zz'"),
        ({"add": "a"}, "'a'"),
        ({"keys": "/nonexistent/keys.txt", "sample": None}, "/nonexistent/keys.txt"),
    ],
)
def test_cli_bad_input(kw: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError) as info:
        cli_ring.run(_cli(**kw))
    assert named in str(info.value)


def test_cli_parser_registers_ring() -> None:
    parser = argparse.ArgumentParser(prog="dcoord")
    cli_ring.add_parser(parser.add_subparsers())
    args = parser.parse_args(["ring", "--nodes", "a,b", "--sample", "10", "--add", "c=2"])
    assert args.func is cli_ring.run and args.add == "c=2" and args.vnodes == 160


def test_dcoord_main_runs_ring(capsys: pytest.CaptureFixture[str]) -> None:
    from dcoord import cli

    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if "ring" not in commands:
        pytest.skip("dcoord.cli does not register the ring command yet")
    assert cli.main(["ring", "--nodes", "a,b", "--sample", "100", "--remove", "b"]) == 0
    assert "moved by --remove b:" in capsys.readouterr().out
    assert cli.main(["ring", "--nodes", "a,b", "--vnodes", "0"]) == 2
    assert "vnodes must be an int >= 1, got 0" in capsys.readouterr().err
