"""Consistent-hash ring: a pure algorithm, no I/O.

Placement is defined byte-exactly so that any language can reproduce it (see
``docs/ring.md``, which carries a worked example that the tests assert):

* hash ``H(b)`` = MurmurHash3 x86 32-bit of the bytes ``b``, seed 0, read as an
  unsigned integer in ``[0, 2**32)``;
* node ``N`` with weight ``w`` owns ``max(1, round_half_even(vnodes * w))`` virtual
  nodes; virtual node ``i`` (counting from 0) sits at point ``H(utf8(f"{N}#{i}"))``;
* the ring is the list of ``(point, N)`` pairs sorted by point, equal points ordered by
  node id (UTF-8 byte order, which is also Unicode code point order);
* a key (``str`` -> its UTF-8 bytes, or ``bytes`` as is) goes to the first pair whose
  point is ``>= H(key)``, wrapping to the first pair of the ring past the top.
"""

from __future__ import annotations

import math
import operator
import sys
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping, Sequence
from fractions import Fraction
from functools import lru_cache
from itertools import chain, islice, repeat
from numbers import Rational, Real
from types import MappingProxyType
from typing import Any, NoReturn, TypeVar

import mmh3

from dcoord.errors import ConfigError

__all__ = ["DEFAULT_VNODES", "MAX_POINTS", "HashRing", "Key", "key_hash"]

Key = str | bytes
# Ring buckets: each (points, owners), owners one longer (see HashRing._buckets).
_Bucket = tuple[tuple[int, ...], tuple[str, ...]]
_Buckets = list[_Bucket]
K = TypeVar("K", bound=str | bytes)

DEFAULT_VNODES = 160
#: Upper bound on the virtual nodes of one ring. A weight given in bytes or requests
#: instead of as a ratio would otherwise try to allocate billions of points.
MAX_POINTS = 1 << 22

_mmh3_32 = mmh3.hash


def _bad_key(key: object) -> NoReturn:
    if isinstance(key, str):
        raise ConfigError(
            f"key {key!r} is not encodable as UTF-8 (lone surrogate); pass bytes instead"
        ) from None
    raise ConfigError(f"key must be str or bytes, got {type(key).__name__}: {key!r}") from None


def key_hash(key: Key) -> int:
    """Return the ring position of ``key``: unsigned MurmurHash3 x86 32-bit, seed 0.

    A ``str`` key is hashed as its UTF-8 bytes, so ``key_hash("k") == key_hash(b"k")``.
    Raises :class:`~dcoord.errors.ConfigError` for any other type.
    """
    # mmh3 5.x crashes the interpreter (SIGSEGV) on a str holding a lone surrogate,
    # so non-ASCII str keys are encoded here, where the failure is a clean exception.
    if isinstance(key, str) and not key.isascii():
        try:
            key = key.encode()
        except UnicodeEncodeError:
            _bad_key(key)
    try:
        return _mmh3_32(key, 0, False)
    except TypeError:
        _bad_key(key)


def _check_node_id(node: object) -> str:
    if not isinstance(node, str):
        raise ConfigError(f"node id must be a str, got {type(node).__name__}: {node!r}")
    if not node:
        raise ConfigError("node id must be a non-empty string, got ''")
    try:
        node.encode()
    except UnicodeEncodeError:
        raise ConfigError(f"node id {node!r} is not encodable as UTF-8") from None
    return node


def _check_weight(node: str, weight: object) -> float:
    if isinstance(weight, bool) or not isinstance(weight, Real):
        raise ConfigError(
            f"weight of node {node!r} must be a number, got {type(weight).__name__}: {weight!r}"
        )
    value = float(weight)
    if not (math.isfinite(value) and value > 0.0):
        raise ConfigError(f"weight of node {node!r} must be finite and > 0, got {weight!r}")
    return value


def _check_vnodes(vnodes: object) -> int:
    if isinstance(vnodes, bool):
        raise ConfigError(f"vnodes must be an int >= 1, got {vnodes!r}")
    try:
        value = operator.index(vnodes)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(
            f"vnodes must be an int >= 1, got {type(vnodes).__name__}: {vnodes!r}"
        ) from None
    if value < 1:
        raise ConfigError(f"vnodes must be an int >= 1, got {vnodes!r}")
    return value


def _vnode_count(vnodes: int, weight: float) -> int:
    # Python's round() is round-half-to-even on the exact binary value: documented so
    # that other languages (Go math.RoundToEven, Java Math.rint) get the same count.
    return max(1, round(vnodes * weight))


#: Nodes whose sorted points stay cached: a live ring or a rebuild re-uses them instead
#: of hashing ``vnodes`` names per node again. A node's points are kept as one array of
#: doubles, about 1.5 KB at 160 vnodes (<= 13 MB for the cache): enough for groups of
#: 5,000 members and more, whose rebuilds would otherwise hash every point again.
POINTS_CACHE_NODES = 8192

# A build sorts every point once with its owner packed into the same number, the float
#
#     key = 2**52 + point * 2**16 + rank        (rank: the owner's index in node id order)
#
# so that equal points come out in node id order (ring order rule 3) with no pass of
# their own. Every key is an integer below 2**53, so exact, and list.sort compares floats
# directly, about twice as fast as ints past 2**30 (which take the generic compare).
# Keys in [2**52, 2**53) all have the same exponent, so the low 52 bits of a key are
# its value - 2**52: the point fills bits 16-47, bytes 2-5 of the 8 (a native uint32 in
# either byte order), and the rank bits 0-15. Both are read back for all keys at once
# through a memoryview (see _build()). Rings of more than 2**16 nodes (or where a C
# unsigned int is not 32 bits) sort packed ints instead: correct, slower.
_RANK_BITS = 16
_FLOAT_RANKS = (1 << _RANK_BITS) if array("I").itemsize == 4 else 0  # nodes keys can rank
_KEY_BASE = float(1 << 52)
_RANK_HALF = 0 if sys.byteorder == "little" else 3  # uint16 of a key's 4 holding the rank
_POINT_MASK = (1 << 32) - 1


#: The ends of virtual node names, "#0", "#1", ...: made once for the usual counts.
_SUFFIXES = tuple(f"#{i}" for i in range(1024))


@lru_cache(maxsize=POINTS_CACHE_NODES)
def _node_keys(node: str, count: int) -> array[float]:
    """The keys of ``node``'s ``count`` virtual nodes with rank 0 (``2**52 + point *
    2**16``, see _RANK_BITS), sorted: hashed once and cached; a build adds the rank.

    An array, not a tuple of floats: a quarter of the memory, and its doubles lie
    together however the heap was cut up when they were made (tuples' floats made among
    other garbage slowed later builds by ~15%).
    """
    ends = _SUFFIXES[:count] if count <= len(_SUFFIXES) else map("#{}".format, range(count))
    hashes = map(_mmh3_32, map(node.__add__, ends), repeat(0), repeat(False))
    scaled = map(operator.mul, hashes, repeat(float(1 << _RANK_BITS)))
    return array("d", sorted(map(operator.add, scaled, repeat(_KEY_BASE))))


def _node_points(node: str, count: int) -> list[int]:
    """The sorted points of ``node``'s ``count`` virtual nodes (from the cached keys)."""
    keys = _node_keys(node, count)
    if _FLOAT_RANKS:  # the keys' bits can be read as below
        return _points_of(memoryview(keys).cast("B")).tolist()
    shifted = map(operator.rshift, map(math.trunc, keys), repeat(_RANK_BITS))
    return list(map(operator.and_, shifted, repeat(_POINT_MASK)))


def _points_of(raw: memoryview) -> memoryview:
    """The points of the keys in ``raw`` (bytes of an array("d")), as uint32: bytes 2-5
    of each 8, read as uint32 from offset 2, every other one (see _RANK_BITS)."""
    return raw[2 : len(raw) - 2].cast("I")[::2]


def _build(counts: Mapping[str, int]) -> tuple[int, _Buckets, int]:
    """The bucket shift, buckets and size of a ring of ``counts`` (node -> virtual nodes).

    One sort of packed keys carries every point's owner (see _RANK_BITS), then C loops
    unpack them and cut the buckets; no Python frame runs per point.
    """
    names = sorted(counts)  # ranks in node id order
    points: memoryview
    ranks: Sequence[int]
    if len(names) <= _FLOAT_RANKS:
        keys = list(
            chain.from_iterable(
                map(operator.add, _node_keys(node, counts[node]), repeat(float(rank)))
                for rank, node in enumerate(names)
            )
        )
        keys.sort()  # each node's keys are a sorted run, which the sort merges
        raw = memoryview(array("d", keys)).cast("B")
        del keys  # not to be traversed by the collections that making the buckets sets off
        points = _points_of(raw)
        ranks = raw.cast("H")[_RANK_HALF::4]
    else:
        bits = (len(names) - 1).bit_length()
        shifted = (
            map(
                operator.or_,
                map(operator.lshift, _node_points(node, counts[node]), repeat(bits)),
                repeat(rank),
            )
            for rank, node in enumerate(names)
        )
        packed = sorted(chain.from_iterable(shifted))
        points = memoryview(array("Q", map(operator.rshift, packed, repeat(bits))))
        ranks = list(map(operator.and_, packed, repeat((1 << bits) - 1)))
    # Each bucket's owners run one past its points, to the owner of the next point on
    # the ring; past the last point that is the first point's owner.
    owners = (*map(names.__getitem__, ranks), names[ranks[0]])
    size = len(points)
    shift = _shift_for(size)
    bounds = list(map(bisect_left, repeat(points), range(0, 1 << 32, 1 << shift)))
    ends = [*bounds[1:], size]
    # Tuples, not lists: the cyclic GC stops tracking a tuple that holds only ints or
    # strs after one look at it, where it would traverse a list at every collection of
    # its generation, for as long as the ring lives.
    buckets = zip(
        map(tuple, map(points.__getitem__, map(slice, bounds, ends))),
        map(owners.__getitem__, map(slice, bounds, map(operator.add, ends, repeat(1)))),
        strict=True,
    )
    return shift, list(buckets), size


class HashRing:
    """A consistent-hash ring over weighted nodes (MurmurHash3, virtual nodes).

    ``HashRing(["a", "b", "c"])`` or ``HashRing({"a": 2.0, "b": 1.0}, vnodes=160)``.
    A node of weight ``w`` gets ``max(1, round(vnodes * w))`` virtual nodes, so its
    expected share of keys is proportional to ``w``.

    The ring is an **immutable value**: :meth:`with_node` and :meth:`without_node`
    return a new ring and leave this one untouched. A lookup therefore never sees a
    half-built ring, so one instance can be shared by any number of threads without a
    lock, and a live ring that follows group membership can swap in a new instance with
    a single reference assignment. Rings compare equal (and hash equal) when they have
    the same nodes, weights and ``vnodes``, i.e. when they place every key the same way.

    All bad input raises :class:`~dcoord.errors.ConfigError` naming the bad value.
    """

    __slots__ = ("_buckets", "_nodes", "_shift", "_size", "_vnodes")

    _nodes: dict[str, float]
    _vnodes: int
    _size: int  # virtual nodes in all
    # The sorted points cut by their top bits: bucket k holds the points p with
    # p >> _shift == k, as (points, owners) where owners has one extra entry, the owner
    # of the next point on the ring (in a later bucket, or wrapping to the first). A
    # lookup bisects one bucket of ~40 points, not all of them, and a change copies only
    # the buckets it touches (see with_changes()). Buckets are tuples: never mutated.
    _shift: int
    _buckets: _Buckets

    def __init__(
        self, nodes: Iterable[str] | Mapping[str, float], vnodes: int = DEFAULT_VNODES
    ) -> None:
        vn = _check_vnodes(vnodes)
        weights: dict[str, float] = {}
        if isinstance(nodes, str | bytes):
            # A bare string is an iterable of characters: almost certainly a mistake.
            raise ConfigError(
                f"nodes must be an iterable of node ids or a mapping id -> weight, "
                f"got the single value {nodes!r}"
            )
        if isinstance(nodes, Mapping):
            for node, weight in nodes.items():
                weights[_check_node_id(node)] = _check_weight(node, weight)
        else:
            try:
                items = iter(nodes)
            except TypeError:
                raise ConfigError(
                    f"nodes must be an iterable of node ids or a mapping id -> weight, "
                    f"got {type(nodes).__name__}: {nodes!r}"
                ) from None
            for node in items:
                if _check_node_id(node) in weights:
                    raise ConfigError(f"duplicate node id {node!r}")
                weights[node] = 1.0
        if not weights:
            raise ConfigError(f"a ring needs at least one node, got {nodes!r}")
        counts = {node: _vnode_count(vn, w) for node, w in weights.items()}
        _check_total(counts, vn)
        self._set(weights, vn, *_build(counts))

    def _set(
        self,
        nodes: dict[str, float],
        vnodes: int,
        shift: int,
        buckets: _Buckets,
        size: int,
    ) -> None:
        # Private setters go through object.__setattr__: the public one refuses writes.
        object.__setattr__(self, "_nodes", nodes)
        object.__setattr__(self, "_vnodes", vnodes)
        object.__setattr__(self, "_shift", shift)
        object.__setattr__(self, "_buckets", buckets)
        object.__setattr__(self, "_size", size)

    def _flat(self) -> tuple[list[int], list[str]]:
        """All points in ring order and their owners (no wrap entry)."""
        buckets = self._buckets
        points = list(chain.from_iterable(b[0] for b in buckets))
        owners = list(chain.from_iterable(b[1][:-1] for b in buckets))
        return points, owners

    # -- lookups ---------------------------------------------------------------------

    def node_for(self, key: Key) -> str:
        """Return the node that owns ``key`` (``str``, hashed as UTF-8, or ``bytes``)."""
        # Hot path: one hash, one bisect, one index. str and bytes both have isascii(),
        # so one call tells the common ASCII key from one that key_hash() must encode
        # first (see there), and anything else fails on it or in mmh3.
        try:
            h = _mmh3_32(key, 0, False) if key.isascii() else key_hash(key)
        except (AttributeError, TypeError):
            _bad_key(key)
        points, owners = self._buckets[h >> self._shift]
        return owners[bisect_left(points, h)]

    def node_for_many(self, keys: Iterable[Key]) -> list[str]:
        """Return ``[node_for(k) for k in keys]``, in the order given, faster.

        For a batch of ASCII ``str`` keys (or of ``bytes``) the keys are checked and
        hashed by C loops (``map``), so the per-key work left in Python is the bisect.
        """
        batch = keys if isinstance(keys, list | tuple) else list(keys)
        # mmh3 crashes on a str with a lone surrogate (see key_hash()): only a batch of
        # ASCII str, or of bytes, goes to it directly. The maps are chained, not
        # materialised: an intermediate list of 10**5 hashes costs more than it saves.
        try:
            direct = all(map(str.isascii, batch))
        except TypeError:  # not all str
            direct = all(map(isinstance, batch, repeat(bytes)))
        hashes = map(_mmh3_32, batch, repeat(0), repeat(False)) if direct else map(key_hash, batch)
        buckets, shift = self._buckets, self._shift

        # node_for() after the hash. (A pipeline of C maps joined with tee() was
        # slower than this one small frame per key.)
        def owner(h: int) -> str:
            points, owners = buckets[h >> shift]
            return owners[bisect_left(points, h)]

        return list(map(owner, hashes))

    def nodes_for(self, key: Key, n: int) -> list[str]:
        """Return ``n`` distinct nodes for ``key``, walking the ring clockwise.

        The first is :meth:`node_for`; the rest are the next distinct owners in ring
        order (the usual choice of replicas). ``1 <= n <= len(ring)``.
        """
        if isinstance(n, bool):
            raise ConfigError(f"n must be an int >= 1, got {n!r}")
        try:
            want = operator.index(n)
        except TypeError:
            raise ConfigError(f"n must be an int >= 1, got {type(n).__name__}: {n!r}") from None
        if want < 1:
            raise ConfigError(f"n must be >= 1, got {n!r}")
        if want > len(self._nodes):
            raise ConfigError(f"n={n!r} is larger than the ring's {len(self._nodes)} nodes")
        h = key_hash(key)
        first = h >> self._shift
        buckets = self._buckets
        start = bisect_left(buckets[first][0], h)
        # Every owner once, in ring order from the key's position, wrapping once.
        walk = chain(
            islice(buckets[first][1], start, len(buckets[first][0])),
            chain.from_iterable(
                b[1][:-1] for b in chain(islice(buckets, first + 1, None), islice(buckets, first))
            ),
            islice(buckets[first][1], start),
        )
        found: list[str] = []
        for node in walk:
            if node not in found:  # n is small: a list beats a set here
                found.append(node)
                if len(found) == want:
                    break
        return found

    def assign(self, keys: Iterable[K], capacity: float = 1.25) -> dict[K, str]:
        """Place a set of keys with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018).

        With ``m`` distinct keys, node ``N`` may hold at most
        ``ceil(capacity * m * weight(N) / total_weight)`` keys (``ceil(c * m / len(ring))``
        when all weights are equal), computed exactly on the decimal values as written
        (``1.1`` is 11/10, so the bound is never one off from float rounding). Keys
        are processed in ascending ``(key_hash(key), key bytes, str after bytes)`` order,
        so the result depends only on the set of keys, never on the order given; each
        goes to the first node clockwise from its hash that still has room. Every key is
        placed because ``capacity > 1`` leaves more room than keys.

        Returns a dict key -> node. Duplicate keys are placed once.
        """
        c = _check_capacity(capacity)
        hashed: dict[K, int] = {}
        for key in keys:
            # Hash before using the key in a dict: an unhashable non-key (a list, a
            # bytearray) is then rejected as a bad key, not as a TypeError from dict.
            if isinstance(key, str) and not key.isascii():
                hashed[key] = key_hash(key)
                continue
            try:
                hashed[key] = _mmh3_32(key, 0, False)
            except TypeError:
                _bad_key(key)
        if not hashed:
            return {}
        m = len(hashed)
        weights = {node: _decimal(w) for node, w in self._nodes.items()}
        total = sum(weights.values())
        room = {node: math.ceil(c * m * w / total) for node, w in weights.items()}

        order = sorted(hashed, key=hashed.__getitem__)
        hashes = [hashed[k] for k in order]
        # Equal hashes (about m*m / 2**33 pairs) are ordered by the key's bytes, so the
        # result never depends on the order the keys were given in.
        run = 0
        for j in range(1, m + 1):
            if j == m or hashes[j] != hashes[run]:
                if j - run > 1:
                    order[run:j] = sorted(order[run:j], key=_tie_order)
                run = j

        points, owners = self._flat()
        size = len(points)
        positions: dict[str, list[int]] = {node: [] for node in self._nodes}
        for i in range(size):
            positions[owners[i]].append(i)
        # "Next position whose node still has room" as a union-find with path
        # compression: a full node's positions are linked to their successors, so each
        # lookup skips whole runs of full nodes instead of walking them vnode by vnode.
        parent = list(range(size + 1))  # parent[size] == size: "past the end"

        def find(i: int) -> int:
            root = i
            while parent[root] != root:
                root = parent[root]
            while parent[i] != root:
                parent[i], i = root, parent[i]
            return root

        out: dict[K, str] = {}
        for key, h in zip(order, hashes, strict=True):
            i = bisect_left(points, h)
            if parent[i] != i:
                i = find(i)
            if i == size:
                i = find(0)
            node = owners[i]
            out[key] = node
            room[node] -= 1
            if not room[node]:
                for j in positions[node]:
                    parent[j] = j + 1
        return out

    # -- derived views ---------------------------------------------------------------

    def shares(self) -> dict[str, float]:
        """Return the exact fraction of the hash space each node owns (sums to 1.0)."""
        points, owners = self._flat()
        arcs = dict.fromkeys(self._nodes, 0)
        # Position i owns (points[i-1], points[i]]; position 0 also owns the wrap-around.
        arcs[owners[0]] += points[0] + (1 << 32) - points[-1]
        for i in range(1, len(points)):
            arcs[owners[i]] += points[i] - points[i - 1]
        return {node: arc / (1 << 32) for node, arc in arcs.items()}

    def points(self) -> list[tuple[int, str]]:
        """Return the ring as sorted ``(point, node)`` pairs (for checks and debugging)."""
        return list(zip(*self._flat(), strict=True))

    @property
    def nodes(self) -> Mapping[str, float]:
        """Node id -> weight, in insertion order (a read-only view)."""
        return MappingProxyType(self._nodes)

    @property
    def vnodes(self) -> int:
        """Virtual nodes per unit of weight."""
        return self._vnodes

    # -- derived rings ---------------------------------------------------------------

    def with_node(self, node: str, weight: float = 1.0) -> HashRing:
        """Return a new ring with ``node`` added; this ring is unchanged.

        Only keys that the new node now owns move; all others keep their node.
        """
        return self.with_changes(add={node: weight})

    def without_node(self, node: str) -> HashRing:
        """Return a new ring with ``node`` removed; this ring is unchanged.

        Only the removed node's keys move. Removing the last node is an error.
        """
        if len(self._nodes) == 1 and node in self._nodes:
            raise ConfigError(f"cannot remove {node!r}: it is the ring's only node")
        return self.with_changes(remove=[node])

    def with_changes(
        self, add: Mapping[str, float] | None = None, remove: Iterable[str] = ()
    ) -> HashRing:
        """Return a new ring with the nodes ``remove`` taken out, then ``add`` (id ->
        weight) put in; this ring is unchanged. Removing and adding one id re-weights it.

        Equal to ``HashRing`` of the resulting weights, but only the changed nodes'
        points are hashed (once per node and process: they are cached) and put in or
        taken out of the buckets they fall in, which are copied; the new ring shares all
        other buckets with this one. One node at 160,000 points costs about 0.2 ms.
        Raises ConfigError for a node to remove that is absent, one to add that is
        present, or an empty result.
        """
        gone = list(dict.fromkeys(remove))
        for node in gone:
            if node not in self._nodes:
                raise ConfigError(f"node {node!r} is not in the ring (nodes: {list(self._nodes)})")
        nodes = dict(self._nodes)
        for node in gone:
            del nodes[node]
        added: dict[str, int] = {}
        for node, weight in (add or {}).items():
            if _check_node_id(node) in nodes:
                raise ConfigError(f"node {node!r} is already in the ring")
            nodes[node] = _check_weight(node, weight)
            added[node] = _vnode_count(self._vnodes, nodes[node])
        if not nodes:
            raise ConfigError(f"cannot remove {gone!r}: the ring would have no node left")
        _check_total(added, self._vnodes, self._size)
        size = self._size + sum(added.values())
        size -= sum(_vnode_count(self._vnodes, self._nodes[n]) for n in gone)
        buckets = 1 << (32 - self._shift)
        least = _MIN_FILL * buckets if buckets > 1 else 0  # one bucket may hold few points
        if len(gone) + len(added) > len(self._nodes) // 4 or not (
            least <= size <= _MAX_FILL * buckets
        ):
            # Many changes at once, or buckets grown too full or empty: a build from
            # the cached points is cheaper, and re-cuts the buckets.
            counts = {n: _vnode_count(self._vnodes, w) for n, w in nodes.items()}
            ring = HashRing.__new__(HashRing)
            ring._set(nodes, self._vnodes, *_build(counts))
            return ring
        ring = HashRing.__new__(HashRing)
        ring._set(nodes, self._vnodes, self._shift, self._splice(gone, added), size)
        return ring

    def _splice(self, gone: list[str], added: Mapping[str, int]) -> _Buckets:
        """The buckets with ``gone``'s points cut out and ``added``'s put in.

        Only the buckets a changed point falls in are copied (and those whose wrap entry
        named the old first owner of a changed bucket); the rest are shared with this ring.
        """
        shift = self._shift
        old = self._buckets
        buckets = list(old)
        # Buckets whose first point was cut or put in: only there can the first owner
        # (or emptiness) change, which the wrap entries before them name (see below).
        heads: set[int] = set()
        # Each edit copies the bucket through two lists and back to tuples (tuples as
        # _build() makes them): measured, that costs less than slicing and joining
        # tuples, or than batching the edits through C maps. A node's points mostly
        # fall in distinct buckets of ~40, so a bucket is rarely copied twice.
        for node in gone:
            for point in _node_points(node, _vnode_count(self._vnodes, self._nodes[node])):
                k = point >> shift
                pts, own = buckets[k]
                i = bisect_left(pts, point)
                while own[i] != node:  # equal points of other nodes may come first
                    i += 1
                if not i:
                    heads.add(k)
                pts_l, own_l = list(pts), list(own)
                del pts_l[i], own_l[i]
                buckets[k] = (tuple(pts_l), tuple(own_l))
        for node, count in added.items():
            for point in _node_points(node, count):
                k = point >> shift
                pts, own = buckets[k]
                i = bisect_left(pts, point)
                # Among equal points the smaller node id comes first (ring order rule 3).
                while i < len(pts) and pts[i] == point and own[i] < node:
                    i += 1
                if not i:
                    heads.add(k)
                pts_l, own_l = list(pts), list(own)
                pts_l.insert(i, point)
                own_l.insert(i, node)
                buckets[k] = (tuple(pts_l), tuple(own_l))
        last = len(buckets) - 1

        def next_owner(k: int) -> str:
            # The owner of the first point after bucket k (the ring is never empty).
            while True:
                k = k + 1 if k < last else 0
                pts, own = buckets[k]
                if pts:
                    return own[0]

        # A bucket's wrap entry names the first owner of the next non-empty bucket: where
        # a bucket's first owner changed, redo the wrap entries of the buckets before it,
        # back to the first non-empty one (usually just the one before).
        for k in heads:
            pts, own = buckets[k]
            was_pts, was_own = old[k]
            if (own[0] if pts else None) == (was_own[0] if was_pts else None):
                continue
            j = k
            while True:
                j = j - 1 if j else last
                j_pts, j_own = buckets[j]
                wrap = next_owner(j)
                if j_own[-1] != wrap:
                    buckets[j] = (j_pts, (*j_own[:-1], wrap))
                if j_pts or j == k:
                    break
        return buckets

    # -- value-object protocol -------------------------------------------------------

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node: object) -> bool:
        return node in self._nodes

    def __iter__(self) -> Iterator[str]:
        return iter(self._nodes)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HashRing):
            return NotImplemented
        return self._vnodes == other._vnodes and self._nodes == other._nodes

    def __hash__(self) -> int:
        return hash((self._vnodes, frozenset(self._nodes.items())))

    def __repr__(self) -> str:
        return f"HashRing({self._nodes!r}, vnodes={self._vnodes})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Slots plus a refusing __setattr__ defeat default pickling; rebuilding is cheap.
        return (HashRing, (dict(self._nodes), self._vnodes))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"HashRing is immutable; use with_node()/without_node() ({name})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"HashRing is immutable ({name})")


# Buckets are cut for 32-64 points each (bisecting ~40 points beats bisecting all, and
# a change copies little) and re-cut when changes leave them at fewer than 8 or more
# than 128 on average.
_FILL, _MIN_FILL, _MAX_FILL = 32, 8, 128


def _shift_for(size: int) -> int:
    """Bucket shift for ``size`` points: 2**k buckets, k the largest with _FILL * 2**k <= size."""
    shift = 32
    while shift > 0 and size >= _FILL << (33 - shift):
        shift -= 1
    return shift


def _check_total(counts: Mapping[str, int], vnodes: int, existing: int = 0) -> None:
    total = existing + sum(counts.values())
    if total > MAX_POINTS:
        raise ConfigError(
            f"vnodes={vnodes} with weights {dict(counts)} gives {total} virtual nodes, "
            f"more than {MAX_POINTS}; weights are ratios (1.0 = normal), not capacities"
        )


def _check_capacity(capacity: object) -> Fraction:
    if isinstance(capacity, bool) or not isinstance(capacity, Real):
        raise ConfigError(
            f"capacity must be a number > 1, got {type(capacity).__name__}: {capacity!r}"
        )
    value = float(capacity)
    if math.isfinite(value):
        exact = Fraction(capacity) if isinstance(capacity, Rational) else _decimal(value)
        if exact > 1:
            return exact
    raise ConfigError(f"capacity must be finite and > 1, got {capacity!r}")


def _decimal(value: float) -> Fraction:
    # The decimal the user wrote, not the binary float: 1.1 means 11/10, so that
    # ceil(1.1 * 200) is 220 as on paper, not 221 from 1.1's binary excess.
    return Fraction(repr(value))


def _tie_order(key: Key) -> tuple[bytes, bool]:
    if isinstance(key, str):
        return (key.encode(), True)
    return (key, False)
