"""Full fine-tuning: every parameter of the base model trains. The baseline the PEFT methods are measured against.

It runs through the same loop, schedulers, mixed precision, checkpoints and export as every other method; what
differs is only what trains and what is saved: a whole transformers model (``save_pretrained``), loadable with
``AutoModelFor*.from_pretrained(dir)`` and by ``peft_magic.load(dir)``.

Two refusals keep it honest:

* a quantized base (bitsandbytes stores 4/8-bit weights frozen; they cannot take gradient updates);
* a run the memory pre-flight says will not fit: full fine-tuning keeps, for every parameter, the weight, its
  gradient and two AdamW moments, several times what a LoRA run needs. The refusal carries the estimate and what
  LoRA would need; ``method: {name: full, force: true}`` tries anyway.

Weights are kept in float32 unless the user picks ``dtype: bfloat16``: with ``dtype: auto`` the base is loaded in
float32 (the "master weights") and mixed precision does the compute in bf16/fp16, as ``transformers.Trainer`` does.
Plain fp16 weights are refused: their small updates round to zero and fp16 gradient scaling cannot unscale them.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import ClassVar

from ..errors import ConfigError, did_you_mean
from .registry import register

INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "model.safetensors"
# Every linear layer's input is kept for its weight gradient: the activation model of LoRA on every linear layer
# with rank 0 and no dropout (see preflight._block_bytes_per_token).
_ACTIVATIONS_AS = {"r": 0, "lora_dropout": 0.0}


class FullFineTune:
    """``method: full``: the base model trains in place; export writes the whole model.

    Args:
        name: Our name for it (``method: full``).
        summary: One line for docs and the form.
    """

    family = "F"
    is_peft = False
    exports_full_model = True  # the model card and load snippets use AutoModelFor*.from_pretrained
    regularizer = None
    params_help: ClassVar[dict] = {
        "force": "Train even when the memory pre-flight says it will not fit (it may then run out of memory).",
    }

    def __init__(self, name: str = "full", summary: str = "Every parameter trains (the baseline for PEFT)."):
        self.name = name
        self.summary = summary

    # ------------------------------------------------------------------ parse time
    def check_params(self, params: dict) -> None:
        from ..config.coerce import coerce

        for key in params:
            if key not in self.params_help:
                raise ConfigError(f"'full' has no parameter '{key}'.{did_you_mean(key, self.params_help)} "
                                  f"Accepted: {', '.join(self.params_help)}.", key=f"method.{key}")  # fmt: skip
        if "force" in params:
            params["force"] = coerce(params["force"], bool, "method.force")

    def check_compatible(self, cfg) -> None:
        if cfg.model.quantization != "none":
            raise ConfigError(
                "full fine-tuning updates every weight, but bitsandbytes stores 4/8-bit weights frozen. Fix: set "
                "`quantization: none`, or use `method: qlora` to train LoRA on a 4-bit base.",
                key="model.quantization",
            )
        if cfg.model.dtype == "float16":
            raise ConfigError(
                "full fine-tuning in float16 weights loses small updates to rounding, and fp16 gradient scaling "
                "cannot unscale fp16 gradients. Fix: `dtype: auto` (float32 weights, mixed-precision compute) or "
                "`dtype: bfloat16`.",
                key="model.dtype",
            )
        if cfg.model.dtype == "auto":
            cfg.model.dtype = "float32"  # fp32 master weights; `mixed_precision` still computes in bf16/fp16

    # ------------------------------------------------------------------ run time
    def apply(self, model, cfg, calibration=None):
        """Make every parameter trainable, after checking that training it fits in memory (real weights only:
        `api.setup` already asked `check_before_loading`, with the data's lengths, before they loaded).

        Args:
            model: A plain transformers model (real weights, or on the meta device for a dry run).
            cfg: The run's `Config`.
            calibration: Unused.

        Raises:
            ConfigError: When the pre-flight estimate does not fit the device and ``force`` is not set.
        """
        on_meta = any(p.is_meta for p in model.parameters())  # a dry run or re-run check: see check_before_loading
        if not cfg.method.params.get("force") and not on_meta:
            check_memory(model, cfg, seq_len=planned_seq_len(cfg, _dataset_of(calibration)))
        model.requires_grad_(True)
        return model

    def check_before_loading(self, cfg, data) -> None:
        """The same refusal as `apply`'s, from the config alone (the architecture on the meta device), so that a
        run which cannot fit is refused before minutes of loading weights. Called by `session.setup`.

        Args:
            cfg: The run's `Config`.
            data: Its `PreparedData` (the tokenized lengths give the typical padded length of a batch).
        """
        if cfg.method.params.get("force"):
            return
        try:
            model = _meta_model(cfg, getattr(data, "labels", None))
        except Exception:  # noqa: BLE001 - an architecture the meta device cannot build: `apply` checks once loaded
            return
        check_memory(model, cfg, seq_len=planned_seq_len(cfg, getattr(data, "train", None)))

    def estimate_memory(self, cfg, info=None, seq_len: int | None = None):
        """This method's pre-flight estimate from a `Config` alone (the architecture is built on the meta device; no
        weights are read), for `preflight.estimate_for_config`: the dry run, the form and the run's own check."""
        from .. import devices

        return estimate_full(_meta_model(cfg), cfg, info or devices.device_info(), seq_len)

    def count_trainable(self, model) -> tuple[int, int]:
        from ..models import count_parameters

        return count_parameters(_unwrap(model))

    def save(self, model, out_dir, cfg=None) -> None:
        """The whole model in transformers' format (config.json + safetensors), as ``from_pretrained`` reads it."""
        from ..models import quiet_loading

        with quiet_loading():  # transformers 5 draws a "Writing model shards" bar under the live panel otherwise
            _unwrap(model).save_pretrained(out_dir, safe_serialization=True)

    def load_weights(self, model, in_dir) -> None:
        """Copy a folder written by `save` into `model`, in place (resume from a checkpoint).

        Weights that ``save_pretrained`` leaves out because they are tied to another (``lm_head`` tied to the
        input embeddings) come back through that other tensor; anything else missing is an error, not a silent
        half-load.
        """
        from safetensors.torch import load_file

        model = _unwrap(model)
        index = os.path.join(str(in_dir), INDEX_NAME)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as fh:
                files = sorted(set(json.load(fh)["weight_map"].values()))
        else:
            files = [WEIGHTS_NAME]
        state = {}
        for name in files:
            state.update(load_file(os.path.join(str(in_dir), name)))
        missing, unexpected = model.load_state_dict(state, strict=False)
        current = model.state_dict()
        loaded = {current[k].data_ptr() for k in state if k in current}
        untied = [k for k in missing if current[k].data_ptr() not in loaded]
        if untied or unexpected:
            raise RuntimeError(f"'{in_dir}' does not match {type(model).__name__}: missing {untied[:3]}, "
                               f"unexpected {list(unexpected)[:3]}")  # fmt: skip

    def load(self, base_model, in_dir):
        """`base_model` with the weights of a folder written by `save` (in place)."""
        self.load_weights(base_model, in_dir)
        return base_model

    def merge(self, model):
        """Nothing to fold in: the trained model is the full model."""
        return _unwrap(model)


def _unwrap(model):
    return model.module if hasattr(model, "module") and not hasattr(model, "save_pretrained") else model


# ---------------------------------------------------------------------- memory


def planned_seq_len(cfg, dataset=None) -> int:
    """Tokens per example to plan memory for: 1.5 x the mean tokenized length, capped by ``data.max_length`` (the
    collator pads each batch to its longest row, not to max_length), as `api`'s pre-flight assumes; max_length
    when the lengths are unknown."""
    if dataset is None or "input_ids" not in getattr(dataset, "column_names", ()) or not len(dataset):
        return cfg.data.max_length
    from ..training.packing import example_lengths

    lengths = example_lengths(dataset)
    return min(cfg.data.max_length, max(int(1.5 * sum(lengths) / len(lengths)), 8))


def _dataset_of(calibration):
    """The training set behind `api`'s calibration callable (a DataLoader factory), or None."""
    try:
        return getattr(calibration(), "dataset", None) if calibration is not None else None
    except Exception:  # noqa: BLE001 - only used to size the estimate
        return None


def estimate_full(model, cfg, info, seq_len: int | None = None):
    """The pre-flight estimate for training every parameter of `model` (a `preflight.MemoryEstimate`).

    `preflight.estimate_memory` assumes a frozen base plus fp32 adapter weights; here the weights *are* the
    trainable parameters, so there is no separate trainable copy, and gradients and AdamW's two moments take the
    weights' dtype (torch keeps optimizer state like its parameter).
    """
    from .. import preflight
    from ..devices import resolve_mixed_precision

    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    dtype = str(params[0].dtype).replace("torch.", "") if params else "float32"
    est = preflight.estimate_memory(
        model.config, task=cfg.task, dtype=dtype, trainable_params=n, method="full", method_params=_ACTIVATIONS_AS,
        batch_size=cfg.train.per_device_train_batch_size, seq_len=seq_len or cfg.data.max_length,
        gradient_checkpointing=cfg.train.checkpointing,
        mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision, info, cfg.task, model.config), device=info,
        loss=preflight.loss_kind(cfg),
    )  # fmt: skip
    n = est.params or n  # preflight's count from its own meta model: a tied lm_head is counted once
    per = preflight.DTYPE_BYTES[dtype]
    grads, optim = n * per, 2 * n * per
    total = est.weights + grads + optim + est.activations + est.overhead
    return replace(est, trainable=0, gradients=grads, optimizer=optim, total=total)


def _meta_model(cfg, labels=None):
    """The architecture on the meta device, in the dtype the run will load it in."""
    from .. import models

    model = models.build_empty(cfg.model, cfg.task, labels)
    if cfg.model.dtype not in ("auto", "float32"):
        import torch

        model.to(getattr(torch, cfg.model.dtype))
    return model


def check_memory(model, cfg, info=None, seq_len: int | None = None) -> None:
    """Refuse (ConfigError) when training every parameter of `model` will not fit the training device.

    Weights already resident on that device (a model loaded in CPU RAM, for a CPU run) are already out of its
    free memory, so they are not counted twice.
    """
    from .. import devices, preflight
    from ..ui.format import format_count

    info = info or devices.device_info()
    est = estimate_full(model, cfg, info, seq_len)
    resident = est.weights if _resident_on(model, info.kind) else 0
    if preflight.check_fit(replace(est, total=est.total - resident), info).fits:
        return
    if cfg.train.gradient_checkpointing == "auto" and not cfg.train.checkpointing:  # the pre-flight turns it on
        with_ = estimate_full(model, preflight.with_checkpointing(cfg, True), info, seq_len)
        if preflight.check_fit(replace(with_, total=with_.total - resident), info).fits:
            return
    gb = preflight.gb
    lora = _lora_need(model, cfg, info, est.inputs.get("seq_len", cfg.data.max_length))
    alt = f"a PEFT method (`method: lora` needs ~{gb(lora)} GB)" if lora else "a PEFT method (`method: lora`)"
    bf16 = "" if cfg.model.dtype == "bfloat16" else ", `dtype: bfloat16` (about half)"
    raise ConfigError(
        f"full fine-tuning of {format_count(est.params or est.trainable_params)} parameters needs ~{gb(est.total)} GB "
        f"at its peak (weights {gb(est.weights)} · gradients {gb(est.gradients)} · AdamW states {gb(est.optimizer)} · "
        f"activations {gb(est.activations)}), but {info.label} has {gb(info.free_memory)} GB free. Fix: {alt}"
        f"{bf16}, or `method: {{name: full, force: true}}` to try anyway.",
        key="method.name",
    )


def _resident_on(model, kind: str) -> bool:
    p = next(model.parameters(), None)
    return p is not None and p.device.type == kind


def _lora_need(model, cfg, info, seq):
    """What LoRA (r=8 on all linear layers) would need in the same setting, for the refusal's advice."""
    from .. import preflight
    from ..devices import resolve_mixed_precision

    try:
        return preflight.estimate_memory(
            model.config, task=cfg.task, dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
            method="lora", batch_size=cfg.train.per_device_train_batch_size, seq_len=seq,
            gradient_checkpointing=cfg.train.checkpointing,
            mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision, info, cfg.task, model.config), device=info,
            loss=preflight.loss_kind(cfg),
        ).total  # fmt: skip
    except Exception:  # noqa: BLE001 - only advice: an architecture peft cannot wrap on meta just loses the figure
        return None


register("full", FullFineTune())
