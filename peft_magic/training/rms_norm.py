"""Under bf16 autocast, RMSNorms that keep no float32 tensor for backward.

Llama-style RMSNorm computes `weight * (x * rsqrt(mean(x**2) + eps))` in float32 on the float32 residual stream,
and autograd keeps `x` (and the per-token `rsqrt`) for backward: the stream itself, 4 bytes per element, two norms
per block, ~27% of what a SmolLM2-135M LoRA step keeps under bf16 (2 x 576 floats per token per block, where the
rest of the block keeps ~12.5 KB). Nothing else keeps the stream (the residual additions keep nothing). `RMSNormFn`
runs the model's own ops in its order (the output bit for bit: the loss does not move) and keeps the exact float32
`rsqrt` and, with a frozen weight without zeros (LoRA and the other adapters), the output's bf16 copy: the copy the
q/k/v and gate/up layers keep anyway (training/frozen_casts.py's `half_norm_outputs` takes it from here), so the
pre-norms keep nothing of their own; backward remakes the normalised input as `copy / weight`. Otherwise (a
trained or zero-holding weight) it keeps `x`'s bf16 copy and remakes `x16 * rsqrt`. Either way the remade value is
off by at most bf16's rounding (2**-9 relative), the precision every matmul's backward already has under bf16
autocast, and the gradient is the closed form `rstd * (g - xhat * mean(g * xhat))`, `g = grad * weight`.

bf16 only (its range is float32's; fp16's is not, and a residual stream can exceed it), and only for the classes
of an allow-list whose forward is exactly that formula (transformers 5). `norms_keep_16_bit(model,
mixed_precision)` gives them this forward for the run, under `train.kernels` not `none`, and returns what restores
the model's own.
"""

from __future__ import annotations

import types

from .chunked_loss import autocast_dtype

# the classes whose forward is `weight * (x.float() * rsqrt(x.float().pow(2).mean(-1) + eps)).to(x.dtype)`
RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "GraniteRMSNorm"})


def _rms_norm_fn():
    import torch

    class RMSNormFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, eps, keep_dtype, from_output):
            xf = x.to(torch.float32)
            rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
            y = weight * (xf * rstd).to(x.dtype)
            ctx.dtype, ctx.from_output = x.dtype, from_output
            if from_output:  # the output's 16-bit copy, which the layers reading it keep anyway (frozen_casts.py)
                kept = y.to(keep_dtype)
                _HANDOFF.append(kept)
            else:
                kept = x.to(keep_dtype)
            ctx.save_for_backward(kept, weight, rstd)
            return y

        @staticmethod
        def backward(ctx, grad):
            kept, weight, rstd = ctx.saved_tensors
            if ctx.from_output:
                xhat = kept.to(torch.float32).div_(weight.to(torch.float32))
            else:
                xhat = kept.to(torch.float32).mul_(rstd)
            grad_w = None
            if ctx.needs_input_grad[1]:
                grad_w = (grad * xhat.to(ctx.dtype)).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
            grad_x = None
            if ctx.needs_input_grad[0]:
                g = (grad * weight).to(ctx.dtype).to(torch.float32)  # rounded to x's dtype, as autograd's
                dot = (g * xhat).mean(-1, keepdim=True)
                grad_x = g.sub_(xhat.mul_(dot)).mul_(rstd).to(ctx.dtype)
            return grad_x, grad_w, None, None, None

    return RMSNormFn


_FN = None
_HANDOFF: list = []  # the 16-bit output copy made in forward, for `rms_norm` to attach to the output


def rms_norm(x, weight, eps: float, keep_dtype, from_output: bool = False):
    """`weight * (x * rsqrt(mean(x**2) + eps))` in float32, as Llama's RMSNorm, keeping for backward the
    per-token reciprocal root and `x` in `keep_dtype`, or (`from_output`: a frozen weight without zeros) the
    output in `keep_dtype`, attached to the output as `_peft_magic_copy16` for the layers that read it."""
    global _FN
    if _FN is None:
        _FN = _rms_norm_fn()
    _HANDOFF.clear()
    out = _FN.apply(x, weight, eps, keep_dtype, from_output)
    if _HANDOFF:
        out._peft_magic_copy16 = _HANDOFF.pop()
    return out


def _from_output(module) -> bool:
    """The normalised input can be remade from the output: a frozen weight without zeros (checked again only when
    the weight is written)."""
    w = module.weight
    if w.requires_grad:
        return False
    if module.__dict__.get("_peft_magic_checked") != w._version:
        module._peft_magic_nonzero = bool((w != 0).all())
        module._peft_magic_checked = w._version
    return module._peft_magic_nonzero


def _forward(self, hidden_states):
    import torch

    if autocast_dtype(hidden_states) != torch.bfloat16 or hidden_states.dtype != torch.float32 or \
            not (hidden_states.requires_grad or self.weight.requires_grad):  # fmt: skip
        return self._peft_magic_own_forward(hidden_states)
    return rms_norm(hidden_states, self.weight, self.variance_epsilon, torch.bfloat16, _from_output(self))


def norms_keep_16_bit(model, mixed_precision: str):
    """Give `model`'s allow-listed RMSNorms the forward above for a bf16 run; returns a function that removes it
    (a no-op when nothing qualifies)."""
    if mixed_precision != "bf16":
        return lambda: None
    patched = []
    for module in model.modules():
        if type(module).__name__ in RMS_NORMS and hasattr(module, "variance_epsilon") and \
                "forward" not in module.__dict__:  # fmt: skip
            module._peft_magic_own_forward = module.forward
            module.forward = types.MethodType(_forward, module)
            patched.append(module)

    def release():
        for module in patched:
            for name in ("forward", "_peft_magic_own_forward", "_peft_magic_checked", "_peft_magic_nonzero"):
                module.__dict__.pop(name, None)

    return release
