"""What a run does when the numbers or the memory give out: each guard turns the fault into one actionable
sentence and leaves the notebook usable (see docs/reliability.md).

- Non-finite loss: `LossGuard` adds every micro-batch loss on the device. With the fused AdamW (the default) and no
  fp16 loss scaling it never reads the device in a training step: a non-finite step loss sets the optimizer's
  `found_inf` flag on the device (the mechanism `torch.amp.GradScaler` uses), so the fused kernel skips that update
  and every later one, and the flag is read back only where the host reads anyway (logging, evaluation,
  checkpoints, the end). Then training stops: the weights and the optimizer state are those of the step before
  the NaN, `run.state.step` says which step that was, and no checkpoint is written after it (so a bad one can
  never prune a good one). With another optimizer, or fp16 (whose GradScaler syncs every step anyway), it reads
  the loss once per optimizer step, before the update, and stops in that step.
- Out of memory: the exception (and with it every frame holding activations) is dropped, `gc.collect()` and the
  accelerator's cache are emptied, and a `TrainingFailed` says which settings to try next.
"""

from __future__ import annotations

import math

from ..errors import TrainingFailed

# ---------------------------------------------------------------- non-finite loss


class LossGuard:
    """Keeps a non-finite loss away from the weights.

    Args:
        accelerator: The run's Accelerator (its device; with several processes the flag is all-reduced so every
            process skips and stops together).
        optimizer: The (prepared) optimizer. A fused torch optimizer without a GradScaler gets the on-device skip;
            anything else gets the per-step read.
    """

    def __init__(self, accelerator, optimizer=None):
        import torch

        self.accelerator = accelerator
        device = accelerator.device
        self.total = torch.zeros((), device=device)
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
        self.on_device = bool(
            inner is not None
            and getattr(inner, "defaults", {}).get("fused")
            and getattr(inner, "_step_supports_amp_scaling", False)
            and getattr(accelerator, "scaler", None) is None  # fp16: the GradScaler owns found_inf
        )
        if self.on_device:
            self.found_inf = torch.zeros((), device=device)  # 1.0 from the first bad step on: the kernel skips
            self.first_bad = torch.full((), -1, device=device, dtype=torch.long)
            self.bad_value = torch.zeros((), device=device)
            inner.found_inf = self.found_inf

    def add(self, loss) -> None:
        """Add one micro-batch loss (no host sync)."""
        self.total += loss.detach().float()

    def check(self, step: int, state=None, optimizer=None) -> None:
        """Call at the last micro-batch of a step, before backward/update. On the device path it only flags a
        non-finite loss (see `poll`); otherwise it raises `TrainingFailed` at once."""
        import torch

        total = self.total
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(total, reduction="sum")
        if self.on_device:
            first = ~torch.isfinite(total) & (self.first_bad < 0)
            self.first_bad.copy_(torch.where(first, step, self.first_bad))
            self.bad_value.copy_(torch.where(first, total, self.bad_value))
            self.found_inf.copy_((self.first_bad >= 0).float())
            self.total.zero_()
            return
        value = total.item()  # the one read-back per optimizer step
        self.total.zero_()
        if math.isfinite(value):
            return
        if optimizer is not None:  # drop the partial gradients so the kept model and optimizer stay clean
            optimizer.zero_grad(set_to_none=True)
        raise TrainingFailed(nonfinite_message(value, step, getattr(state, "checkpoint_dir", None)))

    def poll(self, state=None) -> None:
        """Raise `TrainingFailed` if a step since the start had a non-finite loss (one host read; call it where the
        loop reads the host anyway). Sets ``state.step`` to the last step whose update was applied."""
        if not self.on_device:
            return
        first = int(self.first_bad.item())
        if first < 0:
            return
        if state is not None:  # the later steps ran, but their updates were skipped
            if state.step:
                state.epoch = state.epoch * (first - 1) / state.step
            state.step = first - 1
        raise TrainingFailed(nonfinite_message(self.bad_value.item(), first, getattr(state, "checkpoint_dir", None)))


def nonfinite_message(value, step: int, checkpoint_dir: str | None = None) -> str:
    kept = f" The last good checkpoint is {checkpoint_dir}." if checkpoint_dir else ""
    return (
        f"the loss became {value} at step {step}, so training stopped before that step changed the weights "
        "(run.model holds those of the step before). Likely causes: the learning rate is too high (try 10x lower), "
        f"fp16 overflow (try train.mixed_precision: bf16 or no), or bad rows in the data.{kept}"
    )


# ---------------------------------------------------------------- out of memory


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA/MPS out of memory, or a host MemoryError."""
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):  # pragma: no cover - torch without OutOfMemoryError
        pass
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def release_memory() -> None:
    """Collect garbage and hand cached accelerator memory back (what a fresh kernel would have)."""
    import gc

    gc.collect()
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():  # pragma: no cover - Apple only
        mps.empty_cache()


def out_of_memory_advice(cfg) -> str:
    """The next settings to try, keeping the effective batch (batch x accumulation) the same."""
    t, m = cfg.train, cfg.model
    tips = []
    if t.per_device_train_batch_size > 1:
        b = max(t.per_device_train_batch_size // 2, 1)
        acc = t.gradient_accumulation_steps * (t.per_device_train_batch_size // b)
        tips.append(f"--set train.per_device_train_batch_size={b} --set train.gradient_accumulation_steps={acc} "
                    "(same effective batch)")  # fmt: skip
    if not t.checkpointing:
        tips.append("--set train.gradient_checkpointing=true")
    if m.quantization == "none" and not m.gguf_file:
        tips.append("--set model.quantization=4bit (QLoRA, needs a CUDA GPU and bitsandbytes)")
    if cfg.data.max_length > 128:
        tips.append(f"--set data.max_length={cfg.data.max_length // 2}")
    if not tips:
        tips.append("a smaller model")
    return "Fix: try " + "; ".join(tips) + "."


def out_of_memory_failure(run, where: str) -> TrainingFailed:
    """Free the failed run's model and memory; return the error to raise (outside any `except` block)."""
    run.model = None
    release_memory()
    step = f" at step {run.state.step + 1}" if where == "training" else f" while {where}"
    t = run.config.train
    shape = f"batch {t.per_device_train_batch_size} x accum {t.gradient_accumulation_steps}, max_length {run.config.data.max_length}"  # fmt: skip
    err = TrainingFailed(f"out of memory{step} ({shape}); memory was freed and the notebook is usable. "
                         f"{out_of_memory_advice(run.config)}")  # fmt: skip
    run.error = err
    run.state.status = run.state.stop_reason = "failed"
    run.state.error = str(err)
    err.run = run
    return err
