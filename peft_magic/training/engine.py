"""The training loop: Accelerate does devices, mixed precision, gradient accumulation and clipping; transformers
gives the scheduler. This file is the loop itself, readable top to bottom, and it only *emits* events.

Why a loop of our own rather than `transformers.Trainer`: Trainer refuses dequantized GGUF models, cannot be
stopped gracefully from a notebook button, and syncs the host every step; this loop reads the loss back only
every `logging_steps`, stops between steps, and keeps the same semantics under `accelerate launch`.
"""

from __future__ import annotations

import math
import os
import threading
import time

from ..events import EventBus, TrainState
from ..distributed.ranks import needs_cpu
from .guards import LossGuard
from .schedule import plan_steps
from .stopping import SigintAsStop, StopRequested, StopSignal


def make_accelerator(cfg):
    """An Accelerator for this run (one per run: a notebook may change mixed precision between runs)."""
    import torch
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.state import AcceleratorState, PartialState

    from ..devices import device_info, resolve_mixed_precision

    mp = resolve_mixed_precision(cfg.train.mixed_precision, device_info())
    if PartialState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state()  # single process: safe to re-initialise with new settings
    return Accelerator(
        cpu=needs_cpu(),  # several processes without a GPU: gloo ranks on CPU (see ranks.needs_cpu)
        mixed_precision=mp,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with=cfg.train.report_to or None,
        project_dir=cfg.train.output_dir,
        # batches are pinned (make_loaders) and copied without blocking: a blocking copy waits for every kernel
        # queued before it, i.e. a host sync at every batch
        dataloader_config=DataLoaderConfiguration(non_blocking=torch.cuda.is_available()),
    )


def make_optimizer(model, cfg):
    """AdamW with no weight decay on biases and norms (as transformers.Trainer does)."""
    import torch

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    try:  # one fused kernel instead of ~10 per parameter tensor (Trainer's default too: adamw_torch_fused)
        return torch.optim.AdamW(groups, lr=cfg.train.learning_rate, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(groups, lr=cfg.train.learning_rate)


def make_loaders(data, cfg, accelerator):
    import torch
    from torch.utils.data import DataLoader

    t = cfg.train
    gen = torch.Generator().manual_seed(t.seed)
    from .packing import example_lengths
    from .sampling import ShuffledLengthGroupedSampler, decide, longest_first

    # packed batches have no padding, but take the batches padded ones would (the same training either way)
    lengths = example_lengths(data.train)
    group, data.grouping = decide(cfg, data.train, lengths)
    sampler = ShuffledLengthGroupedSampler(lengths, t.per_device_train_batch_size, gen) if group else None
    collate = getattr(data, "train_collator", None) or data.collator  # packing collates training batches apart
    pin = torch.cuda.is_available()  # page-locked batches: the copy to the GPU can overlap the previous step
    train_dl = DataLoader(data.train.with_format("python"), batch_size=t.per_device_train_batch_size,
                          shuffle=sampler is None, sampler=sampler, generator=gen, collate_fn=collate, pin_memory=pin)  # fmt: skip
    eval_dl = None
    if data.eval is not None and len(data.eval):
        eval_dl = DataLoader(data.eval.with_format("python"), batch_size=t.per_device_eval_batch_size,
                             sampler=longest_first(example_lengths(data.eval)), collate_fn=data.collator)  # fmt: skip
    return train_dl, eval_dl


def memory_reading() -> dict:
    """Cheap memory figures for the panel: GPU allocated/peak, else process RSS."""
    import torch

    if torch.cuda.is_available():
        gb = 1024**3
        return {
            "gpu_gb": torch.cuda.memory_allocated() / gb,
            "gpu_peak_gb": torch.cuda.max_memory_allocated() / gb,
            "gpu_total_gb": torch.cuda.get_device_properties(0).total_memory / gb,
        }
    try:
        with open("/proc/self/statm") as fh:
            return {"rss_gb": int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024**3}
    except OSError:
        return {}


def fit(model, cfg, data, method, state: TrainState, bus: EventBus, stop_event: threading.Event, history: list,
        checkpointer=None, resume=None, evaluate_fn=None):  # fmt: skip
    """Train `model` in place. Returns the unwrapped model. Never raises for a stop; a failure sets
    ``state.stop_reason = "failed"`` and re-raises after the hooks ran.

    Args:
        model: The model with its trainable parameters set (PeftModel or a selectively unfrozen model).
        cfg: The run's `Config`.
        data: `PreparedData` (tokenized train/eval + collator).
        method: The `Method` object (for its optional `regularizer`).
        state: The run's `TrainState`, updated in place.
        bus: Where events go.
        stop_event: Set it (Stop button, `Run.stop()`, SIGINT) to stop after the current step.
        history: The run's history list; rows are appended.
        checkpointer: Object with `save(accelerator, model, optimizer, scheduler, state, history)`, or None.
        resume: A loaded checkpoint dict from `checkpoint.load`, or None.
        evaluate_fn: `evaluate_fn(model, eval_dl, accelerator) -> metrics dict` (required when there is eval data).
    """
    import torch
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    from .packing import batch_examples, batch_tokens

    t = cfg.train
    set_seed(t.seed)
    accelerator = make_accelerator(cfg)
    stop = StopSignal(stop_event, accelerator)  # with several processes, all ranks stop after the same step
    train_dl, eval_dl = make_loaders(data, cfg, accelerator)
    order = getattr(train_dl, "generator", None)  # the sampler's generator (prepare keeps the same object)
    max_steps, per_epoch = plan_steps(cfg, len(data.train), accelerator.num_processes)
    warmup = t.warmup_steps or math.ceil(t.warmup_ratio * max_steps)
    optimizer = make_optimizer(model, cfg)
    # a prepared scheduler is stepped once per process per optimizer step (accelerate assumes a schedule planned for
    # one process's batches), so plan it in those units; the learning rate at each optimizer step is then the same
    n = accelerator.num_processes
    scheduler = get_scheduler(t.lr_scheduler_type, optimizer, num_warmup_steps=warmup * n, num_training_steps=max_steps * n)  # fmt: skip
    from .checkpoint import before_prepare

    before_prepare(accelerator, model, method, resume)  # FSDP/ZeRO-3 shard the model in prepare: check, resume weights
    model, optimizer, train_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, scheduler)
    if eval_dl is not None:
        eval_dl = accelerator.prepare(eval_dl)
    if cfg.data.packing:
        from .packing import check_packing

        check_packing(accelerator.unwrap_model(model), accelerator.device)
    if t.report_to:
        accelerator.init_trackers("peft_magic", config=cfg.to_dict())
    regularizer = getattr(method, "regularizer", None)
    from .chunked_loss import loss_function
    from .objectives import make_objective

    objective = make_objective(cfg, data, accelerator, state)  # dpo/orpo/grpo; None: the model's own loss
    compute_loss = objective if objective else loss_function(model, cfg, accelerator)  # chunked causal-LM loss
    trainable = [p for p in model.parameters() if p.requires_grad]

    state.max_steps, state.warmup_steps, state.lr_scheduler_type = max_steps, warmup, t.lr_scheduler_type
    state.num_epochs = max_steps / per_epoch
    start_step = 0
    if resume is not None:
        from .checkpoint import restore

        start_step = restore(resume, accelerator, model, optimizer, scheduler, state, history)
    state.step = state.start_step = start_step
    state.status = "training"
    state.start_time = time.time()
    from .deadline import Deadline

    deadline = Deadline.from_config(cfg, state.start_time)  # train.max_time: stop, saved, before the budget ends
    state.time_budget, state.stop_note = deadline.budget, None
    bus.emit("on_train_begin", state)

    def run_eval():
        if eval_dl is None or evaluate_fn is None:
            return None
        guard.poll(state)  # never evaluate (or report) past a skipped, non-finite step
        state.status = "evaluating"
        bus.emit("on_status", state, "evaluating")
        with deadline.timing("eval"):
            metrics = evaluate_fn(model, eval_dl, accelerator)
        model.train()
        row = {"step": state.step, "epoch": round(state.epoch, 4), **{f"eval_{k}": v for k, v in metrics.items()
                                                                        if isinstance(v, (int, float))}}  # fmt: skip
        history.append(row)
        state.log_history = history
        state.status = "training"
        bus.emit("on_evaluate", state, {**row, "_full": metrics})
        return metrics

    # a checkpoint carries the not-yet-logged loss sum, so a resumed run logs exactly what an uninterrupted one does
    pending = (resume or {}).get("pending") or {}
    loss_sum = torch.full((), float(pending.get("loss_sum", 0.0)), device=accelerator.device)
    tokens = torch.full((), int(pending.get("tokens", state.tokens_seen)), device=accelerator.device, dtype=torch.long)
    micro, samples = int(pending.get("micro", 0)), int(pending.get("samples", state.samples_seen))
    guard = LossGuard(accelerator, optimizer)  # reads the device only where the loop reads it anyway (see guards)
    step, epoch_i, last_log = start_step, start_step // per_epoch, start_step
    skip_batches = (start_step % per_epoch) * t.gradient_accumulation_steps
    model.train()
    try:
        with SigintAsStop(stop_event):
            while step < max_steps:
                if hasattr(train_dl, "set_epoch"):
                    train_dl.set_epoch(epoch_i)
                if order is not None:  # each epoch's order depends on (seed, epoch) only: resume sees the same order
                    order.manual_seed(t.seed + epoch_i)
                dl = accelerator.skip_first_batches(train_dl, skip_batches) if skip_batches else train_dl
                skip_batches = 0
                for batch in dl:
                    if stop.requested:
                        guard.poll(state)
                        raise StopRequested
                    with accelerator.accumulate(model):
                        task_loss = compute_loss(model, batch)  # the outputs (any logits) die here,
                        loss = task_loss  # not after the next step's forward has allocated its own
                        if regularizer is not None:
                            extra = regularizer(accelerator.unwrap_model(model))
                            if extra is not None:
                                loss = loss + extra
                        guard.add(loss)
                        if accelerator.sync_gradients:  # before the update: a NaN never reaches the weights
                            guard.check(step + 1, state, optimizer)
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and t.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(trainable, t.max_grad_norm)
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                    loss_sum += task_loss.detach().float()
                    micro += 1
                    tokens += batch_tokens(batch)
                    samples += batch_examples(batch) * accelerator.num_processes
                    if not accelerator.sync_gradients:
                        continue
                    step += 1
                    state.step, state.epoch = step, step / per_epoch
                    if step == start_step + 1:  # after a real step (a Stop during the first one stops it)
                        from .flops import probe

                        state.flops_per_token, state.peak_tflops = probe(accelerator, model, cfg, data)
                    state.samples_seen = samples
                    bus.emit("on_step_end", state)
                    if step % t.logging_steps == 0 or step == max_steps:
                        guard.poll(state)
                        _log(accelerator, state, bus, history, loss_sum, micro, tokens, scheduler, step, objective)
                        loss_sum.zero_()
                        micro = 0
                        last_log = step
                    if t.eval_steps and step % t.eval_steps == 0 and step != max_steps:
                        run_eval()
                    if deadline.due(step) and not stop_event.is_set():  # agreed across processes like a Stop
                        state.stop_note = deadline.note()
                        stop_event.set()
                    # every rank, every step: the stop flag and the timed-checkpoint flag, agreed across processes
                    stopping, timed = stop.check(checkpointer is not None and checkpointer.time_due())
                    if not stopping and checkpointer is not None and checkpointer.due(step, max_steps, timed):
                        guard.poll(state)
                        with deadline.timing("save"):
                            _checkpoint(checkpointer, accelerator, model, optimizer, scheduler, state, history, bus,
                                        pending=_pending(loss_sum, micro, tokens, samples))  # fmt: skip
                    if stopping or step >= max_steps:
                        break
                epoch_i += 1
                if stop.requested:
                    guard.poll(state)
                    raise StopRequested
            guard.poll(state)
        state.stop_reason = "completed"
        stop.close()
    except StopRequested:
        state.stop_reason = "interrupted" if getattr(stop_event, "interrupted", False) else "stopped"
        stop.close()
    except Exception as e:
        state.stop_reason, state.status = "failed", "failed"
        state.error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        bus.emit("on_train_end", state)
        raise
    if checkpointer is not None and step > 0:  # first: its RNG state and loss sums are those of the step's end
        _checkpoint(checkpointer, accelerator, model, optimizer, scheduler, state, history, bus, final=True,
                    pending=_pending(loss_sum, micro, tokens, samples))  # fmt: skip
    if micro and step > last_log:
        _log(accelerator, state, bus, history, loss_sum, micro, tokens, scheduler, step, objective)
    final = run_eval()
    if t.report_to:
        accelerator.end_training()
    state.status = "done" if state.stop_reason == "completed" else state.stop_reason
    state._final_metrics = final
    unwrapped = accelerator.unwrap_model(model)
    accelerator.free_memory()
    bus.emit("on_train_end", state)
    return unwrapped


def _log(accelerator, state, bus, history, loss_sum, micro, tokens, scheduler, step, objective=None):
    """The one host sync per `logging_steps`: read the averaged loss back and publish a history row."""
    loss = accelerator.reduce(loss_sum, reduction="mean").item() / max(micro, 1)
    if not math.isfinite(loss):
        from ..errors import TrainingFailed

        raise TrainingFailed(
            f"the loss became {loss} at step {step}. Likely causes: learning rate too high, or fp16 overflow "
            "(try mixed_precision: bf16 or no). The last good checkpoint is kept."
        )
    state.tokens_seen = int(accelerator.reduce(tokens, reduction="sum").item())
    lr = scheduler.get_last_lr()[0]
    state.learning_rate = lr
    state.memory = memory_reading()
    row = {"step": step, "epoch": round(state.epoch, 4), "loss": loss, "learning_rate": lr}
    extra = objective.flush() if objective else {}  # rewards, margins, KL... of dpo/orpo/grpo (objectives.py)
    row.update({k: v for k, v in extra.items() if not k.startswith("_")})
    if "_samples" in extra:
        state.samples = extra["_samples"]  # GRPO: the last few completions and their rewards, for the panel
    history.append(row)
    state.log_history = history
    if accelerator.trackers:
        accelerator.log({"train/loss": loss, "train/learning_rate": lr}, step=step)
    bus.emit("on_log", state, row)


def _pending(loss_sum, micro, tokens, samples) -> dict:
    """What a checkpoint needs to continue the logging sums (a host read, at save time only)."""
    return {"loss_sum": loss_sum.item(), "micro": micro, "tokens": int(tokens.item()), "samples": samples}


def _checkpoint(checkpointer, accelerator, model, optimizer, scheduler, state, history, bus, final=False,
                pending=None):  # fmt: skip
    # every rank calls save: it writes on rank 0 only, between barriers that all ranks must reach
    status = state.status
    state.status = "saving"
    bus.emit("on_status", state, "saving checkpoint")
    checkpointer.save(accelerator, model, optimizer, scheduler, state, history, extra={"pending": pending})
    state.status = status
