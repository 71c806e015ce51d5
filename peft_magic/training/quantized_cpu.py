"""4-bit layers on CPU during training: keep bitsandbytes' inference layout out of the run.

bitsandbytes 0.50's `Linear4bit`, on a CPU with AVX-512 BF16, repacks its weight for a fast inference kernel the
first time it runs in eval mode on an input without grad (an evaluation, `generate`, a no-grad check). The repack
is permanent, and from then on every forward, training ones included, goes through `gemv_4bit`, which has no
autograd formula: the gradient stops at each 4-bit layer (torch warns "an autograd kernel was not registered"),
so every LoRA matrix below the last block trains on a wrong gradient. Measured on a tiny Llama: after one no-grad
eval forward, LoRA gradients differed from the correct ones by 136% (tests/test_quantized_cpu.py).

A model peft_magic loads never repacks (`never_repack`, at load): evaluation and `generate` take bitsandbytes'
dequantizing path, the numerics training sees. For any other model, `hold_training_layout(model)` turns the repack
off for the length of a run and undoes one that already happened, as well as the repack can be undone (its block
scales were rounded to bfloat16; said once); the returned function turns it back on after the run.

Under bf16/fp16 mixed precision `compute_in_16_bit(model, mixed_precision)` makes the 4-bit layers multiply in
that type for the run, as autocast makes a plain linear layer: bitsandbytes ignores autocast and computes in its
`compute_dtype` (float32 on a CPU load), so Trainer's QLoRA step on CPU multiplies the 4-bit base in float32. Fed
the pre-norm output's 16-bit copy (frozen_casts.py) the layers multiply in bf16, as a plain bf16 LoRA layer does.

Their output is still handed on in float32, as bitsandbytes returns it for a float32 input. LoRA's update is added
to it, and early in training the update is about one 16-bit rounding of the base output: added to a bf16 output in
bf16 most of it is rounded away. With bf16 outputs (what autocast gives a plain bf16 LoRA run, in Trainer too) the
real QLoRA job (benchmarks/sft_equivalence.py: SmolLM2-135M NF4, batches in order, dropout 0) trained +4.3%, +2.7%,
+2.6% off Trainer's step losses at steps 2-4, and the held-out loss of `sft_real.py --quant 4bit` was +4.9% off
Trainer's over six seeds; handed on in float32 (and SwiGLU's product made from the float32 gate/up, training/
swiglu.py), -0.5%, -0.3%, -0.5%. The float32 tensors live one block at a time: attention casts q/k/v to 16 bits,
SwiGLU keeps 16-bit copies. `PEFT_MAGIC_4BIT_OUT=16` leaves the outputs in 16 bits (the ablation
`sft_real.py --sides ours:4bit_out=16`).
"""

from __future__ import annotations


def _unpack(weight):
    from bitsandbytes import functional as bnb_f

    data, state = bnb_f._convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    # the repack stored the block scales as bfloat16 [1, blocks]; the matmul wants float32 [blocks] (the rounding
    # to bfloat16 itself cannot be undone: a model loaded by peft_magic never repacks, see `never_repack`)
    state.absmax = state.absmax.float().reshape(-1)
    weight.data, weight.quant_state = data, state


def hold_training_layout(model):
    """Keep `model`'s 4-bit CPU layers in their trainable layout; returns a function that lets them repack again."""
    held, unpacked = [], False
    for module in model.modules():
        if not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        weight = getattr(module, "weight", None)
        if weight is None or weight.device.type != "cpu":
            continue
        module.support_avx512bf16_for_cpu = False
        held.append(module)
        if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
            _unpack(weight)
            unpacked = True
    if unpacked:
        import warnings

        warnings.warn("bitsandbytes had repacked this model's 4-bit layers for CPU inference (an evaluation or "
                      "generate before training), which cuts their gradients; they are unpacked for training, with "
                      "block scales rounded to bfloat16 by the repack.", stacklevel=2)  # fmt: skip

    def release():
        for module in held:
            module.support_avx512bf16_for_cpu = True

    return release


def never_repack(model) -> None:
    """Load-time: `model`'s 4-bit CPU layers keep their trainable layout for good (their inference then takes
    bitsandbytes' dequantizing path, the numerics training sees), so an evaluation or `generate` before training
    can neither cut gradients nor round the block scales to bfloat16."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def is_4bit(module) -> bool:
    return type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes")


def _float32_output(module, args, output):
    """Forward hook: a 4-bit layer's 16-bit product handed on in float32, as bitsandbytes does on a float32 input."""
    import torch

    return output.float() if output.dtype in (torch.bfloat16, torch.float16) else None


def hands_on_float32() -> bool:
    """Whether 4-bit layers computing in 16 bits hand their output on in float32 (not `PEFT_MAGIC_4BIT_OUT=16`, the
    faster, lossier ablation of the benchmarks)."""
    from ..allocator import env_off

    return not env_off("PEFT_MAGIC_4BIT_OUT", "16", "bf16", "fp16")


def compute_in_16_bit(model, mixed_precision: str):
    """Set `model`'s 4-bit layers to multiply in the run's 16-bit type and hand their output on in float32; returns
    what restores their own."""
    from ..devices import autocast_type

    dtype = autocast_type(mixed_precision)
    if dtype is None:
        return lambda: None
    changed, handles = [], []
    float32_out = hands_on_float32()
    for module in model.modules():
        if not is_4bit(module):
            continue
        if getattr(module, "compute_dtype", None) != dtype:
            changed.append((module, module.compute_dtype, getattr(module, "compute_type_is_set", False)))
            module.compute_dtype, module.compute_type_is_set = dtype, True
        if float32_out:
            handles.append(module.register_forward_hook(_float32_output))

    def release():
        for module, dtype_before, was_set in changed:
            module.compute_dtype, module.compute_type_is_set = dtype_before, was_set
        for h in handles:
            h.remove()

    return release
