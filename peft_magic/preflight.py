"""The memory pre-flight: how much memory a run will need at its peak, and what to change when it will not fit.

`estimate_memory` works from the model's config alone. It builds the architecture on the meta device (no weights
are loaded or allocated) to count parameters exactly, to see which weights bitsandbytes would quantize, and to
let peft wrap it (also on meta) so the adapter's trainable parameters are counted by peft itself. Activations come
from a per-layer model of what autograd keeps for backward, written out below term by term; the constants were
checked against measured peaks by `benchmarks/memory_estimate.py` (target: within 20%).

`check_fit` compares an estimate with a device's free memory and, when it does not fit, proposes the settings
that do, each one re-estimated. Nothing heavy is imported at module level.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field

from .errors import ConfigError

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Optimizer state bytes per trainable parameter: AdamW keeps two fp32 moments; 8-bit AdamW keeps two uint8 moments.
OPTIMIZER_BYTES = {"adamw": 8, "adamw_torch": 8, "adam": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2, "sgd": 0,
                   "lion": 4, "adafactor": 4}  # fmt: skip
# NF4 with double quantization (what QLoRA and peft_magic use): 4 bits per weight, one uint8 absmax per block of
# 64 weights, and one fp32 second-level absmax per 256 blocks.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
# RSS of a Python process that has imported torch + transformers + peft and run one tiny training step (kernels and
# thread pools initialised), measured at 455 MiB on Linux x86-64 with torch 2.13 / transformers 5.
CPU_RUNTIME_BYTES = int(0.45 * GiB)
# glibc keeps freed tensors of a few MiB in its heap instead of returning them to the system, so on CPU the peak
# RSS exceeds the live tensors. Measured with benchmarks/memory_estimate.py (peak RSS with the default allocator
# against the same run with MALLOC_MMAP_THRESHOLD_=262144, which tracks live tensors): the excess is 0.56-0.79 of
# the layers' saved activations; with gradient checkpointing, 2.8-3.7 layers' worth of them on 4-8-layer models and
# 14-24 of SmolLM2's 30 (4 x 256 tokens: 2.5-3.3 GB measured, 1.48 GB with the threshold): about half the layers.
CPU_HEAP_SLACK = 0.65
CPU_HEAP_SLACK_CHECKPOINTED = 0.5
# With train.kernels on CPU (peft_magic's runs) the blocks keep less and make more small temporaries (one-bit masks
# packed and unpacked, SiLU and the dropped inputs remade in backward), and glibc's excess is a larger share of what
# they keep: on SmolLM2-135M + LoRA at 8 x 497 tokens, 1.09x the layers' saved activations under bf16 (4.49 GB
# peak against 3.00 on tcmalloc) and ~1.35x in float32 (python benchmarks/sft_real.py ... ours ours:malloc=tcmalloc
# ours:mixed_precision=no; 2026-12-03). Those runs trim glibc's heap between blocks now (training/heap_trim.py), which
# brings the excess to tcmalloc's (CPU_POOLED_SLACK below); this figure stays for runs that cannot (PEFT_MAGIC_TRIM=0).
CPU_HEAP_SLACK_KERNELS = 1.2
# tcmalloc (jemalloc, mimalloc) reuses those blocks (allocator.py): the excess over what autograd keeps, measured on
# SmolLM2-135M + LoRA at 8 x 497 tokens in float32 (python benchmarks/sft_real.py ... ours:malloc=tcmalloc).
CPU_POOLED_SLACK = 0.1
# What a CUDA context and cuBLAS workspaces take outside torch's allocator.
CUDA_CONTEXT_BYTES = int(0.5 * GiB)
# torch's caching allocator reserves more than it hands out (block rounding, fragmentation).
CUDA_ALLOCATOR_SLACK = 0.1
# Leaf names of linear layers that read a tensor no sibling reads (the attention output, the MLP's down projection).
_OWN_INPUT = re.compile(r"^(o_proj|out_proj|o|wo|c_proj|down_proj|fc2|dense_4h_to_h|w2)$")
_ATTN_DROPOUT_KEYS = ("attention_dropout", "attention_probs_dropout_prob", "attn_pdrop", "attention_dropout_prob")


@dataclass
class MemoryEstimate:
    """Peak training memory, in bytes, by what holds it.

    Args:
        weights: The frozen base model (quantized where bitsandbytes quantizes it).
        trainable: The trainable (adapter) parameters, kept in fp32.
        gradients: Their gradients.
        optimizer: Optimizer states (AdamW: two fp32 moments per trainable parameter).
        activations: What the forward pass keeps for backward, plus the logits and their gradients.
        overhead: The runtime around the tensors: the process itself on CPU (torch + transformers loaded), the
            allocator's slack, the CUDA context on GPU, weights dequantized on the fly.
        total: The sum: the expected peak.
        params: Parameters of the base model.
        trainable_params: Trainable parameters.
        device: "cpu", "cuda" or "mps": where the run was assumed to happen.
        runtime: The part of `overhead` that is the process (CPU) or the CUDA context (GPU).
        slack: The part of `overhead` the allocator holds beyond live tensors (glibc heap; torch's cache on GPU).
        inputs: The arguments of `estimate_memory`, so the estimate can be redone with changes.
    """

    weights: int
    trainable: int
    gradients: int
    optimizer: int
    activations: int
    overhead: int
    total: int
    params: int = 0
    trainable_params: int = 0
    device: str = "cpu"
    runtime: int = 0
    slack: int = 0
    inputs: dict = field(default_factory=dict, repr=False, compare=False)

    def replace(self, **changes) -> MemoryEstimate:
        """The same estimate with some of `estimate_memory`'s arguments changed (e.g. ``batch_size=2``)."""
        args = dict(self.inputs)
        config = args.pop("model_config")
        args.update(changes)
        return estimate_memory(config, **args)

    def summary(self, info=None) -> str:
        """The pre-flight's one-line `memory` row; with a `DeviceInfo`, whether it fits there.

        Example: ``~5.6 GB peak (weights 0.1 · adapter+optimizer 0.03 · activations 5.3 · runtime 0.5) · fits T4
        (14.6 GB free)``.
        """
        parts = [f"weights {gb(self.weights)}", f"adapter+optimizer {gb(self.trainable + self.gradients + self.optimizer)}",
                 f"activations {gb(self.activations)}"]  # fmt: skip
        if self.overhead:
            parts.append(f"runtime {gb(self.overhead)}")
        line = f"~{gb(self.total)} GB peak ({' · '.join(parts)})"
        if info is not None:
            line += " · " + check_fit(self, info).message
        return line


@dataclass
class FitReport:
    """Whether an estimate fits a device, and what would make it fit.

    Args:
        fits: True when the estimated peak is below the device's free memory.
        message: One line: "fits T4 (15 GB free)", or "needs ~21 GB, T4 (15 GB free): try <first suggestion>".
        suggestions: Settings that fit, as the config keys a user writes, each with its re-estimated peak.
        changes: The same suggestions as {config key: value} dicts, for a form to apply.
    """

    fits: bool
    message: str
    suggestions: list = field(default_factory=list)
    changes: list = field(default_factory=list)


def estimate_memory(
    model_config,
    *,
    task: str = "causal-lm",
    quantization: str = "none",
    dtype: str = "float32",
    trainable_params: int | None = None,
    method: str = "lora",
    method_params: dict | None = None,
    batch_size: int = 8,
    seq_len: int = 256,
    gradient_checkpointing: bool = False,
    optimizer: str = "adamw",
    mixed_precision: str = "no",
    device="cpu",
    loss: str = "plain",
    kernels: bool = False,
    allocator: str | None = None,
) -> MemoryEstimate:
    """Estimate the peak memory of training, from the model's config alone (no weights are loaded).

    Args:
        model_config: A transformers `PretrainedConfig`, or a model folder / hub id whose config is read.
        task: "causal-lm", "seq-cls", "token-cls" or "seq2seq".
        quantization: "none", "8bit" or "4bit" (bitsandbytes; NF4 with double quantization).
        dtype: The weights' dtype ("float32", "bfloat16", "float16", or "auto" for the device's default).
        trainable_params: Trainable parameter count, when known; otherwise peft counts it on the meta model.
        method: The PEFT method's name in peft_magic's registry ("lora", "dora", "ia3", ...).
        method_params: The method's parameters (peft names), e.g. ``{"r": 16, "lora_dropout": 0.05}``.
        batch_size: Examples per step per device (`train.per_device_train_batch_size`).
        seq_len: Tokens per example (`data.max_length`); padding up to it is assumed, so this is an upper bound.
        gradient_checkpointing: Keep only each layer's input and recompute the rest in backward.
        optimizer: "adamw" (default), "adamw_8bit", "sgd", ...
        mixed_precision: "no", "fp16" or "bf16": with autocast, activations are half precision.
        device: "cpu", "cuda", "mps" or a `DeviceInfo`.
        loss: "plain" (the model's own loss: positions x vocabulary logits) or "chunked" (causal-lm with
            `train.kernels: auto`: the output layer and loss over trained positions, a chunk of rows at a time;
            every position is counted as trained, an upper bound).
        kernels: `train.kernels` is not none: on CPU, dropout modules keep a one-bit mask (training/dropout.py).
        allocator: On CPU, the process's memory allocator ("glibc", "tcmalloc", ...; default: this process's,
            `allocator.active()`): glibc's holds freed blocks beyond the live tensors, tcmalloc's far less.
    """
    inputs = dict(locals())
    kind = getattr(device, "kind", device)
    if dtype == "auto":  # as models.resolve_dtype: float32 off CUDA, bf16 (fp16 without bf16 support) on CUDA
        dtype = "float32" if kind != "cuda" else ("bfloat16" if getattr(device, "bf16", True) else "float16")
    _check_args(kind, quantization, dtype, optimizer, batch_size, seq_len)
    config = _load_config(model_config)
    inputs["model_config"] = config
    an = _anatomy(config, task)
    ad = _adapter(config, task, method, method_params or {}, an)
    n_trainable = ad.trainable if trainable_params is None else int(trainable_params)

    weight_b = DTYPE_BYTES[dtype]
    act_b = 2 if (weight_b == 2 or mixed_precision in ("fp16", "bf16")) else 4
    weights = _weight_bytes(an, quantization, weight_b)
    if kernels and mixed_precision in ("bf16", "fp16") and weight_b == 4 and quantization == "none" and \
            not gradient_checkpointing:  # fmt: skip
        # training/frozen_casts.py: a 16-bit copy of each frozen linear weight for the run; on CPU the float32
        # originals wait in a file mapping meanwhile (a disk is assumed to hold the temporary folder)
        weights += an.quantizable * 2 - (an.quantizable * 4 if kind == "cpu" else 0)
    trainable = 4 * n_trainable  # peft keeps adapter weights in fp32 (autocast_adapter_dtype), whatever the base
    gradients = 4 * n_trainable
    optim = OPTIMIZER_BYTES[optimizer] * n_trainable
    seq = seq_len + ad.virtual_tokens
    chunked = loss == "chunked" and task == "causal-lm" and not ad.virtual_tokens  # as chunked_loss.loss_function
    activations, layers = _activation_bytes(an, ad, batch_size * seq, seq, act_b, kind, quantization,
                                            gradient_checkpointing, mixed_precision, task, chunked, kernels)  # fmt: skip
    if kind == "cuda":
        runtime, slack = CUDA_CONTEXT_BYTES, CUDA_ALLOCATOR_SLACK * activations
    else:
        runtime = CPU_RUNTIME_BYTES
        if allocator is None:
            from .allocator import active

            allocator = inputs["allocator"] = active()
        from .allocator import trims_heap

        if allocator in ("tcmalloc", "jemalloc", "mimalloc") or (kernels and trims_heap(allocator)):
            slack = CPU_POOLED_SLACK * layers  # glibc's heap trimmed between blocks (training/heap_trim.py)
        elif gradient_checkpointing:
            slack = layers * CPU_HEAP_SLACK_CHECKPOINTED
        else:
            slack = (CPU_HEAP_SLACK_KERNELS if kernels else CPU_HEAP_SLACK) * layers
    # bitsandbytes dequantizes each quantized weight for its matmul (and again in backward): one or two at a time.
    dequant = 2 * an.largest_linear * act_b if quantization != "none" else 0
    overhead = runtime + int(slack) + dequant + _float32_hand_on(an, quantization, kind, mixed_precision, kernels,
                                                                 batch_size * seq, allocator)  # fmt: skip
    total = weights + trainable + gradients + optim + activations + overhead
    return MemoryEstimate(weights, trainable, gradients, optim, activations, overhead, total, an.params, n_trainable,
                          kind, runtime, int(slack), inputs)  # fmt: skip


def _float32_hand_on(an, quantization, kind, mixed_precision, kernels, tokens, allocator) -> int:
    """4-bit layers under 16-bit mixed precision with train.kernels on CPU hand their output on in float32
    (training/quantized_cpu.py): each block frees its gate/up outputs and their LoRA sums, four float32 tensors of
    the intermediate size per token, into glibc's heap, trimmed at every `heap_trim.EVERY`-th block (one block's
    worth on a pooling allocator). On SmolLM2-135M NF4 at 8 x 497 tokens the peak rose 0.39 GB with them; this
    gives 0.39."""
    from .training.quantized_cpu import hands_on_float32

    if quantization != "4bit" or kind != "cpu" or mixed_precision not in ("bf16", "fp16") or not kernels or \
            not hands_on_float32():  # fmt: skip
        return 0
    from .allocator import trims_heap
    from .training.heap_trim import EVERY

    inter = max((stack.intermediate for stack in an.stacks), default=an.hidden)
    return 4 * inter * 4 * tokens * (EVERY if trims_heap(allocator) else 1)


def _check_args(kind, quantization, dtype, optimizer, batch_size, seq_len) -> None:
    if kind not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unknown device '{kind}'. Use cpu, cuda or mps.", key="device")
    if quantization not in ("none", "4bit", "8bit"):
        raise ConfigError(f"unknown quantization '{quantization}'. Use none, 4bit or 8bit.", key="model.quantization")
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"unknown dtype '{dtype}'. Use float32, bfloat16 or float16.", key="model.dtype")
    if optimizer not in OPTIMIZER_BYTES:
        raise ConfigError(f"unknown optimizer '{optimizer}'. Known: {', '.join(OPTIMIZER_BYTES)}.", key="train.optim")
    for key, value in (("train.per_device_train_batch_size", batch_size), ("data.max_length", seq_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"must be a positive whole number, got {value!r}.", key=key)


def check_fit(estimate: MemoryEstimate, info, *, gradient_accumulation_steps: int = 1) -> FitReport:
    """Does `estimate` fit the free memory of `info`? If not, which settings would (each re-estimated)?

    Args:
        estimate: From `estimate_memory`.
        info: The device, from `devices.device_info()` or `devices.known_device("T4")`.
        gradient_accumulation_steps: The run's current value, so a smaller batch keeps the same effective batch.
    """
    if estimate.device != info.kind:
        estimate = estimate.replace(device=info)
    free = _usable(info)
    need = _need(estimate, info)
    where = f"{info.label} ({gb(free)} GB free)"
    if need <= free:
        return FitReport(True, f"fits {where}")
    changes = _suggest(estimate, info, gradient_accumulation_steps)
    suggestions = [", ".join(f"{k}: {_yaml(v)}" for k, v in c.items() if not k.startswith("_"))
                   + f" (~{gb(c['_total'])} GB)" for c in changes]  # fmt: skip
    message = f"needs ~{gb(need)} GB, {where}"
    if suggestions:
        message += f": try {suggestions[0]}"
    return FitReport(
        False, message, suggestions, [{k: v for k, v in c.items() if not k.startswith("_")} for c in changes]
    )


def loss_kind(config) -> str:
    """How the run computes its loss, for `estimate_memory`: "chunked" (causal-lm, `train.kernels` not none) or
    "plain"."""
    return "chunked" if config.task == "causal-lm" and config.train.kernels != "none" else "plain"


def estimate_for_config(
    config, info=None, *, model_config=None, trainable_params: int | None = None, seq_len: int | None = None
) -> MemoryEstimate:
    """`estimate_memory` for a peft_magic `Config` (what `--dry-run`, the form and `train()` have at hand).

    Args:
        config: A validated `peft_magic.config.Config`.
        info: The device (`devices.device_info()` when omitted).
        model_config: The model's transformers config when already loaded (else it is read, never the weights).
        trainable_params: The exact count when the model is already wrapped by peft.
        seq_len: Tokens per example when the data says better than `data.max_length` (e.g. its longest row).
    """
    from .devices import device_info, resolve_dtype, resolve_mixed_precision
    from .models import load_config
    from .training.objectives import OBJECTIVE_TASKS, step_tokens, with_reference_pass

    info = info or device_info()
    seq = seq_len
    seq_len = step_tokens(config, seq_len or config.data.max_length)  # dpo/orpo/grpo: every sequence of a step
    from .methods import get_method

    own = getattr(get_method(config.method.name), "estimate_memory", None)
    if own is not None:  # a method with a memory model of its own (full: every parameter trains)
        return with_reference_pass(own(config, info, seq_len=seq_len), config, seq)
    params = {k: v for k, v in config.method.params.items() if k != "from"}
    model_config = model_config if model_config is not None else load_config(config.model)
    return with_reference_pass(estimate_memory(
        model_config,
        task="causal-lm" if config.task in OBJECTIVE_TASKS else config.task,
        quantization=config.model.quantization,
        dtype=resolve_dtype(config.model.dtype, info),
        trainable_params=trainable_params,
        method=config.method.name,
        method_params=params,
        batch_size=config.train.per_device_train_batch_size,
        seq_len=seq_len or config.data.max_length,
        gradient_checkpointing=config.train.checkpointing,
        mixed_precision=resolve_mixed_precision(config.train.mixed_precision, info, config.task, model_config),
        device=info,
        loss=loss_kind(config),
        kernels=config.train.kernels != "none",
    ), config, seq)


@dataclass
class Checkpointing:
    """What `train.gradient_checkpointing` comes to for a run on a device, and why.

    Args:
        on: Whether the run checkpoints.
        line: The dry run's row: ``on (auto: needs ~9.1 GB without, 5.2 GB with; 7.4 GB free)``.
        auto: The config says auto and this estimate decided it (False for true/false, and for a resumed run,
            which keeps its checkpoint's choice).
        estimate: The estimate of the chosen setting (with it, when auto found that nothing fits).
        fit: `check_fit` of that estimate: its suggestions treat auto as off.
    """

    on: bool
    line: str
    auto: bool = False
    estimate: MemoryEstimate | None = None
    fit: FitReport | None = None


def with_checkpointing(config, on: bool):
    """A copy of `config` (a `Config`) whose `train.gradient_checkpointing` is `on`; the rest is shared."""
    from dataclasses import replace

    return replace(config, train=replace(config.train, gradient_checkpointing=bool(on)))


def resolve_checkpointing(config, info=None, **estimate_args) -> Checkpointing:
    """Decide `train.gradient_checkpointing: auto` for `config` on `info`: on only when the run does not fit the
    free memory without it and does with it (it costs ~25-35% speed). true/false, and an auto already decided
    (`TrainConfig.auto_checkpointing`, a resumed run's), are kept; they are estimated as they are.

    Args:
        config: A validated `Config`.
        info: The device (`devices.device_info()` when omitted).
        estimate_args: For `estimate_for_config` (model_config, trainable_params, seq_len).
    """
    from .devices import device_info

    info = info or device_info()
    t = config.train
    accum = t.gradient_accumulation_steps

    def estimate(on):
        est = estimate_for_config(with_checkpointing(config, on), info, **estimate_args)
        return est, check_fit(est, info, gradient_accumulation_steps=accum)

    if t.gradient_checkpointing != "auto" or t.auto_checkpointing is not None:
        est, fit = estimate(t.checkpointing)
        why = "as set" if t.gradient_checkpointing != "auto" else "auto: as the run it continues"
        return Checkpointing(t.checkpointing, f"{'on' if t.checkpointing else 'off'} ({why})", False, est, fit)
    without, fit_without = estimate(False)
    free = f"{gb(_usable(info))} GB free"
    if fit_without.fits:
        line = f"off (auto: fits without it, ~{gb(_need(without, info))} GB; {free})"
        return Checkpointing(False, line, True, without, fit_without)
    with_, fit_with = estimate(True)
    sizes = f"needs ~{gb(_need(without, info))} GB without, {gb(_need(with_, info))} GB with; {free}"
    if fit_with.fits:
        return Checkpointing(True, f"on (auto: {sizes})", True, with_, fit_with)
    return Checkpointing(False, f"off (auto: does not fit either way: {sizes})", True, without, fit_without)


# -- what the model is made of (from the meta device)


@dataclass(frozen=True)
class _Stack:
    """One stack of identical blocks (a decoder's layers; an encoder-decoder has two)."""

    layers: int
    norms: int  # norm modules per block: each keeps its input for backward
    rms: bool  # RMSNorm upcasts to fp32 before normalising, so it keeps an fp32 copy
    residual_dropouts: int  # active nn.Dropout modules outside attention (BERT has two per layer)
    gated: bool  # SwiGLU-style MLP: keeps gate, activation and up outputs
    intermediate: int
    linears: tuple  # (name, in_features, out_features) in block 0, names relative to the block
    prefix: str  # the stack's module path, e.g. "model.layers"


@dataclass(frozen=True)
class _Anatomy:
    params: int
    quantizable: int  # weights of Linear/Conv1D layers bitsandbytes would replace
    quantizable_rows: int  # their output rows: 8-bit keeps one fp32 scale per row
    largest_linear: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    attention_dropout: float
    eager: bool  # the attention implementation materialises the (heads x seq x seq) probabilities
    stacks: tuple
    swiglu: bool = False  # a SiLU-gated MLP training/swiglu.py runs (keeps 2 of its 3 tensors with train.kernels)
    norms16: bool = False  # RMSNorms that keep the stream in bf16 under bf16 kernels (training/rms_norm.py)


@dataclass(frozen=True)
class _Adapter:
    trainable: int
    modules: tuple  # (stack prefix, name relative to the block, in_features, r, dropout) in each stack's block 0
    virtual_tokens: int = 0


def _load_config(model_config):
    if not isinstance(model_config, str):
        return model_config
    import os

    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(os.path.expanduser(model_config))
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"cannot read the model's config: {str(e).splitlines()[0]}", key="model.name_or_path"
        ) from None


def _meta_model(config, task: str):
    import torch
    import transformers

    from .models import AUTO_CLASSES

    cls = getattr(transformers, AUTO_CLASSES[task])
    with torch.device("meta"):
        try:
            return cls.from_config(config)
        except ValueError as e:
            raise ConfigError(f"this model cannot be built for task '{task}' ({str(e).splitlines()[0]}).",
                              key="task") from None  # fmt: skip


_CACHE: dict = {}  # (what, config JSON, ...) -> result: the form re-estimates on every keystroke


def _cached(key, build):
    if key not in _CACHE:
        if len(_CACHE) > 64:
            _CACHE.clear()
        _CACHE[key] = build()
    return _CACHE[key]


def _anatomy(config, task: str) -> _Anatomy:
    """Parameter counts and per-block structure of the architecture (cached by the config's JSON)."""
    return _cached(("anatomy", config.to_json_string(), task), lambda: _build_anatomy(config, task))


def _build_anatomy(config, task: str) -> _Anatomy:
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    from .training.rms_norm import RMS_NORMS

    model = _meta_model(config, task)
    skip = list(get_keys_to_not_convert(model)) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
    if task in ("seq-cls", "token-cls"):  # the classifier head trains in full (peft's modules_to_save): not quantized
        from peft.utils.constants import SEQ_CLS_HEAD_NAMES

        skip += SEQ_CLS_HEAD_NAMES
    quantizable = rows = largest = 0
    for name, module in model.named_modules():
        shape = _linear_shape(module)
        if shape and should_convert_module(name, skip):
            quantizable += shape[0] * shape[1]
            rows += shape[1]
            largest = max(largest, shape[0] * shape[1])
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    stacks = tuple(_stack(prefix, blocks) for prefix, blocks in _block_lists(model))
    hidden = getattr(text, "hidden_size", None) or (stacks[0].linears[0][1] if stacks else 0)
    heads = getattr(text, "num_attention_heads", None) or 1
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    attn_p = next(
        (float(getattr(text, k)) for k in _ATTN_DROPOUT_KEYS if isinstance(getattr(text, k, None), (int, float))), 0.0
    )
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    return _Anatomy(
        params=sum(p.numel() for p in model.parameters()),
        quantizable=quantizable,
        quantizable_rows=rows,
        largest_linear=largest,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=getattr(text, "vocab_size", 0) or 0,
        attention_dropout=attn_p,
        eager=impl == "eager",
        stacks=stacks,
        swiglu=_keeps_two_of_three(text),
        norms16=any(type(m).__name__ in RMS_NORMS for m in model.modules()),
    )


def _keeps_two_of_three(text_config) -> bool:
    from .training.swiglu import SILU, SWIGLU_MODELS

    return getattr(text_config, "model_type", None) in SWIGLU_MODELS and getattr(text_config, "hidden_act", None) in SILU


def _linear_shape(module):
    """(in_features, out_features) of a Linear or transformers Conv1D, else None."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "weight"):  # GPT-2's linear layers
        return tuple(module.weight.shape)
    return None


def _block_lists(model):
    """The ModuleLists of repeated blocks (not nested in another one) that hold most of the parameters."""
    import torch

    total = sum(p.numel() for p in model.parameters()) or 1
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(prefix + ".") for prefix, _ in found):
            continue
        if sum(p.numel() for p in module.parameters()) >= 0.1 * total:
            found.append((name, module))
    return found


def _stack(prefix: str, blocks) -> _Stack:
    import torch

    block = blocks[0]
    linears, norms, rms, dropouts = [], 0, False, 0
    for name, module in block.named_modules():
        shape = _linear_shape(module)
        if shape:
            linears.append((name, shape[0], shape[1]))
        kind = type(module).__name__
        if "Norm" in kind and any(True for _ in module.parameters(recurse=False)):
            norms += 1
            rms = rms or "RMS" in kind
        if isinstance(module, torch.nn.Dropout) and module.p > 0 and not _is_attention_dropout(block, name):
            dropouts += 1
    intermediate = max((i for _, i, _ in linears), default=0)
    to_inter = [o for _, _, o in linears if o in (intermediate, 2 * intermediate)]
    gated = len(to_inter) >= 2 or any(o == 2 * intermediate for o in to_inter)
    return _Stack(len(blocks), norms, rms, dropouts, gated, intermediate, tuple(linears), prefix)


def _is_attention_dropout(block, name: str) -> bool:
    """A dropout on the attention probabilities (counted with the attention), not on the residual stream."""
    leaf = name.rsplit(".", 1)[-1]
    parent = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
    if "resid" in leaf:
        return False
    return "attn" in leaf or "attention" in leaf or type(parent).__name__.endswith("SelfAttention")


def _adapter(config, task: str, method: str, params: dict, an: _Anatomy) -> _Adapter:
    """Let peft wrap the meta model: its own count of trainable parameters, and which layers it adapted."""
    key = ("adapter", config.to_json_string(), task, method, json.dumps(params, sort_keys=True, default=str))
    return _cached(key, lambda: _build_adapter(config, task, method, dict(params), an))


def _build_adapter(config, task: str, method: str, params: dict, an: _Anatomy) -> _Adapter:
    try:
        import torch
        from accelerate import init_empty_weights
        from peft import get_peft_model

        from .config.schema import Config, MethodConfig
        from .methods import get_method

        impl = get_method(method)
        if not getattr(impl, "is_peft", False):
            raise NotImplementedError
        peft_config = impl.build_peft_config(Config(task=task, method=MethodConfig(name=method, params=params)))
        with init_empty_weights():  # adapter weights go to the meta device too: nothing is allocated
            model = get_peft_model(_meta_model(config, task), peft_config)
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - peft cannot apply this method on meta: use LoRA's arithmetic
        return _lora_fallback(an, int(params.get("r", 8)), float(params.get("lora_dropout", 0.05)))
    trainable, _ = model.get_nb_trainable_parameters()
    modules = []
    for stack in an.stacks:
        blocks = next(
            (m for n, m in model.named_modules() if n.endswith(stack.prefix) and isinstance(m, torch.nn.ModuleList)),
            None,
        )
        if blocks is None:
            continue
        for name, module in blocks[0].named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                drop = module.lora_dropout["default"]
                p = float(getattr(drop, "p", 0.0))
                modules.append((stack.prefix, name, module.in_features, int(module.r["default"]), p))
            elif hasattr(module, "active_adapters") and hasattr(module, "in_features") and name:
                modules.append((stack.prefix, name, module.in_features, 0, 0.0))  # other tuners: keep their input
    virtual = (
        int(getattr(peft_config, "num_virtual_tokens", 0) or 0)
        if getattr(peft_config, "is_prompt_learning", False)
        else 0
    )
    return _Adapter(int(trainable), tuple(modules), virtual)


def _lora_fallback(an: _Anatomy, r: int, dropout: float) -> _Adapter:
    """LoRA rank r on every linear layer of the blocks: r * (in + out) parameters each."""
    trainable, modules = 0, []
    for stack in an.stacks:
        for name, i, o in stack.linears:
            trainable += stack.layers * r * (i + o)
            modules.append((stack.prefix, name, i, r, dropout))
    return _Adapter(trainable, tuple(modules))


# -- the arithmetic


def _weight_bytes(an: _Anatomy, quantization: str, weight_b: int) -> int:
    if quantization == "none":
        return an.params * weight_b
    # prepare_model_for_kbit_training upcasts every parameter bitsandbytes did not quantize to fp32.
    rest = (an.params - an.quantizable) * 4
    if quantization == "4bit":
        return int(an.quantizable * NF4_BYTES_PER_PARAM) + rest
    return an.quantizable + 4 * an.quantizable_rows + rest


def _activation_bytes(an, ad, tokens, seq, act_b, kind, quantization, checkpointing, mixed_precision, task,
                      chunked=False, kernels=False):
    """(bytes alive at the peak, bytes the layers would keep without checkpointing).

    Without checkpointing the peak is at the loss: every layer's saved tensors plus the logits and their gradients.
    With it, each layer keeps only its input, and the peak is the larger of the loss's moment and one layer
    recomputed in backward (while the outputs still hold the logits).
    """
    # On CUDA dropout keeps a bool mask; on CPU torch multiplies by a float noise tensor and keeps that.
    mask_b = act_b if kind == "cpu" else 1
    # training/dropout.py keeps one bit per element on CPU (LoRA's and the model's dropout modules); CUDA a bool
    module_mask_b = (1 / 8 if kind == "cpu" else 1) if kernels else mask_b
    kept, layers, largest_block = 0, 0, 0
    for stack in an.stacks:
        block = tokens * _block_bytes_per_token(an, stack, ad, seq, act_b, mask_b, module_mask_b, kind, quantization,
                                                mixed_precision, kernels)  # fmt: skip
        layers += stack.layers * block
        largest_block = max(largest_block, block)
        kept += stack.layers * (tokens * an.hidden * act_b if checkpointing else block)
    kept += tokens * an.hidden * 4  # the final norm's input
    loss_peak = held = 0
    if chunked and an.vocab:
        # training/chunked_loss.py: the gathered hidden states of the trained positions and their gradient (filled
        # in the forward), then one chunk's logits in buffers kept for the run: the 16-bit product under autocast
        # and its float32 copy, turned into softmax in place. No positions x vocab tensor is kept.
        from .training.chunked_loss import CHUNK_ELEMENTS

        rows = min(tokens, max(16, CHUNK_ELEMENTS // an.vocab))
        loss_peak = 2 * tokens * an.hidden * act_b + rows * an.vocab * (4 + (act_b if act_b != 4 else 0))
        held = 0
    elif task in ("causal-lm", "seq2seq") and an.vocab:
        # logits (kept by the outputs), their fp32 copy for the loss (when not fp32 already), the log-softmax the
        # loss keeps, then in backward the gradients of the log-softmax and of the logits, alive together.
        held = tokens * an.vocab * act_b
        loss_peak = held + tokens * an.vocab * ((4 if act_b != 4 else 0) + 4 + 4 + 4)
    peak = kept + (max(loss_peak, held + largest_block) if checkpointing else loss_peak)
    return int(peak), int(layers)


def _block_bytes_per_token(an, stack, ad, seq, act_b, mask_b, module_mask_b, kind, quantization,
                           mixed_precision, kernels=False) -> float:
    """`mask_b`: bytes per element of a dropout mask inside attention (functional dropout); `module_mask_b`: of
    an `nn.Dropout` module's (residual and LoRA dropout), one bit with `train.kernels` on CPU; `kernels`:
    `train.kernels` is not none (training/swiglu.py, and on CPU LoRA's dropout inside A, training/dropout.py)."""
    h, a, kv, hd = an.hidden, an.heads, an.kv_heads, an.head_dim
    norm_b = 4 if (stack.rms or mixed_precision in ("fp16", "bf16")) else act_b  # norms run in fp32 under autocast
    if kernels and mixed_precision == "bf16" and an.norms16 and stack.rms:
        norm_b = 4 / h  # rstd: they keep their output's bf16 copy, kept by the layers reading it (rms_norm.py)
    b = stack.norms * h * norm_b
    # sdpa on CUDA (flash / memory-efficient) keeps q, k, v, the output and a fp32 log-sum-exp per head. With eager
    # attention, or dropout on the probabilities off CUDA (sdpa then falls back to its math path), it keeps q, k
    # (expanded to all heads), v and the probabilities (plus the dropout mask and the dropped probabilities).
    probs_dropout = an.attention_dropout > 0
    if an.eager or (kind != "cuda" and probs_dropout):
        b += 3 * a * hd * act_b + seq * a * act_b
        if probs_dropout:
            b += seq * a * (mask_b + act_b)
    else:
        b += (2 * a * hd + 2 * kv * hd) * act_b + a * 4
    # MLP: a SwiGLU keeps the gate's output, its activation and the up projection (not the activation with
    # train.kernels, training/swiglu.py); a plain MLP keeps the activation's input.
    b += ((2 if kernels and an.swiglu else 3) if stack.gated else 1) * stack.intermediate * act_b
    b += stack.residual_dropouts * h * module_mask_b
    # Adapters: LoRA with dropout keeps the dropped input and the mask for each adapted layer, and A's output;
    # without dropout (or with it inside A: train.kernels on CPU) the layer's input itself, which siblings (q, k,
    # v) share, and then the mask.
    inside_a = kernels and kind == "cpu"
    inputs = set()
    for prefix, name, d_in, r, p in ad.modules:
        if prefix != stack.prefix:
            continue
        b += r * act_b
        if p > 0 and not inside_a:
            b += d_in * (act_b + module_mask_b)
        elif p > 0 and kernels and an.swiglu and stack.gated and name.rpartition(".")[2] == "down_proj":
            b += d_in * module_mask_b  # A keeps SiluMul's gate and up, counted above, not its input (swiglu.py)
        else:
            b += d_in * module_mask_b if p > 0 else 0
            inputs.add(_input_key(name, d_in))
    if quantization == "8bit":  # bitsandbytes' 8-bit matmul keeps its input for backward
        inputs.update(_input_key(name, d_in) for name, d_in, _ in stack.linears)
    b += sum(d_in for _, d_in in inputs) * act_b
    return b


def _input_key(name: str, d_in: int):
    """Linear layers under one parent with the same input size read the same tensor (q, k, v; gate, up)."""
    parent, _, leaf = name.rpartition(".")
    return (name if _OWN_INPUT.match(leaf) else parent, d_in)


# -- fitting


def _usable(info) -> int:
    return int(info.free_memory)


def _need(estimate: MemoryEstimate, info) -> int:
    """What must still be free: on CPU, a process that already runs torch has paid for the runtime."""
    if info.kind != "cuda" and "torch" in sys.modules:
        return estimate.total - estimate.runtime
    return estimate.total


def _suggest(estimate: MemoryEstimate, info, accum: int) -> list:
    """Settings that fit, least disruptive first; each is a dict of config keys plus its re-estimated total."""
    args = estimate.inputs
    free = _usable(info)

    def fits(**changes):
        e = estimate.replace(**changes)
        return e if _need(e, info) <= free else None

    def smaller_batch(base: dict) -> dict | None:
        batch = args["batch_size"]
        while batch > 1:
            batch = max(1, batch // 2)
            e = fits(**{**base, "batch_size": batch})
            if e:
                steps = accum * math.ceil(args["batch_size"] / batch)
                return {"train.per_device_train_batch_size": batch, "train.gradient_accumulation_steps": steps,
                        "_total": _need(e, info)}  # fmt: skip
        return None

    def shorter(base: dict) -> dict | None:
        # Truncating to a quarter or below 64 tokens would change what the model learns, not just its memory.
        length, floor = args["seq_len"], max(64, args["seq_len"] // 4)
        while length > floor:
            length = max(floor, length // 2)
            e = fits(**{**base, "seq_len": length})
            if e:
                return {"data.max_length": length, "_total": _need(e, info)}
        return None

    out = []
    if not args["gradient_checkpointing"]:
        e = fits(gradient_checkpointing=True)
        if e:
            out.append({"train.gradient_checkpointing": True, "_total": _need(e, info)})
    batch = smaller_batch({})
    if batch:
        out.append(batch)
    if args["quantization"] != "4bit":
        e = fits(quantization="4bit")
        if e:
            out.append({"model.quantization": "4bit", "_total": _need(e, info)})
    length = shorter({})
    if length:
        out.append(length)
    if out:
        return out
    # No single change is enough: combine them, cheapest in quality first.
    base, keys = {}, {}
    if not args["gradient_checkpointing"]:
        base["gradient_checkpointing"], keys["train.gradient_checkpointing"] = True, True
    if args["quantization"] != "4bit":
        base["quantization"], keys["model.quantization"] = "4bit", "4bit"
    e = fits(**base)
    if e:
        return [{**keys, "_total": _need(e, info)}]
    for step in (smaller_batch, shorter):
        found = step(base)
        if found:
            return [{**keys, **found}]
        if step is smaller_batch:
            base["batch_size"] = 1
            keys.update({"train.per_device_train_batch_size": 1,
                         "train.gradient_accumulation_steps": accum * args["batch_size"]})  # fmt: skip
    return []


def _yaml(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def gb(n: float) -> str:
    """Bytes as GB (GiB, as nvidia-smi and torch count them): whole from 10 GB, 1 decimal from 1, 2 digits below."""
    g = n / GiB
    if g >= 10:
        return f"{g:.0f}"
    if g >= 1:
        return f"{g:.1f}"
    return f"{g:.2g}" if g >= 0.01 else ("0" if g == 0 else "<0.01")
