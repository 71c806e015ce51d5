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

import time

from ..events import Callback
from .plan import check, plan_variants
from .result import Comparison

COLUMNS: list = []  # hooks fn(run, row) -> dict of extra columns, for every comparison (see register_column)


def register_column(fn):
    """Add a column hook to every comparison: ``fn(run, row) -> dict`` (merged into the variant's row).

    The hook runs after training and evaluation, before the model is released, so it may use ``run.model``
    (e.g. to measure forgetting on another dataset). Returns `fn`, so it works as a decorator.
    """
    COLUMNS.append(fn)
    return fn


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
    from ..session import check_idle

    check_idle("a comparison trains one variant at a time", key="compare")
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
