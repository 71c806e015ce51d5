"""Pure SVG rendering: the loss curve and the confusion matrix.

Plain strings, no matplotlib: the same SVG goes into the live panel (an ``ipywidgets.HTML``), the static
end-of-run summary and exported model cards, and it renders in every notebook front-end and in nbconvert.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from typing import Any

# Colours from matplotlib's default cycle, so the curves look familiar next to a user's own plots.
TRAIN_COLOR = "#1f77b4"
EVAL_COLOR = "#ff7f0e"
AXIS_COLOR = "#888"
FONT = 'font-family="sans-serif" font-size="10"'

Point = tuple[float, float]


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _clean(points: Iterable[Point]) -> list[Point]:
    """The finite ``(x, y)`` points, as floats (NaN, inf and non-numbers dropped)."""
    out = []
    for x, y in points:
        try:
            if math.isfinite(x) and math.isfinite(y):
                out.append((float(x), float(y)))
        except TypeError:
            continue
    return out


def series_from_history(history: Iterable[Mapping[str, Any]]) -> tuple[list[Point], list[Point]]:
    """Split history rows into ``(train, eval)`` lists of ``(step, loss)`` points.

    Rows without a finite ``loss`` / ``eval_loss`` are skipped (a NaN loss must not break the drawing; the
    status line is where a NaN is reported).

    Args:
        history: ``Run.history`` / ``TrainState.log_history`` rows, e.g. ``{"step": 10, "loss": 2.3}``.
    """
    train: list[Point] = []
    evals: list[Point] = []
    for row in history:
        step = row.get("step")
        if not _finite(step):
            continue
        if _finite(row.get("loss")):
            train.append((float(step), float(row["loss"])))
        if _finite(row.get("eval_loss")):
            evals.append((float(step), float(row["eval_loss"])))
    return train, evals


def ema(values: Sequence[float], smoothing: float = 0.6) -> list[float]:
    """Exponential moving average with TensorBoard's bias correction, so early points are not pulled to 0.

    Args:
        values: The raw series.
        smoothing: Weight of the past in ``[0, 1)``; 0 returns the series unchanged.
    """
    out: list[float] = []
    last, weight = 0.0, 1.0
    for v in values:
        last = last * smoothing + (1 - smoothing) * v
        weight *= smoothing
        out.append(last / (1 - weight) if weight < 1 else v)
    return out


def downsample(points: Sequence[Point], max_points: int) -> list[Point]:
    """Keep at most ``max_points`` points by averaging equal-sized buckets (a long run's SVG stays small).

    Args:
        points: ``(x, y)`` points in x order.
        max_points: The cap; the first and last points' x are kept exactly as bucket means allow.
    """
    n = len(points)
    if max_points <= 0 or n <= max_points:
        return list(points)
    out = []
    for i in range(max_points):
        lo, hi = i * n // max_points, (i + 1) * n // max_points
        bucket = points[lo:hi]
        out.append((sum(p[0] for p in bucket) / len(bucket), sum(p[1] for p in bucket) / len(bucket)))
    return out


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k steps) covering ``[lo, hi]``, about ``count`` of them.

    Args:
        lo: Lower bound of the axis.
        hi: Upper bound of the axis.
        count: Wanted number of intervals.
    """
    if not (_finite(lo) and _finite(hi)) or hi <= lo:
        return [lo] if _finite(lo) else []
    raw = (hi - lo) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    t = first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _tick_label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 10000:
        return f"{value / 1000:g}k"
    return f"{value:.4g}"


def _fmt(x: float) -> str:
    return f"{x:.1f}"


def axis_ranges(xs, ys):
    """((x_lo, x_hi), (y_lo, y_hi)) for a plot: x spans the data (widened when flat), y gets a 5% margin."""
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    y_lo, y_hi = min(ys), max(ys)
    pad = (y_hi - y_lo) * 0.05 if y_hi > y_lo else max(abs(y_hi) * 0.1, 0.5)
    return (x_lo, x_hi), (y_lo - pad, y_hi + pad)


def loss_chart_svg(
    train: Sequence[Point] = (),
    evals: Sequence[Point] = (),
    *,
    width: int = 360,
    height: int = 180,
    smoothing: float = 0.6,
    smooth: Sequence[Point] | None = None,
    max_points: int = 400,
    title: str = "loss",
) -> str:
    """SVG of the loss curve: raw train loss (faint), its smoothed line, and eval-loss points.

    Works with no points (an empty frame saying it is waiting), one point (drawn as a dot) and many (raw
    points beyond ``max_points`` are bucket-averaged). Non-finite values are skipped.

    Args:
        train: ``(step, loss)`` points of the training loss, in step order.
        evals: ``(step, eval_loss)`` points.
        width: Width in pixels.
        height: Height in pixels.
        smoothing: EMA weight for the smoothed line (see `ema`).
        smooth: The smoothed line, when already computed (see `CurveBuffer`); else computed from ``train``.
        max_points: Cap on drawn points per polyline.
        title: Label drawn in the top-left corner.
    """
    train, evals = _clean(train), _clean(evals)
    left, right, top, bottom = 46, 10, 16, 30
    plot_w, plot_h = max(width - left - right, 10), max(height - top - bottom, 10)
    parts = [
        (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" class="peft-loss-chart" role="img" aria-label="{escape(title)} curve">'
        ),
        (
            f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="{AXIS_COLOR}" '
            'stroke-width="0.5"/>'
        ),
        f'<text x="{left}" y="{top - 4}" {FONT} fill="#444">{escape(title)}</text>',
    ]
    if not train and not evals:
        parts.append(
            f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h / 2:.1f}" {FONT} fill="{AXIS_COLOR}" '
            'text-anchor="middle">waiting for the first loss…</text>'
        )
        parts.append("</svg>")
        return "".join(parts)

    xs = [p[0] for p in train] + [p[0] for p in evals]
    ys = [p[1] for p in train] + [p[1] for p in evals]
    (x_lo, x_hi), (y_lo, y_hi) = axis_ranges(xs, ys)

    kx, ky = plot_w / (x_hi - x_lo), plot_h / (y_hi - y_lo)

    def sx(x: float) -> float:
        return left + (x - x_lo) * kx

    def sy(y: float) -> float:
        return top + (y_hi - y) * ky

    def polyline(points: Sequence[Point]) -> str:
        # Inlined arithmetic: this runs on every live redraw, for every point.
        return " ".join([f"{left + (x - x_lo) * kx:.1f},{top + (y_hi - y) * ky:.1f}" for x, y in points])

    for t in nice_ticks(y_lo, y_hi):
        y = sy(t)
        parts.append(f'<line x1="{left}" y1="{_fmt(y)}" x2="{left + plot_w}" y2="{_fmt(y)}" stroke="#eee"/>')
        parts.append(
            f'<text x="{left - 4}" y="{_fmt(y + 3)}" {FONT} fill="{AXIS_COLOR}" text-anchor="end">'
            f"{_tick_label(t)}</text>"
        )
    for t in nice_ticks(x_lo, x_hi):
        x = sx(t)
        parts.append(
            f'<text x="{_fmt(x)}" y="{top + plot_h + 12}" {FONT} fill="{AXIS_COLOR}" text-anchor="middle">'
            f"{_tick_label(t)}</text>"
        )
    parts.append(f'<text x="{left + plot_w}" y="{height - 3}" {FONT} fill="{AXIS_COLOR}" text-anchor="end">step</text>')

    if len(train) == 1:
        x, y = train[0]
        parts.append(f'<circle class="train-raw" cx="{_fmt(sx(x))}" cy="{_fmt(sy(y))}" r="2.5" fill="{TRAIN_COLOR}"/>')
    elif train:
        raw = downsample(train, max_points)
        pts = polyline(raw)
        parts.append(
            f'<polyline class="train-raw" points="{pts}" fill="none" stroke="{TRAIN_COLOR}" '
            'stroke-opacity="0.3" stroke-width="1"/>'
        )
        if smooth is None:
            smooth = list(zip((x for x, _ in train), ema([y for _, y in train], smoothing)))
        pts = polyline(downsample(_clean(smooth), max_points))
        parts.append(
            f'<polyline class="train-smooth" points="{pts}" fill="none" stroke="{TRAIN_COLOR}" stroke-width="2"/>'
        )
    for x, y in evals:
        parts.append(
            f'<circle class="eval-point" cx="{_fmt(sx(x))}" cy="{_fmt(sy(y))}" r="3.5" fill="{EVAL_COLOR}">'
            f"<title>step {x:g}: eval loss {y:.4g}</title></circle>"
        )

    legend = [("train", TRAIN_COLOR)] if train else []
    legend += [("eval", EVAL_COLOR)] if evals else []
    lx = left + plot_w - 4
    for name, color in reversed(legend):
        parts.append(f'<text x="{lx}" y="{top - 4}" {FONT} fill="{color}" text-anchor="end">{name}</text>')
        lx -= 8 + 6 * len(name)
    parts.append("</svg>")
    return "".join(parts)


class CurveBuffer:
    """Train-loss points kept for live redraws at a bounded cost, however long the run.

    The smoothed value is updated as each point arrives. Points are kept in buckets of ``stride`` consecutive
    points (means of x, loss and smoothed loss); when ``2 * max_points`` buckets are full, adjacent pairs are
    merged and the stride doubles, so every bucket always covers the same number of points and a redraw never
    walks more than ``2 * max_points + 1`` of them (a 100k-step run logging every step would otherwise make
    each redraw slower than the step it reports).

    Args:
        max_points: Buckets kept after a merge.
        smoothing: EMA weight (see `ema`).
    """

    def __init__(self, max_points: int = 400, smoothing: float = 0.6):
        self.max_points = max(max_points, 2)
        self.smoothing = smoothing
        self.stride = 1
        self._buckets: list[tuple[float, float, float]] = []  # (mean step, mean loss, mean smoothed)
        self._pending = [0.0, 0.0, 0.0, 0]  # sums of the bucket being filled, and its count
        self._ema, self._weight = 0.0, 1.0

    def add(self, step: float, loss: float) -> None:
        """Append one finite point (others are ignored, as in `loss_chart_svg`)."""
        if not (_finite(step) and _finite(loss)):
            return
        self._ema = self._ema * self.smoothing + (1 - self.smoothing) * loss
        self._weight *= self.smoothing
        smooth = self._ema / (1 - self._weight) if self._weight < 1 else float(loss)
        p = self._pending
        p[0] += step
        p[1] += loss
        p[2] += smooth
        p[3] += 1
        if p[3] == self.stride:
            self._buckets.append((p[0] / p[3], p[1] / p[3], p[2] / p[3]))
            self._pending = [0.0, 0.0, 0.0, 0]
            if len(self._buckets) >= 2 * self.max_points:
                b = self._buckets
                self._buckets = [
                    tuple((u + v) / 2 for u, v in zip(b[i], b[i + 1], strict=True)) for i in range(0, len(b), 2)
                ]
                self.stride *= 2

    def _points(self) -> list[tuple[float, float, float]]:
        p = self._pending
        return self._buckets + ([(p[0] / p[3], p[1] / p[3], p[2] / p[3])] if p[3] else [])

    @property
    def raw(self) -> list[Point]:
        """``(step, loss)`` bucket means."""
        return [(x, y) for x, y, _ in self._points()]

    @property
    def smooth(self) -> list[Point]:
        """``(step, smoothed loss)`` bucket means."""
        return [(x, s) for x, _, s in self._points()]

    def __len__(self) -> int:
        return len(self._buckets) + (1 if self._pending[3] else 0)


def loss_chart_from_history(history: Iterable[Mapping[str, Any]], **kwargs: Any) -> str:
    """`loss_chart_svg` of ``Run.history`` / ``TrainState.log_history`` rows; kwargs as there."""
    train, evals = series_from_history(history)
    return loss_chart_svg(train, evals, **kwargs)


def _blend(intensity: float) -> str:
    """White to TRAIN_COLOR at ``intensity`` in [0, 1]."""
    target = (0x1F, 0x77, 0xB4)
    rgb = (round(255 + (c - 255) * intensity) for c in target)
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def confusion_matrix_svg(
    matrix: Sequence[Sequence[float]],
    labels: Sequence[Any],
    *,
    cell: int | None = None,
    normalize: bool = True,
) -> str:
    """SVG of a confusion matrix: rows are true labels, columns predicted; counts written in the cells.

    Cells are shaded by the row-normalised value (recall per class) so a rare class reads as clearly as a
    common one; the count stays the number written. Very many labels shrink the cells and drop the numbers.

    Args:
        matrix: Square ``n x n`` counts (nested lists or a numpy array), ``matrix[true][predicted]``.
        labels: The ``n`` class names, in matrix order.
        cell: Cell size in pixels; default fits about 360 pixels.
        normalize: Shade by row share (True) or by share of the largest cell (False).

    Raises:
        ValueError: If the matrix is not square or does not match ``labels``.
    """
    rows = [[float(v) for v in row] for row in matrix]
    n = len(labels)
    if len(rows) != n or any(len(r) != n for r in rows):
        raise ValueError(f"confusion matrix must be {n}x{n} to match {n} labels, got {len(rows)} rows")
    if n == 0:
        return '<svg xmlns="http://www.w3.org/2000/svg" width="0" height="0"></svg>'
    cell = cell or max(8, min(40, 360 // n))
    names = [str(label) for label in labels]
    short = [name if len(name) <= 12 else name[:11] + "…" for name in names]
    margin = min(12, max(len(s) for s in short)) * 6 + 18
    top = 32
    size = cell * n
    width, height = margin + size + 8, top + size + 8
    vmax = max((v for r in rows for v in r if _finite(v)), default=0.0) or 1.0
    parts = [
        (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" class="peft-confusion-matrix" role="img" aria-label="confusion matrix">'
        ),
        f'<text x="{margin + size / 2:.1f}" y="10" {FONT} fill="#444" text-anchor="middle">predicted</text>',
        f'<text x="4" y="{top - 6}" {FONT} fill="#444">true</text>',
    ]
    show_numbers = cell >= 18
    for j, label in enumerate(short):
        if cell >= 10:
            parts.append(
                f'<text x="{margin + j * cell + cell / 2:.1f}" y="{top - 6}" {FONT} fill="{AXIS_COLOR}" '
                f'text-anchor="middle"><title>{escape(names[j])}</title>{escape(label[: max(1, cell // 6)])}</text>'
            )
    for i, row in enumerate(rows):
        total = sum(v for v in row if _finite(v))
        y = top + i * cell
        parts.append(
            f'<text x="{margin - 4}" y="{y + cell / 2 + 3:.1f}" {FONT} fill="{AXIS_COLOR}" text-anchor="end">'
            f"<title>{escape(names[i])}</title>{escape(short[i])}</text>"
        )
        for j, v in enumerate(row):
            finite = _finite(v)
            share = (v / total if total else 0.0) if normalize else v / vmax
            share = min(max(share, 0.0), 1.0) if finite else 0.0
            x = margin + j * cell
            count = f"{v:g}" if finite else "?"
            parts.append(
                f'<rect class="cm-cell" x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{_blend(share)}" '
                f'stroke="#fff"><title>true {escape(names[i])}, predicted {escape(names[j])}: {count}</title></rect>'
            )
            if show_numbers:
                color = "#fff" if share > 0.5 else "#222"
                parts.append(
                    f'<text x="{x + cell / 2:.1f}" y="{y + cell / 2 + 3:.1f}" {FONT} fill="{color}" '
                    f'text-anchor="middle">{count}</text>'
                )
    parts.append("</svg>")
    return "".join(parts)
