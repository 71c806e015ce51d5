"""Short texts about a run in progress, read off a `TrainState`: shared by the panel, summary and printer.

Pure functions of the state (and of ``time`` only through ``state.elapsed`` / ``state.eta``), so the live
panel and the terminal say exactly the same thing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .format import (
    MISSING,
    format_count,
    format_duration,
    format_lr,
    format_number,
    format_params,
    format_rate,
    metric_name,
)

# Trainer bookkeeping that is not a quality metric: left out of metric tables and lines.
_NOT_METRICS = {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_epoch"}


def header_text(state) -> str:
    """Title plus trainable parameters, without repeating them when the title already says so."""
    params = format_params(state.trainable_params, state.total_params)
    title = state.title or "training"
    if params and "trainable" not in title:
        return f"{title} · {params}"
    return title


def progress_text(state) -> str:
    """``412/1000 steps · epoch 1.6/4 · 03:12 elapsed · ~04:35 left``."""
    parts = [f"{state.step}/{state.max_steps or '?'} steps"]
    if state.num_epochs:
        if state.num_epochs >= 0.005:  # a few steps of a big dataset: the plan line says "<0.01 epochs"
            parts.append(f"epoch {state.epoch:.2f}/{round(state.num_epochs, 2):g}")
    elif state.epoch:
        parts.append(f"epoch {state.epoch:.2f}")
    parts.append(f"{format_duration(state.elapsed)} elapsed")
    if state.stop_reason is None:
        parts.append(f"~{format_duration(eta(state))} left" + budget_text(state))
    return " · ".join(parts)


def eta(state) -> float | None:
    """Seconds left: to max_steps, or to the end of the time budget (`train.max_time`) when that comes first."""
    from ..events import budget_steps

    if budget_steps(state) is None:
        return state.eta
    return max(state.time_budget - state.elapsed, 0.0)


def budget_text(state) -> str:
    """`` (train.max_time ends it near step 340/1000)`` when the time budget ends the run before max_steps."""
    from ..events import budget_steps

    last = budget_steps(state)
    return f" (train.max_time ends it near step {last}/{state.max_steps})" if last is not None else ""


def lr_text(state) -> str:
    """``1.6e-4 (linear, warmup done)``."""
    text = format_lr(state.learning_rate)
    notes = []
    if state.lr_scheduler_type:
        notes.append(state.lr_scheduler_type)
    if state.warmup_steps:
        notes.append("warmup done" if state.step >= state.warmup_steps else f"warmup {state.step}/{state.warmup_steps}")
    return f"{text} ({', '.join(notes)})" if notes and text != MISSING else text


def samples_per_second(state) -> float | None:
    """Mean training samples a second since the start (None before any time has passed)."""
    elapsed = state.elapsed
    return state.samples_seen / elapsed if elapsed > 0 and state.samples_seen else None


def tokens_per_second(state) -> float | None:
    """Mean non-padding tokens a second since the start."""
    elapsed = state.elapsed
    return state.tokens_seen / elapsed if elapsed > 0 and state.tokens_seen else None


def throughput_text(state) -> str:
    """``38.2 samples/s · 4.9k tokens/s · 61 TFLOP/s (MFU 31%)`` (tokens left out when the engine does not count
    them; FLOP/s when it counted the FLOPs of a step; MFU on a GPU with a known peak)."""
    text = format_rate(samples_per_second(state), "samples")
    tokens = tokens_per_second(state)
    if tokens:
        text += f" · {format_rate(tokens, 'tokens')}"
        flops = compute_text(getattr(state, "flops_per_token", None) or 0, tokens, getattr(state, "peak_tflops", None))
        if flops:
            text += f" · {flops}"
    return text


def compute_text(flops_per_token: float, tokens_per_second: float, peak_tflops: float | None = None) -> str:
    """``61 TFLOP/s (MFU 31%)``, ``53 GFLOP/s``; empty when no FLOPs were counted."""
    from ..events import mfu

    flops_per_second = flops_per_token * tokens_per_second
    if not flops_per_second:
        return ""
    scaled, unit = next(((flops_per_second / f, u) for f, u in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"))
                         if flops_per_second >= f), (flops_per_second, ""))  # fmt: skip
    text = f"{scaled:.3g} {unit}FLOP/s"
    if peak_tflops:
        text += f" (MFU {mfu(flops_per_token, tokens_per_second, peak_tflops):.0%})"
    return text


def metric_items(metrics: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``(key, value)`` pairs of the quality metrics in an eval row, loss first."""
    items = [(k, v) for k, v in metrics.items() if k.startswith("eval_") and k not in _NOT_METRICS]
    return sorted(items, key=lambda kv: kv[0] != "eval_loss")


def eval_text(metrics: Mapping[str, Any] | None, step: int | None = None) -> str:
    """``accuracy 0.87 · F1 0.86 (step 400)``; the loss only when it is the only metric."""
    if not metrics:
        return MISSING
    items = metric_items(metrics)
    shown = [(k, v) for k, v in items if k != "eval_loss"] or items
    text = " · ".join(f"{metric_name(k)} {format_number(v, 3)}" for k, v in shown) or MISSING
    return f"{text} (step {step})" if step is not None else text


def eval_rows(history: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The evaluation rows of a history (rows holding any ``eval_*`` metric)."""
    return [dict(row) for row in history if any(k.startswith("eval_") and k not in _NOT_METRICS for k in row)]


def last_value(history: Iterable[Mapping[str, Any]], key: str) -> Any:
    """The last value of ``key`` in the history rows, or None."""
    value = None
    for row in history:
        if key in row:
            value = row[key]
    return value


def forgetting_text(history: Iterable[Mapping[str, Any]] | None) -> str | None:
    """``3.69 base → 3.78 tuned (+0.084) · perplexity ×1.09``: the loss on general text before and after training,
    from the run's latest ``forgetting_*`` row (see `peft_magic.training.forgetting`); None when forgetting was not
    measured."""
    row = next((r for r in reversed(list(history or ())) if "forgetting_loss_delta" in r), None)
    if row is None:
        return None
    return (f"{format_number(row['forgetting_base_loss'], 3)} base → {format_number(row['forgetting_loss'], 3)} tuned "
            f"({row['forgetting_loss_delta']:+.2g}) · perplexity ×{format_number(row['forgetting_ppl_ratio'], 3)}")


def end_text(state) -> str:
    """How the run ended: ``completed 200/200 steps in 03:12`` / ``stopped at step 80/200 ...`` / ``failed: ...``."""
    reason = state.stop_reason or state.status
    steps = f"{state.step}/{state.max_steps or '?'}"
    took = format_duration(state.elapsed)
    if reason == "completed":
        return f"completed {steps} steps in {took}"
    if reason in ("stopped", "interrupted"):
        text = f"{reason} at step {steps} after {took}"
        if getattr(state, "stop_note", None):
            text += f": {state.stop_note}"
        if state.checkpoint_dir:
            text += f" · checkpoint in {state.checkpoint_dir}"
        return text
    if reason == "failed":
        return f"failed at step {steps}: {state.error or 'see the traceback'}"
    return f"{reason} at step {steps}"


def log_line(state, logs: Mapping[str, Any]) -> str:
    """The terminal's per-log line: ``step 20/200 · loss 2.31 · lr 1.6e-4 · 12.3 samples/s · ETA 01:10``."""
    parts = [f"step {logs.get('step', state.step)}/{state.max_steps or '?'}"]
    if "loss" in logs:
        parts.append(f"loss {format_number(logs['loss'], 3)}")
    lr = logs.get("learning_rate", state.learning_rate)
    if lr is not None:
        parts.append(f"lr {format_lr(lr)}")
    sps = samples_per_second(state)
    if sps:
        parts.append(format_rate(sps, "samples"))
    parts.append(f"ETA {format_duration(eta(state))}{budget_text(state)}")
    return " · ".join(parts)


def params_text(state) -> str:
    """``1.7M trainable (1.3%) of 135.0M`` or ``''``."""
    text = format_params(state.trainable_params, state.total_params)
    if text and state.total_params:
        text += f" of {format_count(state.total_params)}"
    return text
