"""Compare methods and sweep hyperparameters: one base config, several variants, trained one after another.

    cmp = peft_magic.compare(cfg, methods=["lora", "ia3", {"name": "lora", "r": 16}],
                             sweep={"train.learning_rate": [1e-4, 3e-4]})
    cmp.table                       # one row per variant: method, trainable %, memory, time, final metrics
    cmp.runs["lora · learning_rate=0.0001"].history

or in a notebook, a ``%%peft_compare NAME`` cell whose YAML body is a training config plus ``compare:`` (a list of
method specs) and/or ``sweep:`` (dotted keys -> lists of values). Every variant's config is checked before the
first one trains; each variant's model is released once its row is recorded, so memory holds one model at a time.

Columns can be added without touching this file: `register_column(fn)` (for every comparison) or
``compare(..., columns=[fn])``, where ``fn(run, row) -> dict`` runs while the variant's model is still loaded.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from html import escape

from ..errors import ConfigError
from ..events import Callback

COLUMNS: list = []  # hooks fn(run, row) -> dict of extra columns, for every comparison (see register_column)
# matplotlib's tab10, as ui.chart uses: the curves look like the user's own plots
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
FIRST_COLUMNS = ("variant", "method", "family", "trainable_params", "trainable_pct", "peak_memory_gb", "train_time_s",
                 "steps", "train_rows", "status", "train_loss")  # fmt: skip
# sweep keys that are not config keys: `train_samples: [100, 1000, all]` is data.max_samples, with all = every row
SWEEP_ALIASES = {"train_samples": "data.max_samples"}


def register_column(fn):
    """Add a column hook to every comparison: ``fn(run, row) -> dict`` (merged into the variant's row).

    The hook runs after training and evaluation, before the model is released, so it may use ``run.model``
    (e.g. to measure forgetting on another dataset). Returns `fn`, so it works as a decorator.
    """
    COLUMNS.append(fn)
    return fn


class Variant:
    """One configuration to train: its label, what differs from the base config, and the full raw config."""

    def __init__(self, label: str, changes: dict, raw: dict):
        self.label, self.changes, self.raw = label, changes, raw

    def __repr__(self) -> str:
        return f"Variant({self.label!r})"


# ---------------------------------------------------------------- planning


def plan_variants(config=None, methods=None, sweep=None, overrides=None, defaults=None, name="compare") -> list[Variant]:
    """The variants of a comparison, without training: methods x the sweep grid.

    Args:
        config: The base config (dict, YAML text or file, `Config`); may hold ``compare:`` and ``sweep:`` keys.
        methods: Method specs to compare (a name, or a mapping ``{name: lora, r: 16}``), after ``compare:``.
        sweep: ``{dotted key: [values]}``, merged over ``sweep:``; the grid is every combination.
        overrides: ``["train.max_steps=10"]`` or a dict, applied to the base config.
        defaults: Values used where the config is silent (e.g. the `%peft_model` base model).
        name: The comparison's name (default output folders ``peft_runs/NAME/NN-variant``).
    """
    from ..session import default_output_dir
    from ..config.parse import deepcopy_plain, raw_config, set_dotted

    raw = raw_config(config, overrides or (), defaults)
    methods = [*_as_list(raw.pop("compare", None), "compare"), *_as_list(methods, "methods")]
    grid = {**_as_sweep(raw.pop("sweep", None)), **_as_sweep(sweep)}
    for m in methods:
        if not isinstance(m, (str, dict)) or (isinstance(m, dict) and not m.get("name")):
            raise ConfigError(f"each entry must be a method name or a mapping with `name`, got {m!r}. "
                              "Fix: e.g. `compare: [lora, ia3, {name: lora, r: 16}]`.", key="compare")  # fmt: skip
    out_root = (raw.get("train") or {}).get("output_dir") or default_output_dir(name)
    variants = []
    for m in methods or [None]:
        for values in itertools.product(*grid.values()):
            changes = ({"method": m} if m is not None else {}) | dict(zip(grid, values))
            variant_raw = deepcopy_plain(raw)
            for key, value in changes.items():
                set_dotted(variant_raw, *_sweep_target(key, deepcopy_plain(value)))
            variants.append(Variant(_label(changes, grid), changes, variant_raw))
    _dedupe_labels(variants)
    for i, v in enumerate(variants, 1):
        if not (v.changes.keys() & {"train.output_dir"}):
            set_dotted(v.raw, "train.output_dir", os.path.join(out_root, f"{i:02d}-{_slug(v.label)}"))
    return variants


def plan_text(variants, name="compare") -> str:
    """What ``%%peft_compare --dry-run`` prints: one line per variant with what it changes."""
    lines = [f"{len(variants)} variant{'s' if len(variants) != 1 else ''} for '{name}', trained one after another:"]
    for i, v in enumerate(variants, 1):
        changes = ", ".join(f"{k}={_text(val) if not isinstance(val, dict) else _label({'method': val}, {})}"
                            for k, val in v.changes.items()) or "the base config"  # fmt: skip
        lines.append(f"  {i:02d}  {v.label:<40}  {changes}")
    return "\n".join(lines)


def _as_list(value, key) -> list:
    if value is None:
        return []
    if isinstance(value, (str, dict)):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ConfigError(f"expected a list of method specs, got {type(value).__name__}.", key=key)


def _as_sweep(value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError("expected a mapping of dotted keys to lists of values, e.g. "
                          "`sweep: {train.learning_rate: [1e-4, 3e-4], method.r: [8, 16]}`.", key="sweep")  # fmt: skip
    out = {}
    for key, values in value.items():
        if not isinstance(key, str) or ("." not in key and key not in SWEEP_ALIASES):
            raise ConfigError(f"'{key}' is not a dotted key. Fix: name the section too, e.g. train.learning_rate "
                              "(or train_samples for the training-set size).", key="sweep")  # fmt: skip
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"needs a non-empty list of values, got {values!r}. Fix: e.g. `{key}: [{values!r}]`.",
                              key=f"sweep.{key}")  # fmt: skip
        out[key] = list(values)
    return out


def _sweep_target(key: str, value) -> tuple:
    """(config key, value) a sweep entry sets: aliases resolved (``train_samples: all`` -> data.max_samples null)."""
    if key == "train_samples":
        return SWEEP_ALIASES[key], None if value is None or str(value).strip().lower() == "all" else value
    return key, value


def _label(changes: dict, grid: dict) -> str:
    parts = []
    method = changes.get("method")
    if isinstance(method, str):
        parts.append(method)
    elif isinstance(method, dict):
        extra = [f"{k}={_text(v)}" for k, v in method.items() if k != "name"]
        parts.append(" ".join([str(method["name"]), *extra]))
    lasts = [k.rsplit(".", 1)[-1] for k in grid]
    for key in grid:
        last = key.rsplit(".", 1)[-1]
        parts.append(f"{last if lasts.count(last) == 1 else key}={_text(changes[key])}")
    return " · ".join(parts) or "base"


def _text(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(_text, value))
    return str(value)


def _dedupe_labels(variants) -> None:
    seen: dict = {}
    for v in variants:
        seen[v.label] = seen.get(v.label, 0) + 1
        if seen[v.label] > 1:
            v.label = f"{v.label} #{seen[v.label]}"


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", label).strip("_")[:60] or "variant"


def check(variants, name="compare") -> list:
    """Resolve and validate every variant's config before anything trains; a mistake names its variant."""
    from ..session import resolve_config

    configs = []
    for v in variants:
        try:
            configs.append(resolve_config(v.raw, name=name))
        except ConfigError as e:
            text = str(e)
            message = text[len(e.key) + 2:] if e.key and text.startswith(f"{e.key}: ") else text
            raise ConfigError(f"in variant '{v.label}': {message}", key=e.key) from None
    return configs


# ---------------------------------------------------------------- running


class _Measure(Callback):
    """Times the training loop (not the loading) and keeps the largest memory reading seen."""

    def __init__(self):
        self.begin = self.end = None
        self.peak = {}

    def on_train_begin(self, state):
        self.begin = time.perf_counter()

    def on_log(self, state, logs):
        for key, value in (state.memory or {}).items():
            if isinstance(value, (int, float)):
                self.peak[key] = max(self.peak.get(key, 0.0), value)

    def on_train_end(self, state):
        # the forgetting probe measures the tuned model just before (see forgetting.py): not training time
        self.end = time.perf_counter() - getattr(state, "_forgetting_seconds", 0.0)

    @property
    def seconds(self):
        return None if self.begin is None or self.end is None else self.end - self.begin


def compare(config=None, *, methods=None, sweep=None, namespace=None, name="compare", display="auto",
            callbacks=(), columns=(), overrides=None, defaults=None, keep_models=False) -> Comparison:  # fmt: skip
    """Train one config per variant (methods x sweep grid), one after another, and tabulate the results.

    Args:
        config: The base config (dict, YAML text or file, `Config`), optionally with ``compare:`` / ``sweep:``.
        methods: Method specs to compare, e.g. ``["lora", "ia3", {"name": "lora", "r": 16}]``.
        sweep: ``{"train.learning_rate": [1e-4, 3e-4], "method.r": [8, 16]}``: every combination is a variant.
        namespace: Where ``$name`` data references are looked up (the notebook's variables).
        name: The comparison's name (output folders ``peft_runs/NAME/NN-variant``).
        display: Passed to each `train` (``"auto"``: a panel per variant in a notebook; ``"none"``).
        callbacks: Extra event subscribers, given to every variant's run.
        columns: Extra column hooks ``fn(run, row) -> dict`` for this comparison (see `register_column`).
        overrides: ``["train.max_steps=10"]`` or a dict, applied to the base config.
        defaults: Values used where the config is silent.
        keep_models: Keep each variant's model in ``.runs`` (default: released once its row is recorded).

    Returns:
        A `Comparison` (``.table``, ``.runs``, ``.plot_svg()``); it shows the table and the curves in a notebook.

    Raises:
        ConfigError: For a mistake in any variant's config, before anything trains.
    """
    from ..session import BACKGROUND_RUNS

    if BACKGROUND_RUNS:
        raise ConfigError(f"run '{next(iter(BACKGROUND_RUNS)).name}' is still training in the background. Fix: `.stop()` or "
                          "`.wait()` it first; a comparison trains one variant at a time.", key="compare")  # fmt: skip
    variants = plan_variants(config, methods, sweep, overrides, defaults, name)
    configs = check(variants, name)
    result = Comparison(name, variants)
    for i, (variant, cfg) in enumerate(zip(variants, configs)):
        run = _train_variant(result, variant, cfg, namespace, f"{name}[{i}]", display, callbacks,
                             [*COLUMNS, *columns], keep_models)  # fmt: skip
        if run is not None and run.state.stop_reason == "interrupted":  # Ctrl-C / interrupt: stop the comparison
            for skipped in variants[i + 1:]:
                result._add(skipped, None, {"variant": skipped.label, "status": "skipped (interrupted)"})
            break
    return result


def _train_variant(result, variant, cfg, namespace, run_name, display, callbacks, columns, keep_models):
    from .. import api

    measure = _Measure()
    _reset_peak_memory()
    try:
        run = api.train(cfg, namespace=namespace, callbacks=[measure, *callbacks], name=run_name, display=display)
    except Exception as e:  # noqa: BLE001 - a variant that fails (out of memory, a method refusing the model)
        # must not lose the variants already trained, nor stop the ones after it; the error is kept
        result.errors[variant.label] = e
        result._add(variant, None, {"variant": variant.label, "method": _method_text(cfg), "status": f"failed: {e}"})
        return None
    row = _row(variant, cfg, run, measure)
    for hook in columns:
        row.update(hook(run, row) or {})
    result._add(variant, run, row)
    if not keep_models:
        run.release()
        run.data = None  # the tokenized sets too: a sweep over data sizes would otherwise keep every copy
    return run


def _method_text(cfg) -> str:
    from ..methods import method_label

    return method_label(cfg.method)


def _row(variant, cfg, run, measure) -> dict:
    s = run.state
    row = {
        "variant": variant.label,
        "method": _method_text(cfg),
        "family": getattr(run.method, "family", "?"),
        "trainable_params": s.trainable_params,
        "trainable_pct": 100.0 * s.trainable_params / s.total_params if s.total_params else None,
        "peak_memory_gb": _peak_memory(measure),
        "train_time_s": measure.seconds,
        "steps": s.step,
        "train_rows": run.data.train_rows if run.data is not None else None,
        "status": s.stop_reason or s.status,
        "train_loss": next((r["loss"] for r in reversed(run.history) if "loss" in r), None),
    }
    for key, value in variant.changes.items():
        if key != "method":
            row[key] = value
    for key, value in (run.metrics or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not key.startswith("forgetting_"):
            row[f"eval_{key}"] = value
    forgetting = _forgetting(run)  # loss change on general text (data.forgetting), after the task metrics
    if forgetting:
        row["forgetting_loss_delta"] = forgetting["forgetting_loss_delta"]
        row["forgetting_ppl_ratio"] = forgetting["forgetting_ppl_ratio"]
    return row


def _forgetting(run):
    from ..training.forgetting import last

    return last(run.history)


def _reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_memory(measure):
    """GPU: the allocator's peak during this variant. CPU: the largest process RSS seen at a log step."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1024**3
    return measure.peak.get("gpu_peak_gb") or measure.peak.get("rss_gb")


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
