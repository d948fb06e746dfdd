"""Tiny SVG charts of the benches' JSON (no plotting dependency: the SVG is written here).

    python bench/plot.py twopc RUN.json OUT.svg      # python bench/twopc.py --json RUN.json
    python bench/plot.py ring SCALE.json OUT.svg     # python -m bench.scale --json SCALE.json
    python bench/plot.py follower SCALE.json OUT.svg
    python bench/plot.py curves CURVES.json OUT.svg  # python -m bench.scale --curves ... --json

``twopc``: commits/s (median of the runs) by backend x clients, null and kv participants,
beside the raw floor of two fsynced writes where the run measured it (Redis). ``ring``:
HashRing build time vs nodes. ``follower``: a live ring follower's CPU per membership
change vs members, per backend and mode. ``curves``: three charts, one above the other,
of join rate, change-to-ring latency p50/p99 and follower CPU per change vs members, per
backend. Log-scale axes leave out values <= 0.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

W, H, LEFT, RIGHT, TOP, BOTTOM = 640, 360, 70, 170, 40, 50
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#7f7f7f", "#bcbd22")
RING_LABELS = {
    "uncached_ms": "from scratch",
    "cached_ms": "points cached",
    "with_node_ms": "with_node",
}
Series = dict[str, list[tuple[float, float]]]


def _el(tag: str, body: str = "", **attrs: object) -> str:
    """One SVG element; ``attrs`` with ``_`` for ``-`` (``text_anchor``)."""
    text = " ".join(f'{k.replace("_", "-")}="{v}"' for k, v in attrs.items())
    body = body.replace("&", "&amp;").replace("<", "&lt;")
    return f"<{tag} {text}>{body}</{tag}>" if body else f"<{tag} {text}/>"


def _frame(title: str, x_label: str, y_label: str, names: Sequence[str]) -> list[str]:
    """The SVG head, title, axis labels and the legend of ``names``."""
    mid = (TOP + H - BOTTOM) / 2
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        'font-family="sans-serif" font-size="11">',
        _el("rect", width=W, height=H, fill="white"),
        _el("text", title, x=W / 2, y=20, text_anchor="middle", font_size=14),
        _el("text", x_label, x=(LEFT + W - RIGHT) / 2, y=H - 10, text_anchor="middle"),
        _el("text", y_label, x=14, y=mid, text_anchor="middle", transform=f"rotate(-90 14 {mid})"),
    ]
    for i, name in enumerate(names):
        y = TOP + 16 * i
        out.append(
            _el("rect", x=W - RIGHT + 12, y=y, width=10, height=10, fill=COLOURS[i % len(COLOURS)])
        )
        out.append(_el("text", name, x=W - RIGHT + 26, y=y + 9))
    return out


def _axis(
    lo: float, hi: float, log: bool, a: float, b: float
) -> tuple[list[float], Callable[[float], float]]:
    """Round ticks covering [lo, hi] and the map from a value to pixels [a, b]."""
    if log:
        ticks = [10.0**e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)]
    else:
        step = 10 ** math.floor(math.log10((hi - lo) or 1.0))
        step /= 2 if (hi - lo) / step < 4 else 1
        ticks = [step * k for k in range(math.floor(lo / step), math.ceil(hi / step) + 1)]
    f: Callable[[float], float] = math.log10 if log else float
    span = (f(ticks[-1]) - f(ticks[0])) or 1.0
    return ticks, lambda v: a + (f(v) - f(ticks[0])) / span * (b - a)


def _grid(ticks: list[float], sy: Callable[[float], float]) -> list[str]:
    out = []
    for t in ticks:
        out.append(
            _el("line", x1=LEFT, x2=W - RIGHT, y1=f"{sy(t):.1f}", y2=f"{sy(t):.1f}", stroke="#ddd")
        )
        out.append(_el("text", f"{t:g}", x=LEFT - 4, y=f"{sy(t) + 4:.1f}", text_anchor="end"))
    return out


def line_chart(title: str, x_label: str, y_label: str, series: Series, *, log: bool) -> str:
    """One polyline per series; both axes log10 with ``log``."""
    if log:
        series = {k: [(x, y) for x, y in pts if x > 0 and y > 0] for k, pts in series.items()}
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    xt, sx = _axis(min(xs), max(xs), log, LEFT, W - RIGHT)
    yt, sy = _axis(min(ys) if log else 0.0, max(ys), log, H - BOTTOM, TOP)
    out = [*_frame(title, x_label, y_label, list(series)), *_grid(yt, sy)]
    out.extend(_el("text", f"{t:g}", x=sx(t), y=H - BOTTOM + 14, text_anchor="middle") for t in xt)
    for i, pts in enumerate(series.values()):
        colour = COLOURS[i % len(COLOURS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in sorted(pts))
        out.append(_el("polyline", points=path, fill="none", stroke=colour, stroke_width=2))
        out.extend(
            _el("circle", cx=f"{sx(x):.1f}", cy=f"{sy(y):.1f}", r=3, fill=colour) for x, y in pts
        )
    return "\n".join([*out, "</svg>\n"])


def bar_chart(
    title: str, y_label: str, groups: Sequence[str], series: dict[str, list[float | None]]
) -> str:
    """Grouped bars on a log10 axis (the backends differ by 10-100x): per group one bar per
    series (None: not measured), its value on top; a group label's ``/`` breaks a line."""
    values = [v for vs in series.values() for v in vs if v is not None and v > 0]
    yt, sy = _axis(min(values), max(values), True, H - BOTTOM, TOP)
    out = [*_frame(title, "", y_label, list(series)), *_grid(yt, sy)]
    slot = (W - RIGHT - LEFT) / len(groups)
    bar = slot * 0.8 / len(series)
    for g, group in enumerate(groups):
        for k, line in enumerate(group.split("/")):
            x = LEFT + slot * (g + 0.5)
            out.append(_el("text", line, x=x, y=H - BOTTOM + 14 + 12 * k, text_anchor="middle"))
        for i, column in enumerate(series.values()):
            value = column[g]
            if value is None or value <= 0:
                continue
            x, y = LEFT + slot * (g + 0.1) + bar * i, sy(value)
            box = {"x": f"{x:.1f}", "y": f"{y:.1f}", "width": f"{bar:.1f}"}
            colour = COLOURS[i % len(COLOURS)]
            out.append(_el("rect", **box, height=f"{H - BOTTOM - y:.1f}", fill=colour))
            label = {"x": f"{x + bar / 2:.1f}", "y": f"{y - 3:.1f}", "font_size": 9}
            out.append(_el("text", f"{value:.0f}", **label, text_anchor="middle"))
    return "\n".join([*out, "</svg>\n"])


def twopc(doc: dict[str, Any]) -> str:
    """Bars of bench/twopc.py's rows: null and kv commits/s and the raw floor."""
    rates = {
        (r["backend"], r["kind"], r["clients"], r["code"]): statistics.median(
            x["rate"] for x in r["runs"]
        )
        for r in doc["rows"]
        if r.get("runs")
    }
    order = ("memory", "redis", "etcd")
    groups = sorted({(b, c) for b, _, c, _ in rates}, key=lambda g: (order.index(g[0]), g[1]))
    kinds = (
        ("null", "null", "this"),
        ("kv", "kv", "this"),
        ("floor: 2 fsynced SETs", "null", "floor"),
    )
    series = {
        label: [rates.get((b, kind, c, code)) for b, c in groups] for label, kind, code in kinds
    }
    series = {k: v for k, v in series.items() if any(x is not None for x in v)}
    labels = [f"{b}/{c} client{'s' if c > 1 else ''}" for b, c in groups]
    return bar_chart(
        "2PC commits/s, 3 participants (median of runs)", "commits/s (log scale)", labels, series
    )


def curves(doc: dict[str, Any]) -> str:
    """bench/scale.py --curves rows as three line charts stacked in one SVG."""
    charts = (
        ("Join rate, one client", "joins/s", ("join_per_s",)),
        ("Change to ring in another process", "ms", ("latency_p50_ms", "latency_p99_ms")),
        ("Follower CPU per change (rolling restart)", "ms of CPU", ("cpu_ms_per_change",)),
    )
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H * len(charts)}">']
    for i, (title, unit, keys) in enumerate(charts):
        series: Series = {}
        for r in doc["curves"]:
            for key in keys:
                label = r["backend"] + (f" {key.split('_')[1]}" if len(keys) > 1 else "")
                series.setdefault(label, []).append((r["members"], r[key]))
        # A chart is a whole <svg>: nested, each is placed by its y.
        out.append(
            line_chart(title, "members", unit, series, log=True).replace(
                "<svg ", f'<svg y="{H * i}" ', 1
            )
        )
    return "\n".join([*out, "</svg>\n"])


def main(argv: list[str]) -> None:
    kind, source, target = argv
    doc = json.loads(Path(source).read_text())
    if kind == "twopc":
        svg = twopc(doc)
    elif kind == "curves":
        svg = curves(doc)
    elif kind == "ring":
        series: Series = {}
        for row in doc["builds"]:
            for key, value in row.items():
                if key != "nodes" and value is not None:
                    label = RING_LABELS.get(key, key)
                    series.setdefault(label, []).append((row["nodes"], value))
        svg = line_chart("HashRing build, 160 vnodes per node", "nodes", "ms", series, log=True)
    else:
        follow: Series = {}
        for r in doc["followers"]:
            follow.setdefault(f"{r['backend']} {r['mode']}", []).append(
                (r["members"], r["ms_per_change"])
            )
        svg = line_chart(
            "Live ring follower: CPU per membership change",
            "members",
            "ms of CPU per change",
            follow,
            log=True,
        )
    Path(target).write_text(svg)


if __name__ == "__main__":
    main(sys.argv[1:])
