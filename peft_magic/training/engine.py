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
from ..distributed.ranks import end_process_group_at_exit, needs_cpu
from .guards import LossGuard
from .schedule import plan_steps
from .stopping import SigintAsStop, StopRequested, StopSignal


def make_accelerator(cfg, model_config=None):
    """An Accelerator for this run (one per run: a notebook may change mixed precision between runs)."""
    import torch
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.state import AcceleratorState, PartialState

    from ..devices import device_info, resolve_mixed_precision

    mp = resolve_mixed_precision(cfg.train.mixed_precision, device_info(), cfg.task, model_config)
    if PartialState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state()  # single process: safe to re-initialise with new settings
    accelerator = Accelerator(
        cpu=needs_cpu(),  # several processes without a GPU: gloo ranks on CPU (see ranks.needs_cpu)
        mixed_precision=mp,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with=cfg.train.report_to or None,
        project_dir=cfg.train.output_dir,
        # batches are pinned (make_loaders) and copied without blocking: a blocking copy waits for every kernel
        # queued before it, i.e. a host sync at every batch
        dataloader_config=DataLoaderConfiguration(non_blocking=torch.cuda.is_available()),
    )
    if accelerator.num_processes > 1:
        end_process_group_at_exit()
    return accelerator


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
    gen = torch.Generator().manual_seed(t.seed)  # the order's own: the loop reseeds it each epoch (`data.order`)
    from .packing import example_lengths
    from .sampling import class_labels, decide, longest_first, train_sampler

    # packed batches have no padding, but take the batches padded ones would (the same training either way)
    lengths = example_lengths(data.train)
    labels = class_labels(cfg, data.train)  # read once from the dataset: the decision and the sampler use them
    group, data.grouping = decide(cfg, data.train, lengths, labels)
    sampler = train_sampler(group, lengths, t.per_device_train_batch_size, gen, labels)
    if sampler is None:  # random batches: Trainer's for the same seed (its sampler draws randperm(n) at seed + epoch)
        from torch.utils.data import RandomSampler

        sampler = RandomSampler(data.train, generator=gen)
    data.order = gen
    collate = getattr(data, "train_collator", None) or data.collator  # packing collates training batches apart
    pin = torch.cuda.is_available()  # page-locked batches: the copy to the GPU can overlap the previous step
    # the DataLoader draws a seed for its workers from its own generator as each epoch begins: not the order's
    # (whose next draw is the order) and not torch's global one (whose next draws are the dropout masks)
    train_dl = DataLoader(data.train.with_format("python"), batch_size=t.per_device_train_batch_size,
                          sampler=sampler, generator=torch.Generator().manual_seed(t.seed), collate_fn=collate,
                          pin_memory=pin)  # fmt: skip
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
    from .quantized_cpu import hold_training_layout

    loop = Loop(model, cfg, data, method, state, bus, stop_event, history, checkpointer, resume, evaluate_fn)
    release = hold_training_layout(model)  # bitsandbytes' CPU inference repack would cut 4-bit layers' gradients
    try:
        loop.prepare()  # accelerator, loaders, steps, optimizer and schedule, objective
        loop.begin()  # resume, time budget, on_train_begin
        try:
            with SigintAsStop(stop_event):
                loop.train()  # epochs of micro-batches until max_steps, a stop or the time budget
            state.stop_reason = "completed"
            loop.stop.close()
        except StopRequested:
            state.stop_reason = "interrupted" if getattr(stop_event, "interrupted", False) else "stopped"
            loop.stop.close()
        except Exception as e:
            if getattr(e, "agreed", False):  # all ranks fail here together: collect the stop exchange in flight
                loop.stop.close()
            state.stop_reason, state.status = "failed", "failed"
            state.error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            bus.emit("on_train_end", state)
            raise
        return loop.finish()  # final checkpoint, last log row, final evaluation, on_train_end
    finally:
        release()
        loop.release_casts()


class Loop:
    """One run of `fit`, phase by phase; its attributes are what the phases share (the prepared objects, the
    position, and the on-device sums that are read back only at logging steps)."""

    def __init__(self, model, cfg, data, method, state, bus, stop_event, history, checkpointer, resume, evaluate_fn):
        self.model, self.cfg, self.data, self.method = model, cfg, data, method
        self.state, self.bus, self.stop_event, self.history = state, bus, stop_event, history
        self.checkpointer, self.resume, self.evaluate_fn = checkpointer, resume, evaluate_fn
        self.release_casts = lambda: None  # set by prepare under mixed precision (cast_once)

    def prepare(self) -> None:
        """Everything the steps need, prepared by Accelerate (devices, processes, mixed precision)."""
        from accelerate.utils import set_seed
        from transformers import get_scheduler

        cfg, t, model = self.cfg, self.cfg.train, self.model
        set_seed(t.seed)
        accelerator = self.accelerator = make_accelerator(cfg, getattr(model, "config", None))
        self.stop = StopSignal(self.stop_event, accelerator)  # with several processes, all ranks stop after the same step
        train_dl, eval_dl = make_loaders(self.data, cfg, accelerator)
        self.order = getattr(self.data, "order", None)  # the sampler's generator
        self.max_steps, self.per_epoch = plan_steps(cfg, len(self.data.train), accelerator.num_processes)
        self.warmup = t.warmup_steps or math.ceil(t.warmup_ratio * self.max_steps)
        optimizer = make_optimizer(model, cfg)
        # a prepared scheduler is stepped once per process per optimizer step (accelerate assumes a schedule planned
        # for one process's batches), so plan it in those units; the learning rate at each optimizer step is the same
        n = accelerator.num_processes
        scheduler = get_scheduler(t.lr_scheduler_type, optimizer, num_warmup_steps=self.warmup * n,
                                  num_training_steps=self.max_steps * n)  # fmt: skip
        from .checkpoint import before_prepare

        before_prepare(accelerator, model, self.method, self.resume)  # FSDP/ZeRO-3 shard the model in prepare
        model, optimizer, train_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, scheduler)
        if eval_dl is not None:
            eval_dl = accelerator.prepare(eval_dl)
        if t.kernels != "none":
            from .block_attention import use_block_attention
            from .dropout import use_mask_dropout
            from .heap_trim import trim_between_blocks
            from .rms_norm import norms_keep_16_bit
            from .swiglu import keep_two_of_three

            # CPU: dropout with a one-bit mask, LoRA's inside A (keeps A's input, not a dropped copy per adapter)
            releases = [use_mask_dropout(model, accelerator.device)]
            releases.append(keep_two_of_three(accelerator.unwrap_model(model)))  # SwiGLU keeps 2 of its 3 tensors
            mp = str(accelerator.mixed_precision)
            releases.append(norms_keep_16_bit(accelerator.unwrap_model(model), mp))  # no float32 kept by norms
            releases.append(cast_once(model, accelerator, t.checkpointing))  # 16-bit stays 16-bit, cast once
            # glibc: the heap's free pages given back between blocks
            releases.append(trim_between_blocks(accelerator.unwrap_model(model), accelerator.device))
            # CPU bf16: causal attention in blocks of queries (~3x sdpa's CPU kernel)
            releases.append(use_block_attention(accelerator.unwrap_model(model), accelerator.device, mp))
            self.release_casts = lambda: [undo() for undo in reversed(releases)]
        if cfg.data.packing:
            from .packing import check_packing

            check_packing(accelerator.unwrap_model(model), accelerator.device)
        if t.report_to:
            accelerator.init_trackers("peft_magic", config=cfg.to_dict())
        self.regularizer = getattr(self.method, "regularizer", None)
        from .chunked_loss import loss_function
        from .objectives import make_objective

        self.objective = make_objective(cfg, self.data, accelerator, self.state)  # dpo/orpo/grpo; None: the model's loss
        tokenizer = getattr(getattr(self.data, "collator", None), "tokenizer", None)  # the collator pads its way
        pads_right = getattr(tokenizer, "padding_side", None) == "right" and not cfg.data.packing
        # chunked causal-LM loss (and right-padded batches without their mask)
        self.compute_loss = self.objective or loss_function(model, cfg, accelerator, pads_right=pads_right)
        from .eval_samples import EvalSamples

        self.eval_samples = EvalSamples.from_config(cfg, self.data)  # eval.samples: greedy answers at each evaluation
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.model, self.optimizer, self.scheduler, self.train_dl, self.eval_dl = model, optimizer, scheduler, train_dl, eval_dl

    def begin(self) -> None:
        """The starting position (a checkpoint's, when resuming), the sums it carries, and on_train_begin."""
        import torch

        state, t, accelerator = self.state, self.cfg.train, self.accelerator
        state.max_steps, state.warmup_steps, state.lr_scheduler_type = self.max_steps, self.warmup, t.lr_scheduler_type
        state.num_epochs = self.max_steps / self.per_epoch
        start_step = 0
        if self.resume is not None:
            from .checkpoint import restore

            start_step = restore(self.resume, accelerator, self.model, self.optimizer, self.scheduler, state,
                                 self.history)  # fmt: skip
        state.step = state.start_step = self.start_step = start_step
        state.status = "training"
        state.start_time = time.time()
        from .deadline import Deadline

        self.deadline = Deadline.from_config(self.cfg, state.start_time)  # train.max_time: stop, saved, in time
        state.time_budget, state.stop_note = self.deadline.budget, None
        self.bus.emit("on_train_begin", state)
        # a checkpoint carries the not-yet-logged loss sum, so a resumed run logs exactly what an uninterrupted one does
        pending = (self.resume or {}).get("pending") or {}
        self.loss_sum = torch.full((), float(pending.get("loss_sum", 0.0)), device=accelerator.device)
        self.tokens = torch.full((), int(pending.get("tokens", state.tokens_seen)), device=accelerator.device,
                                 dtype=torch.long)  # fmt: skip
        self.micro, self.samples = int(pending.get("micro", 0)), int(pending.get("samples", state.samples_seen))
        self.guard = LossGuard(accelerator, self.optimizer)  # reads the device only where the loop reads it anyway
        self.step, self.epoch_i, self.last_log = start_step, start_step // self.per_epoch, start_step
        self.skip_batches = (start_step % self.per_epoch) * t.gradient_accumulation_steps
        self.model.train()

    def train(self) -> None:
        """Epochs until max_steps; raises `StopRequested` for a stop asked between micro-batches."""
        t, accelerator, train_dl = self.cfg.train, self.accelerator, self.train_dl
        while self.step < self.max_steps:
            if hasattr(train_dl, "set_epoch"):
                train_dl.set_epoch(self.epoch_i)
            if self.order is not None:  # each epoch's order depends on (seed, epoch) only: resume sees the same
                self.order.manual_seed(t.seed + self.epoch_i)
            dl = accelerator.skip_first_batches(train_dl, self.skip_batches) if self.skip_batches else train_dl
            self.skip_batches = 0
            for batch in dl:
                if self.stop.requested:
                    self.guard.poll(self.state)
                    raise StopRequested
                self.micro_batch(batch)
                if not accelerator.sync_gradients:
                    continue
                if self.after_step():
                    break
            self.epoch_i += 1
            if self.stop.requested:
                self.guard.poll(self.state)
                raise StopRequested
        self.guard.poll(self.state)

    def micro_batch(self, batch) -> None:
        """Forward, backward and (at the last micro-batch of a step) the update; the sums stay on the device."""
        from .packing import batch_examples, batch_tokens

        accelerator, model, optimizer, t = self.accelerator, self.model, self.optimizer, self.cfg.train
        with accelerator.accumulate(model):
            task_loss = self.compute_loss(model, batch)  # the outputs (any logits) die here,
            loss = task_loss  # not after the next step's forward has allocated its own
            if self.regularizer is not None:
                extra = self.regularizer(accelerator.unwrap_model(model))
                if extra is not None:
                    loss = loss + extra
            self.guard.add(loss)
            if accelerator.sync_gradients:  # before the update: a NaN never reaches the weights
                self.guard.check(self.step + 1, self.state, optimizer)
            accelerator.backward(loss)
            if accelerator.sync_gradients and t.max_grad_norm > 0:
                accelerator.clip_grad_norm_(self.trainable, t.max_grad_norm)
            optimizer.step()
            self.scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        self.loss_sum += task_loss.detach().float()
        self.micro += 1
        self.tokens += batch_tokens(batch)
        self.samples += batch_examples(batch) * accelerator.num_processes

    def after_step(self) -> bool:
        """What follows an optimizer step: the events, logging, evaluation, the time budget, the agreed stop and
        the checkpoint. Returns whether training ends here."""
        state, t, step = self.state, self.cfg.train, self.step + 1
        self.step = step
        state.step, state.epoch = step, step / self.per_epoch
        if step == self.start_step + 1:  # after a real step (a Stop during the first one stops it)
            from .flops import probe

            state.flops_per_token, state.peak_tflops = probe(self.accelerator, self.model, self.cfg, self.data)
        state.samples_seen = self.samples
        self.bus.emit("on_step_end", state)
        if step % t.logging_steps == 0 or step == self.max_steps:
            self.guard.poll(state)
            self.log()
        if t.eval_steps and step % t.eval_steps == 0 and step != self.max_steps:
            self.evaluate()
        if self.deadline.due(step) and not self.stop_event.is_set():  # agreed across processes like a Stop
            state.stop_note = self.deadline.note()
            self.stop_event.set()
        # every rank, every step: the stop flag and the timed-checkpoint flag, agreed across processes
        checkpointer = self.checkpointer
        stopping, timed = self.stop.check(checkpointer is not None and checkpointer.time_due())
        if not stopping and checkpointer is not None and checkpointer.due(step, self.max_steps, timed):
            self.guard.poll(state)
            with self.deadline.timing("save"):
                self.save()
        return stopping or step >= self.max_steps

    def log(self) -> None:
        _log(self.accelerator, self.state, self.bus, self.history, self.loss_sum, self.micro, self.tokens,
             self.scheduler, self.step, self.objective)  # fmt: skip
        self.loss_sum.zero_()
        self.micro = 0
        self.last_log = self.step

    def save(self, final=False) -> None:
        _checkpoint(self.checkpointer, self.accelerator, self.model, self.optimizer, self.scheduler, self.state,
                    self.history, self.bus, final=final,
                    pending=_pending(self.loss_sum, self.micro, self.tokens, self.samples))  # fmt: skip

    def evaluate(self):
        """One evaluation (between steps, and at the end): a history row and on_evaluate."""
        if self.eval_dl is None or self.evaluate_fn is None:
            return None
        state, history = self.state, self.history
        self.guard.poll(state)  # never evaluate (or report) past a skipped, non-finite step
        state.status = "evaluating"
        self.bus.emit("on_status", state, "evaluating")
        with self.deadline.timing("eval"):
            metrics = self.evaluate_fn(self.model, self.eval_dl, self.accelerator)
            samples = self.eval_samples(self.model, self.accelerator) if self.eval_samples is not None else None
        self.model.train()
        row = {"step": state.step, "epoch": round(state.epoch, 4), **{f"eval_{k}": v for k, v in metrics.items()
                                                                        if isinstance(v, (int, float))}}  # fmt: skip
        if samples:
            row["samples"] = samples  # [{prompt, answer}]: the panel, the lines, the summary and the card read them
        history.append(row)
        state.log_history = history
        state.status = "training"
        self.bus.emit("on_evaluate", state, {**row, "_full": metrics})
        return metrics

    def finish(self):
        """After the last step (or a stop): the final checkpoint, the last log row, the final evaluation, and
        on_train_end. Returns the unwrapped model."""
        state, accelerator = self.state, self.accelerator
        if self.checkpointer is not None and self.step > 0:  # first: RNG state and sums are those of the step's end
            self.save(final=True)
        if self.micro and self.step > self.last_log:
            _log(accelerator, state, self.bus, self.history, self.loss_sum, self.micro, self.tokens, self.scheduler,
                 self.step, self.objective)  # fmt: skip
        final = self.evaluate()
        if self.cfg.train.report_to:
            accelerator.end_training()
        state.status = "done" if state.stop_reason == "completed" else state.stop_reason
        state._final_metrics = final
        unwrapped = accelerator.unwrap_model(self.model)
        accelerator.free_memory()
        self.bus.emit("on_train_end", state)
        return unwrapped


def cast_once(model, accelerator, checkpointing: bool):
    """Under bf16/fp16 mixed precision: no float32 round trip in LoRA (lora_casts.py), one 16-bit copy of each
    frozen linear weight and one cast of each pre-norm output (frozen_casts.py), 4-bit layers multiplying in 16 bits
    (quantized_cpu.py). Returns what undoes them.

    The weights' copies only without activation checkpointing: there autocast's own copies are all alive at the
    backward anyway, so the peak is the same; a checkpointed run, there to save memory, would hold them for the
    whole run (+2 bytes per frozen weight) for ~0.6% of a step."""
    from accelerate.utils import DistributedType

    from .frozen_casts import cache_frozen_weights, half_norm_outputs
    from .lora_casts import skip_input_casts
    from .quantized_cpu import compute_in_16_bit

    mp = str(accelerator.mixed_precision)
    releases = [skip_input_casts(model, mp)]
    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):  # sharded weights
        unwrapped = accelerator.unwrap_model(model)
        releases.append(half_norm_outputs(unwrapped, mp))
        releases.append(compute_in_16_bit(unwrapped, mp))  # bitsandbytes' 4-bit layers ignore autocast
        if not checkpointing:
            releases.append(cache_frozen_weights(unwrapped, mp))

    def release():
        for undo in releases:
            undo()

    return release


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
