"""``dcoord ring``: show how a ring spreads keys, and what moves when a node joins or leaves.

No backend is involved: the ring is computed locally from ``--nodes``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

from dcoord.errors import ConfigError
from dcoord.ring import DEFAULT_VNODES, HashRing, Key

from .common import global_options

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
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: shares before (and after), keys moved per change",
    )
    global_options(p, backend=False)
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
    result: dict[str, Any] = {
        "vnodes": before.vnodes,
        "keys": len(keys),
        "source": source,
        "before": _shares(before, owners),
    }
    # Each step is reported against its own ideal: a remove and an add in one go cannot
    # reach the ideal of a single swap, since the removed node's keys spread to all.
    first = owners
    ring = before
    moves: list[dict[str, Any]] = []
    for label, nxt in steps:
        new = [nxt.node_for(k) for k in keys]
        moved = sum(1 for a, b in zip(owners, new, strict=True) if a != b)
        ideal = ideal_moved_fraction(ring.nodes, nxt.nodes)
        moves.append(
            {"change": label, "moved": moved, "fraction": moved / len(keys), "ideal": ideal}
        )
        owners, ring = new, nxt
    if steps:
        result["after"] = _shares(ring, owners)
        result["moves"] = moves
        result["total_moved"] = sum(1 for a, b in zip(first, owners, strict=True) if a != b)
    if args.json:
        print(json.dumps(result, sort_keys=True), file=out)
    else:
        _text(result, len(before), out)
    return 0


def _text(result: Mapping[str, Any], nodes: int, out: TextIO) -> None:
    total = result["keys"]
    print(
        f"ring: {nodes} nodes, vnodes={result['vnodes']}, {total} keys ({result['source']})",
        file=out,
    )
    _chart(result["before"], out)
    moves = result.get("moves")
    if not moves:
        return
    print(f"\nafter {' '.join(move['change'] for move in moves)}:", file=out)
    _chart(result["after"], out)
    print(file=out)
    for move in moves:
        print(
            f"moved by {move['change']}: {move['moved']} of {total} keys "
            f"({move['fraction']:.2%}); ideal {move['ideal']:.2%} "
            f"(x{move['fraction'] / move['ideal']:.3f})",
            file=out,
        )
    if len(moves) > 1:
        moved = result["total_moved"]
        print(f"total: {moved} of {total} keys changed node ({moved / total:.2%})", file=out)


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


def _shares(ring: HashRing, owners: Iterable[str]) -> dict[str, Any]:
    """Each node's weight, keys, share and ideal share, and the max load / ideal."""
    counts = Counter(owners)
    total = sum(counts.values())
    total_weight = sum(ring.nodes.values())
    nodes: list[dict[str, Any]] = [
        {
            "node": node,
            "weight": weight,
            "keys": counts[node],
            "share": counts[node] / total,
            "ideal": weight / total_weight,
        }
        for node, weight in ring.nodes.items()
    ]
    return {"nodes": nodes, "max_load": max(n["share"] / n["ideal"] for n in nodes)}


def _chart(shares: Mapping[str, Any], out: TextIO) -> None:
    nodes = shares["nodes"]
    top = max(n["share"] for n in nodes) or 1.0
    width = max(4, *(len(n["node"]) for n in nodes))
    print(
        f"  {'node':<{width}}  {'weight':>6}  {'keys':>9}  {'share':>7}  {'ideal':>7}",
        file=out,
    )
    for n in nodes:
        bar = "#" * round(BAR_WIDTH * n["share"] / top)
        print(
            f"  {n['node']:<{width}}  {n['weight']:>6g}  {n['keys']:>9}  {n['share']:>7.2%}"
            f"  {n['ideal']:>7.2%}  {bar}",
            file=out,
        )
    print(f"  max load / ideal: {shares['max_load']:.3f}", file=out)
