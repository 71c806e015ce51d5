"""The result of a comparison: `Comparison` (one row per variant, the runs, the loss curves) and its HTML/SVG."""

from __future__ import annotations

import re
from html import escape

# matplotlib's tab10, as ui.chart uses: the curves look like the user's own plots
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
FIRST_COLUMNS = ("variant", "method", "family", "trainable_params", "trainable_pct", "peak_memory_gb", "train_time_s",
                 "steps", "train_rows", "status", "train_loss")  # fmt: skip


# ---------------------------------------------------------------- the result


class Comparison:
    """The results of a comparison.

    Attributes:
        name: Its name (the notebook variable of ``%%peft_compare NAME``).
        variants: The `Variant`s, in training order.
        rows: One dict per variant (what `.table` shows).
        runs: ``{label: Run}`` with each variant's config, history, metrics and state (model released unless
            ``keep_models``); None for a variant that failed or was skipped.
        errors: ``{label: exception}`` of the variants that failed.
    """

    def __init__(self, name, variants):
        self.name, self.variants = name, list(variants)
        self.rows: list[dict] = []
        self.runs: dict = {}
        self.errors: dict = {}

    def _add(self, variant, run, row) -> None:
        self.runs[variant.label] = run
        self.rows.append(row)

    @property
    def table(self):
        """A pandas DataFrame, one row per variant; hook columns come after the standard ones."""
        import pandas as pd

        keys = column_order(self.rows)
        return pd.DataFrame([{k: r.get(k) for k in keys} for r in self.rows], columns=keys)

    def histories(self) -> dict:
        """``{label: history rows}`` of the variants that trained."""
        return {label: run.history for label, run in self.runs.items() if run is not None}

    def best(self, metric: str = "eval_loss", mode: str | None = None) -> str | None:
        """Label of the best variant by a table column (lowest for losses/perplexity/time, else highest)."""
        mode = mode or ("min" if re.search(r"loss|perplexity|ppl|time|memory", metric) else "max")
        scored = [(r[metric], r["variant"]) for r in self.rows if isinstance(r.get(metric), (int, float))]
        if not scored:
            return None
        return (min if mode == "min" else max)(scored)[1]

    def plot_svg(self, metric: str = "loss", width: int = 560, height: int = 240, smoothing: float = 0.6) -> str:
        """Overlaid curves of `metric` (a history key: ``loss``, ``eval_loss``, ``eval_accuracy``...), one per
        variant, as an SVG string."""
        series = {}
        for label, history in self.histories().items():
            points = [(r["step"], r[metric]) for r in history if isinstance(r.get(metric), (int, float)) and "step" in r]
            if points:
                series[label] = points
        return curves_svg(series, title=metric.replace("_", " "), width=width, height=height,
                          smoothing=smoothing if metric == "loss" else 0.0)  # fmt: skip

    def tradeoff_svg(self, metric: str | None = None, width: int = 560, height: int = 300) -> str:
        """Task metric against forgetting (the loss change on general text), one point per variant, as an SVG
        string; needs ``data.forgetting`` (see `peft_magic.training.forgetting`). `metric` defaults to eval F1 /
        accuracy for classifiers, the eval loss for language models."""
        from ..ui.scatter import tradeoff_svg

        return tradeoff_svg(self.rows, metric, width, height)

    def size_svg(self, metric: str | None = None, width: int = 560, height: int = 300) -> str:
        """Task metric against the training rows, one line per method (a ``train_samples`` sweep), as SVG."""
        from ..ui.scatter import size_svg

        return size_svg(self.rows, metric, width, height)

    def text(self) -> str:
        if not self.rows:
            return f"Comparison '{self.name}': nothing ran"
        return f"Comparison '{self.name}' ({len(self.rows)} variants)\n" + self.table.to_string(index=False)

    def __repr__(self) -> str:
        return self.text()

    def _repr_pretty_(self, p, cycle):
        p.text(self.text())

    def _repr_html_(self) -> str:
        from ..ui.summary import svg_data_uri

        img = f'<img src="{svg_data_uri(self.plot_svg())}" alt="loss curves"/>' if self.histories() else ""
        img += self._pictures_html()
        return (f'<div class="peft-comparison"><div style="font-weight:bold">{escape(self.name)}: '
                f"{len(self.rows)} variants</div>{table_html(self.rows)}{img}</div>")  # fmt: skip


    def _pictures_html(self) -> str:
        from ..ui.scatter import has_sizes
        from ..ui.summary import svg_data_uri

        out = ""
        if any("forgetting_loss_delta" in r for r in self.rows):
            out += f'<img src="{svg_data_uri(self.tradeoff_svg())}" alt="task metric vs forgetting"/>'
        if has_sizes(self.rows):
            out += f'<img src="{svg_data_uri(self.size_svg())}" alt="task metric vs training-set size"/>'
        return out


def column_order(rows) -> list:
    """The standard columns first (those present), then every other key in the order it first appears."""
    keys = [k for k in FIRST_COLUMNS if any(k in r for r in rows)]
    for row in rows:
        keys += [k for k in row if k not in keys]
    return keys


def table_html(rows) -> str:
    """The comparison table as plain HTML (numbers formatted for reading, not for copying)."""
    from ..ui.format import format_count, format_duration, format_number

    if not rows:
        return ""
    keys = column_order(rows)
    cell = 'style="padding:2px 8px;border-bottom:1px solid #eee;text-align:right"'

    def fmt(key, value):
        if value is None:
            return ""
        if key == "trainable_params":
            return format_count(value)
        if key == "trainable_pct":
            return f"{value:.3g}%"
        if key == "train_time_s":
            return format_duration(value)
        if key == "peak_memory_gb":
            return f"{value:.2f} GB"
        if key == "forgetting_loss_delta":
            return f"{value:+.3g}"
        if key == "forgetting_ppl_ratio":
            return f"×{value:.3g}"
        return format_number(value) if isinstance(value, float) else str(value)

    head = "".join(f"<th {cell}>{escape(k.replace('_', ' '))}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td {cell}>{escape(fmt(k, r.get(k)))}</td>" for k in keys) + "</tr>" for r in rows)
    return f'<table class="peft-compare" style="border-collapse:collapse;font-size:12px"><tr>{head}</tr>{body}</table>'


def curves_svg(series: dict, *, title="loss", width=560, height=240, smoothing=0.6) -> str:
    """SVG of several ``(step, value)`` curves on shared axes with a legend (pure string, like `ui.chart`).

    Args:
        series: ``{label: [(step, value), ...]}``, drawn in order with matplotlib's tab10 colours.
        title: Drawn in the top-left corner.
        width, height: Size in pixels; the legend takes a column on the right.
        smoothing: EMA weight applied to each curve (0: raw values).
    """
    from ..ui.chart import AXIS_COLOR, FONT, downsample, ema, nice_ticks

    series = {k: [(float(x), float(y)) for x, y in v if _finite(x) and _finite(y)] for k, v in series.items()}
    series = {k: v for k, v in series.items() if v}
    legend_w = min(220, 12 + 6 * max((len(k) for k in series), default=0)) if series else 0
    left, top, bottom = 46, 16, 30
    height = max(height, top + 14 * len(series) + bottom)  # room for every legend entry
    plot_w, plot_h = max(width - left - legend_w - 16, 40), max(height - top - bottom, 40)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} '
             f'{height}" class="peft-compare-chart" role="img" aria-label="{escape(title)} curves">',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="{AXIS_COLOR}" '
             'stroke-width="0.5"/>', f'<text x="{left}" y="{top - 4}" {FONT} fill="#444">{escape(title)}</text>']  # fmt: skip
    if not series:
        parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h / 2:.1f}" {FONT} fill="{AXIS_COLOR}" '
                     'text-anchor="middle">no curves yet</text></svg>')  # fmt: skip
        return "".join(parts)
    from ..ui.chart import axis_ranges

    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    (x_lo, x_hi), (y_lo, y_hi) = axis_ranges(xs, ys)

    def sx(x):
        return left + (x - x_lo) / (x_hi - x_lo) * plot_w

    def sy(y):
        return top + (y_hi - y) / (y_hi - y_lo) * plot_h

    for t in nice_ticks(y_lo, y_hi):
        parts.append(f'<line x1="{left}" y1="{sy(t):.1f}" x2="{left + plot_w}" y2="{sy(t):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 4}" y="{sy(t) + 3:.1f}" {FONT} fill="{AXIS_COLOR}" text-anchor="end">{t:.4g}</text>')  # fmt: skip
    for t in nice_ticks(x_lo, x_hi):
        parts.append(f'<text x="{sx(t):.1f}" y="{top + plot_h + 12}" {FONT} fill="{AXIS_COLOR}" '
                     f'text-anchor="middle">{t:g}</text>')  # fmt: skip
    parts.append(f'<text x="{left + plot_w}" y="{height - 3}" {FONT} fill="{AXIS_COLOR}" text-anchor="end">step</text>')
    for i, (label, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        if smoothing:
            pts = list(zip([x for x, _ in pts], ema([y for _, y in pts], smoothing)))
        pts = downsample(pts, 400)
        if len(pts) == 1:
            parts.append(f'<circle cx="{sx(pts[0][0]):.1f}" cy="{sy(pts[0][1]):.1f}" r="2.5" fill="{color}"/>')
        else:
            line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            parts.append(f'<polyline class="curve" points="{line}" fill="none" stroke="{color}" stroke-width="1.8">'
                         f"<title>{escape(label)}</title></polyline>")  # fmt: skip
        ly = top + 10 + 14 * i
        lx = left + plot_w + 10
        short = label if len(label) <= 34 else label[:33] + "…"
        parts.append(f'<line x1="{lx}" y1="{ly - 3}" x2="{lx + 14}" y2="{ly - 3}" stroke="{color}" stroke-width="2"/>'
                     f'<text class="legend" x="{lx + 18}" y="{ly}" {FONT} fill="#444"><title>{escape(label)}</title>'
                     f"{escape(short)}</text>")  # fmt: skip
    parts.append("</svg>")
    return "".join(parts)


def _finite(v) -> bool:
    import math

    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
