"""Pure formatting helpers shared by the live panel, the static summary and the terminal printer.

Every function takes plain numbers (or None / NaN for "not known yet") and returns a short string; none of
them raises on odd input, because a display must never be the thing that breaks a run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# Shown wherever a value is not known yet (no step done, no eval run).
MISSING = "–"


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def format_duration(seconds: float | None) -> str:
    """Clock-style duration: ``03:12`` under an hour, ``1:02:03`` above.

    Args:
        seconds: Duration in seconds; None, NaN or negative gives ``--:--``.
    """
    if not _is_number(seconds) or seconds < 0:
        return "--:--"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes:02d}:{secs:02d}"


def format_count(n: float | None) -> str:
    """Human count with one decimal and a k/M/B/T suffix: ``950``, ``12.3k``, ``1.7M``, ``1.2B``.

    Args:
        n: The count; None or NaN gives ``–``.
    """
    if not _is_number(n):
        return MISSING
    sign = "-" if n < 0 else ""
    n = abs(n)
    if n < 1000:
        return f"{sign}{n:.0f}" if float(n).is_integer() else f"{sign}{n:.1f}"
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale * 0.9995:
            value = n / scale
            # 999,950 would round to "1000.0k": say "1.0M" instead.
            text = f"{value:.1f}"
            return f"{sign}{text}{suffix}"
    return f"{sign}{n:.0f}"  # pragma: no cover - unreachable, kept for clarity


def format_gb(gb: float | None, digits: int = 1) -> str:
    """A size already in GB (as ``TrainState.memory`` holds it): ``5.1 GB``.

    Args:
        gb: Gigabytes; None or NaN gives ``–``.
        digits: Decimals to show.
    """
    if not _is_number(gb):
        return MISSING
    return f"{gb:.{digits}f} GB"


def format_bytes(n: float | None) -> str:
    """A size in bytes with a binary-free, human unit: ``512 B``, ``3.4 MB``, ``1.2 GB``.

    Args:
        n: Bytes; None or NaN gives ``–``.
    """
    if not _is_number(n):
        return MISSING
    # Decimal units, the ones GPU dashboards and `nvidia-smi`-like tools are read against.
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def format_lr(lr: float | None) -> str:
    """Learning rate in short scientific notation: ``1.6e-4``, ``2e-5``, ``0``.

    Args:
        lr: The learning rate; None or NaN gives ``–``.
    """
    if not _is_number(lr):
        return MISSING
    if lr == 0:
        return "0"
    mantissa, exponent = f"{lr:.1e}".split("e")
    mantissa = mantissa.removesuffix(".0")
    return f"{mantissa}e{int(exponent)}"


def format_number(x: Any, digits: int = 4) -> str:
    """A metric value: floats to ``digits`` significant digits (``2.31``, ``0.8667``), ints as they are.

    Args:
        x: Any value; non-numbers are returned with ``str``; None and NaN give ``–``.
        digits: Significant digits for floats.
    """
    if x is None:
        return MISSING
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return MISSING
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return f"{x:.{digits}g}"
    return str(x)


def format_epochs(epochs: float | None) -> str:
    """``0.57 epochs``, ``1 epoch``, ``<0.01 epochs``: two decimals at most, never ``0`` for a run that trains."""
    if not _is_number(epochs) or epochs <= 0:
        return f"{MISSING} epochs"
    if epochs < 0.005:
        return "<0.01 epochs"
    value = round(epochs, 2)
    return f"{value:g} epoch{'' if value == 1 else 's'}"


def format_rate(value: float | None, unit: str) -> str:
    """A throughput: ``38.2 samples/s``, ``4.9k tokens/s``.

    Args:
        value: Items per second; None, NaN or non-positive gives ``–``.
        unit: The item name (``samples``, ``tokens``).
    """
    if not _is_number(value) or value <= 0:
        return f"{MISSING} {unit}/s"
    text = f"{value:.1f}" if value < 1000 else format_count(value)
    return f"{text} {unit}/s"


def format_params(trainable: int | None, total: int | None = None) -> str:
    """Trainable-parameter summary: ``1.7M trainable (1.3%)``; ``''`` when unknown.

    Args:
        trainable: Trainable parameter count.
        total: Total parameter count, for the percentage.
    """
    if not _is_number(trainable) or trainable <= 0:
        return ""
    text = f"{format_count(trainable)} trainable"
    if _is_number(total) and total > 0:
        pct = 100.0 * trainable / total
        text += f" ({pct:.2g}%)" if pct < 1 else f" ({pct:.1f}%)"
    return text


def format_memory(memory: Mapping[str, float] | None) -> str:
    """One memory reading: ``5.1 GB GPU (peak 5.6 / 15.0 GB)`` or ``1.2 GB RSS``; ``–`` when empty.

    Args:
        memory: A ``TrainState.memory`` dict (``gpu_gb``, ``gpu_peak_gb``, ``gpu_total_gb`` or ``rss_gb``).
    """
    memory = memory or {}
    gpu = memory.get("gpu_gb")
    if _is_number(gpu):
        text = f"{format_gb(gpu)} GPU"
        peak, total = memory.get("gpu_peak_gb"), memory.get("gpu_total_gb")
        if _is_number(peak) and _is_number(total):
            text += f" (peak {peak:.1f} / {total:.1f} GB)"
        elif _is_number(peak):
            text += f" (peak {peak:.1f} GB)"
        elif _is_number(total):
            text += f" (of {total:.1f} GB)"
        return text
    rss = memory.get("rss_gb")
    if _is_number(rss):
        return f"{format_gb(rss)} RSS"
    return MISSING


def metric_name(key: str) -> str:
    """Display name of a log key: ``eval_accuracy`` -> ``accuracy``, ``eval_f1`` -> ``F1``; a GRPO reward
    function keeps the name it has in the notebook: ``reward_is_correct`` -> ``reward is_correct``."""
    name = key.removeprefix("eval_")
    if name.startswith("reward_") and name != "reward_std":
        return "reward " + name[len("reward_"):]
    return {"f1": "F1", "mse": "MSE", "mae": "MAE", "rmse": "RMSE"}.get(name, name.replace("_", " "))


def build_title(
    model: str | None = None,
    quantization: str | None = None,
    method: str | None = None,
    trainable_params: int | None = None,
    total_params: int | None = None,
) -> str:
    """The panel's one-line title: ``SmolLM2-135M-Instruct · 4-bit NF4 · LoRA r=16 · 1.7M trainable (1.3%)``.

    Args:
        model: Model id or path; only its last path component is shown (the org adds nothing at a glance).
        quantization: e.g. ``4-bit NF4``; None or ``""`` for full precision.
        method: Method summary, e.g. ``LoRA r=16 on all-linear``.
        trainable_params: Trainable parameter count.
        total_params: Total parameter count, for the percentage.
    """
    parts = []
    if model:
        parts.append(str(model).rstrip("/").split("/")[-1])
    if quantization:
        parts.append(str(quantization))
    if method:
        parts.append(str(method))
    params = format_params(trainable_params, total_params)
    if params:
        parts.append(params)
    return " · ".join(parts)
