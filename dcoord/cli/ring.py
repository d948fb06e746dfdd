"""``dcoord ring``: show how a ring spreads keys, and what moves when a node joins or leaves.

No backend is involved: the ring is computed locally from ``--nodes``.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import TextIO

from dcoord.errors import ConfigError
from dcoord.ring import DEFAULT_VNODES, HashRing, Key

DEFAULT_SAMPLE = 100_000
BAR_WIDTH = 40


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``ring`` command."""
    p = subparsers.add_parser(
        "ring",
        help="show each node's share of keys on a consistent-hash ring",
        description=(
            "Build a ring from --nodes and print each node's share of a set of keys as a "
            "bar chart. With --add/--remove, also print how many keys move, against the "
            "ideal (the least any placement could move)."
        ),
    )
    p.add_argument(
        "--nodes",
        required=True,
        metavar="ID[=WEIGHT],...",
        help="comma-separated node ids, each optionally with a weight: a=2,b,c",
    )
    p.add_argument(
        "--vnodes",
        type=int,
        default=DEFAULT_VNODES,
        help=f"virtual nodes per unit of weight (default {DEFAULT_VNODES})",
    )
    keys = p.add_mutually_exclusive_group()
    keys.add_argument(
        "--keys",
        metavar="FILE",
        help="file with one key per line ('-' for stdin); blank lines are skipped",
    )
    keys.add_argument(
        "--sample",
        type=int,
        metavar="N",
        help=f"use N synthetic keys 'key:0'..'key:N-1' (default {DEFAULT_SAMPLE})",
    )
    p.add_argument("--add", metavar="ID[=WEIGHT]", help="node to add")
    p.add_argument("--remove", metavar="ID", help="node to remove")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run ``dcoord ring``; raises ConfigError (exit code 2 in main) on bad input."""
    out = out if out is not None else sys.stdout
    before = HashRing(parse_nodes(args.nodes), vnodes=args.vnodes)
    keys, source = _load_keys(args.keys, args.sample)

    steps: list[tuple[str, HashRing]] = []
    if args.remove is not None:
        steps.append((f"--remove {args.remove}", before.without_node(args.remove)))
    if args.add is not None:
        node, weight = _parse_node(args.add)
        base = steps[-1][1] if steps else before
        steps.append((f"--add {args.add}", base.with_node(node, weight)))

    owners = [before.node_for(k) for k in keys]
    print(
        f"ring: {len(before)} nodes, vnodes={before.vnodes}, {len(keys)} keys ({source})",
        file=out,
    )
    _chart(before, owners, out)
    if not steps:
        return 0

    # Each step is reported against its own ideal: a remove and an add in one go cannot
    # reach the ideal of a single swap, since the removed node's keys spread to all.
    first = owners
    ring = before
    moves: list[str] = []
    for label, nxt in steps:
        new = [nxt.node_for(k) for k in keys]
        moved = sum(1 for a, b in zip(owners, new, strict=True) if a != b)
        moves.append(
            _moved_line(label, moved, len(keys), ideal_moved_fraction(ring.nodes, nxt.nodes))
        )
        owners, ring = new, nxt
    print(f"\nafter {' '.join(label for label, _ in steps)}:", file=out)
    _chart(ring, owners, out)
    print(file=out)
    for line in moves:
        print(line, file=out)
    if len(steps) > 1:
        total = sum(1 for a, b in zip(first, owners, strict=True) if a != b)
        print(
            f"total: {total} of {len(keys)} keys changed node ({total / len(keys):.2%})", file=out
        )
    return 0


def _moved_line(label: str, moved: int, total: int, ideal: float) -> str:
    frac = moved / total
    return (
        f"moved by {label}: {moved} of {total} keys ({frac:.2%}); "
        f"ideal {ideal:.2%} (x{frac / ideal:.3f})"
    )


def parse_nodes(spec: str) -> dict[str, float]:
    """Parse ``"a=2,b,c"`` into ``{"a": 2.0, "b": 1.0, "c": 1.0}``."""
    nodes: dict[str, float] = {}
    for part in spec.split(","):
        node, weight = _parse_node(part)
        if node in nodes:
            raise ConfigError(f"duplicate node id {node!r} in --nodes {spec!r}")
        nodes[node] = weight
    return nodes


def _parse_node(part: str) -> tuple[str, float]:
    node, sep, raw = part.strip().partition("=")
    node = node.strip()
    if not node:
        raise ConfigError(f"empty node id in {part!r}")
    if not sep:
        return node, 1.0
    try:
        return node, float(raw)
    except ValueError:
        raise ConfigError(f"weight of node {node!r} is not a number: {raw!r}") from None


def ideal_moved_fraction(before: Mapping[str, float], after: Mapping[str, float]) -> float:
    """Least fraction of keys any placement must move between two weightings.

    It is the total variation distance between the ideal shares ``w / sum(w)``: for one
    node added it is that node's new share (1/(N+1) unweighted); for one removed, its
    old share (1/N).
    """
    tb, ta = sum(before.values()), sum(after.values())
    return sum(
        max(0.0, after.get(n, 0.0) / ta - before.get(n, 0.0) / tb) for n in {*before, *after}
    )


def _load_keys(path: str | None, sample: int | None) -> tuple[Sequence[Key], str]:
    if path is None:
        n = DEFAULT_SAMPLE if sample is None else sample
        if n < 1:
            raise ConfigError(f"--sample must be >= 1, got {n}")
        return [f"key:{i}" for i in range(n)], "sample"
    # Keys are read as bytes, so any file works: a str key hashes as its UTF-8 bytes.
    try:
        if path == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read --keys {path!r}: {e.strerror}") from e
    keys = [line.rstrip(b"\r") for line in data.split(b"\n")]
    keys = [k for k in keys if k.strip()]
    if not keys:
        raise ConfigError(f"--keys {path!r} holds no keys")
    return keys, path


def _chart(ring: HashRing, owners: Iterable[str], out: TextIO) -> None:
    counts = Counter(owners)
    total = sum(counts.values())
    total_weight = sum(ring.nodes.values())
    shares = {n: counts[n] / total for n in ring.nodes}
    top = max(shares.values()) or 1.0
    width = max(4, *(len(n) for n in ring.nodes))
    print(
        f"  {'node':<{width}}  {'weight':>6}  {'keys':>9}  {'share':>7}  {'ideal':>7}",
        file=out,
    )
    for node, weight in ring.nodes.items():
        bar = "#" * round(BAR_WIDTH * shares[node] / top)
        print(
            f"  {node:<{width}}  {weight:>6g}  {counts[node]:>9}  {shares[node]:>7.2%}"
            f"  {weight / total_weight:>7.2%}  {bar}",
            file=out,
        )
    load = max(shares[n] / (w / total_weight) for n, w in ring.nodes.items())
    print(f"  max load / ideal: {load:.3f}", file=out)
