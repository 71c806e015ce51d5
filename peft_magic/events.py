"""Training events: what the engine tells its subscribers (live panel, terminal printer, trackers).

The engine never imports a UI. It calls the hooks below on every subscriber that defines them; a
subscriber is any object with some of these methods (subclassing `Callback` is optional).

Hook order for one run::

    on_status("loading model") ... on_status("tokenizing") ...
    on_train_begin(state)
        on_step_end(state)            # every optimizer step (keep it cheap)
        on_log(state, logs)           # every `logging_steps`: logs = {"loss", "learning_rate", ...}
        on_evaluate(state, metrics)   # every `eval_steps` and at the end: metrics = {"eval_loss", ...}
        on_status("saving checkpoint")
    on_train_end(state)               # state.stop_reason says why: "completed", "stopped", "interrupted", "failed"

This module is light on purpose: no torch, no transformers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainState:
    """What a subscriber may read about the run in progress.

    Args:
        max_steps: Total optimizer steps planned.
        step: Optimizer steps completed so far.
        epoch: Fractional epoch reached (``step / steps_per_epoch``).
        start_time: ``time.time()`` when training began.
        samples_seen / tokens_seen: Training samples and non-padding tokens consumed so far.
        status: Short word for what the engine is doing (``training``, ``evaluating``, ``done``...).
        stop_reason: Set at the end: ``completed``, ``stopped``, ``interrupted`` or ``failed``.
        error: One-sentence message when ``status == "failed"``.
        title: One-line description of the run (model, quantization, method, trainable params).
        trainable_params / total_params: Parameter counts of the model being trained.
        learning_rate: Last learning rate used.
        lr_scheduler_type / warmup_steps: The schedule, for display.
        memory: Latest memory reading, e.g. ``{"rss_gb": 1.2}`` or ``{"gpu_gb": 5.1, "gpu_peak_gb": 5.6, "gpu_total_gb": 15}``.
        log_history: Every ``on_log``/``on_evaluate`` row so far (the same rows as ``Run.history``).
        checkpoint_dir: Latest saved checkpoint, if any.
        output_dir: Where the run writes its files.
        flops_per_token: Counted FLOPs of one training step per real token (`flops.probe`), None when not counted
            (several processes, a quantized base).
        peak_tflops: The GPU's dense 16-bit peak, for the model FLOPs utilisation; None off a known GPU.
        time_budget: `train.max_time` in seconds (None without one); start_step: the step this process began at
            (a resumed run's checkpoint step), so rates count this process's steps only.
        stop_note: Why a stop happened when no one asked for it (``train.max_time``).
        output_note: Where checkpoints go, when that is a persistent folder chosen by default (Drive, Kaggle).
        data_warning: What is wrong with the tokenized data (many rows cut by max_length, with the length that
            keeps 95% of them whole), as the dry run says it.
        details: What the libraries (transformers, peft, accelerate...) warned or logged while the run loaded and
            trained, one line each: kept out of the cell, shown collapsed under the panel (`library_output`).
    """

    max_steps: int = 0
    step: int = 0
    epoch: float = 0.0
    num_epochs: float = 0.0
    start_time: float = field(default_factory=time.time)
    samples_seen: int = 0
    tokens_seen: int = 0
    status: str = "starting"
    stop_reason: str | None = None
    error: str | None = None
    title: str = ""
    trainable_params: int = 0
    total_params: int = 0
    learning_rate: float | None = None
    lr_scheduler_type: str = ""
    warmup_steps: int = 0
    memory: dict[str, float] = field(default_factory=dict)
    log_history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint_dir: str | None = None
    flops_per_token: float | None = None
    peak_tflops: float | None = None
    output_dir: str | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)  # GRPO: the last few completions and rewards
    details: list[str] = field(default_factory=list)
    time_budget: float | None = None
    start_step: int = 0
    stop_note: str | None = None
    output_note: str | None = None
    data_warning: str | None = None

    @property
    def elapsed(self) -> float:
        return time.time() - self.start_time

    @property
    def eta(self) -> float | None:
        """Seconds left, from the mean time per step so far (None before the first step)."""
        done = self.step - self.start_step  # a resumed run's clock started at its checkpoint's step
        if done <= 0 or self.max_steps <= 0:
            return None
        return self.elapsed / done * max(self.max_steps - self.step, 0)


class Callback:
    """Base class for subscribers. Every hook is optional; override the ones you need."""

    def on_status(self, state: TrainState, status: str) -> None: ...

    def on_train_begin(self, state: TrainState) -> None: ...

    def on_step_end(self, state: TrainState) -> None: ...

    def on_log(self, state: TrainState, logs: dict[str, Any]) -> None: ...

    def on_evaluate(self, state: TrainState, metrics: dict[str, Any]) -> None: ...

    def on_train_end(self, state: TrainState) -> None: ...


# ---------------------------------------------------------------- figures derived from the state (engine and UI)


def budget_steps(state) -> int | None:
    """The step at which the time budget ends the run, when that comes before ``max_steps`` (None otherwise)."""
    budget = getattr(state, "time_budget", None)
    done = state.step - getattr(state, "start_step", 0)  # steps taken in this process, timed by state.elapsed
    if not budget or done <= 0 or state.max_steps <= 0 or state.elapsed <= 0:
        return None
    last = round(budget / (state.elapsed / done)) + getattr(state, "start_step", 0)
    return last if last < state.max_steps else None


def mfu(flops_per_token: float, tokens_per_second: float, peak: float | None) -> float | None:
    """Achieved useful FLOP/s over the peak (a fraction), or None without a known peak."""
    if not peak:
        return None
    return flops_per_token * tokens_per_second / (peak * 1e12)


class EventBus:
    """Fans an event out to every subscriber that defines the hook.

    A subscriber that raises is dropped with a warning: a broken display must never kill a training run.
    """

    def __init__(self, subscribers=()):
        self.subscribers = [s for s in subscribers if s is not None]

    def add(self, subscriber) -> None:
        self.subscribers.append(subscriber)

    def emit(self, hook: str, *args) -> None:
        for sub in list(self.subscribers):
            fn = getattr(sub, hook, None)
            if fn is None:
                continue
            try:
                fn(*args)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - a display bug must not stop training
                import warnings

                warnings.warn(f"peft_magic: subscriber {type(sub).__name__}.{hook} failed ({e!r}); it is detached.")
                self.subscribers.remove(sub)
