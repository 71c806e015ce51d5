"""A SwiGLU MLP that keeps two of its three tensors for backward.

Llama-style MLPs compute `down(silu(gate(x)) * up(x))`. Autograd keeps the gate's output (for SiLU's gradient),
SiLU's output and the up projection's output (for the product's gradient): three tensors of the intermediate size
per token, the largest activations of the block (1536 wide against a hidden size of 576 in SmolLM2-135M), ~35% of
what a LoRA step keeps. `SiluMul` keeps the gate and up outputs only and remakes SiLU in backward (a sigmoid and a
multiply over one tensor): a third of the MLP's activations, ~10% of the step's, for a little elementwise work.
And where the down projection's LoRA A has its dropout inside (training/dropout.py, CPU), A keeps gate and up (kept
here anyway) in place of its input, the product, and remakes the product in backward: another third (~15% of what
a SmolLM2 LoRA step keeps under bf16).
The gradients are SiLU's own formula, `g * sigmoid(a) * (1 + a * (1 - sigmoid(a)))`, equal to autograd's to
float rounding.

Under bf16/fp16 autocast with float32 gate and up outputs (a QLoRA block: bitsandbytes' 4-bit layers hand their
output on in float32, training/quantized_cpu.py, and the LoRA update is added to it in float32) the product is
computed in float32 from them and rounded once to 16 bits (what the down projection multiplies under autocast
anyway), and only their 16-bit copies are kept: backward computes from the copies as above, and the down
projection's LoRA A remakes its input from them (to a rounding or two, for A's weight gradient only). The product
from 16-bit gate/up moved the real QLoRA job's step-2 training loss +1.6% off Trainer's (float32 throughout:
benchmarks/sft_equivalence.py); kept copies do not move it. The float32 product is not handed on (down_proj would
cast it anyway): float32 temporaries of the intermediate size cost ~5 ms each on one core in fresh pages.

`keep_two_of_three(model)` gives the MLPs of an allow-listed decoder family (their MLP is exactly that formula with
SiLU) this forward for the run, under `train.kernels` not `none`, and returns what restores the model's own.
"""

from __future__ import annotations

import functools
import types

# model_type -> the MLP is `down_proj(act_fn(gate_proj(x)) * up_proj(x))` (transformers 5)
SWIGLU_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3", "granite"})
SILU = frozenset({"silu", "swish"})


def _silu_mul_grads(gate, up, grad, needs_gate: bool, needs_up: bool):
    """SiLU-times-up's gradients, remaking SiLU from `gate`."""
    import torch

    sig = torch.sigmoid(gate)
    silu = gate * sig
    grad_up = grad * silu if needs_up else None
    grad_gate = None
    if needs_gate:
        # d silu / d a = sig * (1 + a * (1 - sig)) = sig + silu * (1 - sig)
        grad_gate = silu.neg_().add_(gate).mul_(sig).add_(sig).mul_(grad).mul_(up)
    return grad_gate, grad_up


@functools.cache
def _silu_mul():
    """(SiluMul, SiluMulKept16), made on first use (torch is imported lazily)."""
    import torch

    class SiluMul(torch.autograd.Function):
        @staticmethod
        def forward(ctx, gate, up):
            ctx.save_for_backward(gate, up)
            return remake_silu_mul(gate, up)

        @staticmethod
        def backward(ctx, grad):
            return _silu_mul_grads(*ctx.saved_tensors, grad, *ctx.needs_input_grad)

    class SiluMulKept16(torch.autograd.Function):
        """silu(gate) * up from float32 gate/up, rounded once to the copies' 16-bit type (what the down projection
        multiplies under autocast anyway); backward from the 16-bit copies `gate16`, `up16` (made by the caller)."""

        @staticmethod
        def forward(ctx, gate, up, gate16, up16):
            ctx.save_for_backward(gate16, up16)
            return remake_silu_mul(gate, up).to(gate16.dtype)

        @staticmethod
        def backward(ctx, grad):
            return *_silu_mul_grads(*ctx.saved_tensors, grad, *ctx.needs_input_grad[:2]), None, None

    return SiluMul, SiluMulKept16


def silu_mul(gate, up):
    """silu(gate) * up, keeping `gate` and `up` for backward (not SiLU's output too), or when they are float32
    under 16-bit autocast their 16-bit copies (the product then 16-bit too). The product carries how to remake it
    (`remade_from`): the down projection's LoRA A with dropout inside (training/dropout.py) keeps what is kept here
    anyway instead of the product, and remakes it in backward (bit for bit; from the copies, to a rounding)."""
    from .chunked_loss import autocast_dtype

    plain, kept16 = _silu_mul()
    dtype = autocast_dtype(gate) if gate.dtype == up.dtype and gate.dtype.itemsize == 4 else None
    if dtype is not None and dtype.itemsize == 2:
        gate16, up16 = gate.detach().to(dtype), up.detach().to(dtype)
        out = kept16.apply(gate, up, gate16, up16)
        out._peft_magic_remake = (remake_silu_mul, gate16, up16)  # to a 16-bit rounding or two of the product
    else:
        out = plain.apply(gate, up)
        out._peft_magic_remake = (remake_silu_mul, gate, up)
    out._peft_magic_kept = gate.requires_grad or up.requires_grad  # kept here for backward, so free to remake from
    return out


def remake_silu_mul(gate, up):
    """The forward's product again, by the same ops in the same dtype (bit for bit)."""
    import torch

    return torch.nn.functional.silu(gate).mul_(up)


def remade_from(x):
    """(function, *tensors) that remake `x` when `x` is a product of `silu_mul` whose backward keeps those tensors
    anyway (its gate or up requires grad), else None."""
    remake = getattr(x, "_peft_magic_remake", None)
    return remake if remake is not None and getattr(x, "_peft_magic_kept", False) else None


def _forward(self, x):
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def keep_two_of_three(model):
    """Give `model`'s SwiGLU MLPs the forward above when its family is allow-listed and its activation is SiLU;
    returns a function that removes it (a no-op when nothing qualifies)."""
    config = getattr(model, "config", None)
    act = getattr(config, "hidden_act", None)
    if getattr(config, "model_type", None) not in SWIGLU_MODELS or act not in SILU:
        return lambda: None
    patched = []
    for module in model.modules():
        if all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")) and \
                "forward" not in module.__dict__:  # fmt: skip
            module.forward = types.MethodType(_forward, module)
            patched.append(module)

    def release():
        for module in patched:
            module.__dict__.pop("forward", None)

    return release
