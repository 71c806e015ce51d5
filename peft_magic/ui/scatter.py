"""Comparison pictures: the task metric against forgetting (one point per variant) and against the training-set
size (one line per method). Pure SVG strings, like `ui.chart`; `Comparison` shows them as images.

    tradeoff_svg(rows)   # x: change of the loss on general text (right: forgot more), y: task metric
    size_svg(rows)       # x: training rows (log scale), y: task metric, one line per method
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from .chart import AXIS_COLOR, FONT, nice_ticks

# matplotlib's tab10, as ui.chart and compare use
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
# the columns that say how well a variant does its task, best first; the losses are "lower is better"
TASK_METRICS = ("eval_f1", "eval_accuracy", "eval_loss", "eval_perplexity", "train_loss")
FORGETTING = "forgetting_loss_delta"


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def task_metric(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """The column that says how well each variant does its task: F1 or accuracy for classifiers, the eval loss
    (or perplexity) for language models, else the final training loss; None when no row has any."""
    return next((k for k in TASK_METRICS if any(_num(r.get(k)) for r in rows)), None)


def lower_is_better(metric: str) -> bool:
    return any(word in metric for word in ("loss", "perplexity", "ppl"))


def _metric_title(metric: str) -> str:
    name = metric.removeprefix("eval_").replace("_", " ")
    return f"{name} ({'lower' if lower_is_better(metric) else 'higher'} is better)"


def tradeoff_svg(rows: Sequence[Mapping[str, Any]], metric: str | None = None, width: int = 560,
                 height: int = 300) -> str:  # fmt: skip
    """Task metric (y) against forgetting (x: change of the loss on general text), one labelled point per variant,
    coloured by method.

    Args:
        rows: `Comparison.rows` (needs ``forgetting_loss_delta``; see `peft_magic.training.forgetting`).
        metric: The y column (default: `task_metric`).
        width, height: Size in pixels.
    """
    metric = metric or task_metric(rows) or "train_loss"
    groups: dict = {}
    for r in rows:
        if _num(r.get(FORGETTING)) and _num(r.get(metric)):
            groups.setdefault(str(r.get("method", "")), []).append(
                (r[FORGETTING], r[metric], str(r.get("variant", "")))
            )
    return xy_svg(groups, x_title="change of the loss on general text (right: forgot more)",
                  y_title=_metric_title(metric), title=f"{metric.removeprefix('eval_')} vs forgetting", width=width,
                  height=height, zero_x=True, connect=False)  # fmt: skip


def size_svg(rows: Sequence[Mapping[str, Any]], metric: str | None = None, width: int = 560,
             height: int = 300) -> str:  # fmt: skip
    """Task metric (y) against the number of training rows (x, log scale), one line per method: which method
    does better with little data (a ``train_samples`` sweep).

    Args:
        rows: `Comparison.rows` (uses ``train_rows`` and ``method``).
        metric: The y column (default: `task_metric`).
        width, height: Size in pixels.
    """
    metric = metric or task_metric(rows) or "train_loss"
    groups: dict = {}
    for r in rows:
        if _num(r.get("train_rows")) and r["train_rows"] > 0 and _num(r.get(metric)):
            groups.setdefault(str(r.get("method", "")), []).append((r["train_rows"], r[metric], ""))
    for points in groups.values():
        points.sort()
    return xy_svg(groups, x_title="training rows", y_title=_metric_title(metric),
                  title=f"{metric.removeprefix('eval_')} vs training-set size", width=width, height=height,
                  log_x=True, connect=True)  # fmt: skip


def has_sizes(rows: Sequence[Mapping[str, Any]]) -> bool:
    """Whether some method was trained on more than one training-set size (a size picture says something)."""
    sizes: dict = {}
    for r in rows:
        if _num(r.get("train_rows")):
            sizes.setdefault(r.get("method"), set()).add(r["train_rows"])
    return any(len(s) > 1 for s in sizes.values())


def xy_svg(groups: Mapping[str, list], *, x_title: str, y_title: str, title: str, width: int = 560, height: int = 300,
           log_x: bool = False, connect: bool = False, zero_x: bool = False) -> str:  # fmt: skip
    """Points ``{group: [(x, y, label), ...]}`` on shared axes, a colour per group, with a legend on the right.

    Args:
        groups: Points per group; a non-empty label is written beside its point.
        x_title, y_title: Axis titles.
        title: Drawn in the top-left corner.
        log_x: Logarithmic x axis (positive x only).
        connect: Join each group's points with a line, in the given order.
        zero_x: Draw a dashed vertical line at x = 0 (e.g. "no change").
    """
    groups = {g: [p for p in pts if not log_x or p[0] > 0] for g, pts in groups.items()}
    groups = {g: pts for g, pts in groups.items() if pts}
    legend_w = min(200, 12 + 6 * max((len(g) for g in groups), default=0)) if groups else 0
    left, top, bottom = 52, 18, 34
    height = max(height, top + 14 * len(groups) + bottom)
    plot_w, plot_h = max(width - left - legend_w - 16, 60), max(height - top - bottom, 60)
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'class="peft-compare-scatter" role="img" aria-label="{escape(title)}">'
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="{AXIS_COLOR}" '
        f'stroke-width="0.5"/><text x="{left}" y="{top - 5}" {FONT} fill="#444">{escape(title)}</text>'
    )
    parts = [head]
    if not groups:
        parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h / 2:.1f}" {FONT} fill="{AXIS_COLOR}" '
                     'text-anchor="middle">nothing to plot yet</text></svg>')  # fmt: skip
        return "".join(parts)
    fx = (lambda x: math.log10(x)) if log_x else (lambda x: x)
    xs = [fx(x) for pts in groups.values() for x, _, _ in pts] + ([0.0] if zero_x else [])
    ys = [y for pts in groups.values() for _, y, _ in pts]
    x_lo, x_hi = _padded(min(xs), max(xs))
    y_lo, y_hi = _padded(min(ys), max(ys))

    def sx(x):
        return left + (fx(x) - x_lo) / (x_hi - x_lo) * plot_w

    def sy(y):
        return top + (y_hi - y) / (y_hi - y_lo) * plot_h

    for t in nice_ticks(y_lo, y_hi):
        parts.append(f'<line x1="{left}" y1="{sy(t):.1f}" x2="{left + plot_w}" y2="{sy(t):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 4}" y="{sy(t) + 3:.1f}" {FONT} fill="{AXIS_COLOR}" text-anchor="end">{t:.4g}</text>')  # fmt: skip
    x_ticks = _log_ticks(x_lo, x_hi) if log_x else nice_ticks(x_lo, x_hi)
    for t in x_ticks:
        if x_lo <= fx(t) <= x_hi:
            parts.append(f'<text x="{sx(t):.1f}" y="{top + plot_h + 12}" {FONT} fill="{AXIS_COLOR}" '
                         f'text-anchor="middle">{t:g}</text>')  # fmt: skip
    if zero_x:
        parts.append(f'<line x1="{sx(0):.1f}" y1="{top}" x2="{sx(0):.1f}" y2="{top + plot_h}" stroke="{AXIS_COLOR}" '
                     'stroke-dasharray="3,3"/>')  # fmt: skip
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 4}" {FONT} fill="{AXIS_COLOR}" '
                 f'text-anchor="middle">{escape(x_title)}</text>'
                 f'<text x="10" y="{top + plot_h / 2:.1f}" {FONT} fill="{AXIS_COLOR}" text-anchor="middle" '
                 f'transform="rotate(-90 10 {top + plot_h / 2:.1f})">{escape(y_title)}</text>')  # fmt: skip
    for i, (group, pts) in enumerate(groups.items()):
        color = COLORS[i % len(COLORS)]
        if connect and len(pts) > 1:
            line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y, _ in pts)
            parts.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="1.6"/>')
        for x, y, label in pts:
            tip = escape(f"{label or group}: {y:.4g} at {x:.4g}")
            parts.append(f'<circle class="point" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{color}">'
                         f"<title>{tip}</title></circle>")  # fmt: skip
            if label:
                short = label if len(label) <= 24 else label[:23] + "…"
                parts.append(f'<text x="{sx(x) + 5:.1f}" y="{sy(y) - 5:.1f}" {FONT} fill="#444">{escape(short)}</text>')
        ly, lx = top + 10 + 14 * i, left + plot_w + 10
        short = group if len(group) <= 30 else group[:29] + "…"
        parts.append(f'<circle cx="{lx + 5}" cy="{ly - 3}" r="3.5" fill="{color}"/><text class="legend" x="{lx + 14}" '
                     f'y="{ly}" {FONT} fill="#444"><title>{escape(group)}</title>{escape(short)}</text>')  # fmt: skip
    parts.append("</svg>")
    return "".join(parts)


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks for a log axis spanning 10**lo..10**hi: 1-2-5 steps within a few decades, powers of ten beyond."""
    decades = range(math.floor(lo), math.ceil(hi) + 1)
    ticks = [m * 10**e for e in decades for m in (1, 2, 5) if lo <= math.log10(m * 10**e) <= hi]
    return ticks if len(ticks) <= 8 else [10**e for e in decades]


def _padded(lo: float, hi: float) -> tuple[float, float]:
    pad = (hi - lo) * 0.08 if hi > lo else max(abs(hi) * 0.1, 0.5)
    return lo - pad, hi + pad
