"""Under bf16 autocast, an RMSNorm that keeps its input for backward in bf16, not float32.

Llama-style RMSNorm computes `weight * (x * rsqrt(mean(x**2) + eps))` in float32 on the float32 residual stream,
and autograd keeps `x` (and the per-token `rsqrt`) for backward: the stream itself, 4 bytes per element, two norms
per block, ~27% of what a SmolLM2-135M LoRA step keeps under bf16 (2 x 576 floats per token per block, where the
rest of the block keeps ~12.5 KB). Nothing else keeps the stream (the residual additions keep nothing), so
`RMSNormFn` keeping a bf16 copy of `x` and the exact float32 `rsqrt` frees it: 2 bytes per element. The forward is
the model's own ops in its order, on the float32 `x` (bit for bit: the loss does not move); the backward remakes
the normalised `x` from the copy, `x16 * rsqrt`, off by at most bf16's rounding (2**-9 relative), the precision
every matmul's backward already has under bf16 autocast, and the gradient is the closed form
`rstd * (g - xhat * mean(g * xhat))`, `g = grad * weight`. A trainable weight's gradient uses the same remade
`xhat`.

bf16 only (its range is float32's; fp16's is not, and a residual stream can exceed it), and only for the classes
of an allow-list whose forward is exactly that formula (transformers 5). `keep_input_16(model)` gives them this
forward for the run, under `train.kernels` not `none`, and returns what restores the model's own.
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
        def forward(ctx, x, weight, eps, keep_dtype):
            xf = x.to(torch.float32)
            rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
            ctx.dtype = x.dtype
            ctx.save_for_backward(x.to(keep_dtype), weight, rstd)
            return weight * (xf * rstd).to(x.dtype)

        @staticmethod
        def backward(ctx, grad):
            kept, weight, rstd = ctx.saved_tensors
            xhat = kept.to(torch.float32) * rstd
            grad_w = None
            if ctx.needs_input_grad[1]:
                grad_w = (grad * xhat.to(ctx.dtype)).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
            grad_x = None
            if ctx.needs_input_grad[0]:
                g = (grad * weight).to(ctx.dtype).to(torch.float32)  # rounded to x's dtype, as autograd's
                dot = (g * xhat).mean(-1, keepdim=True)
                grad_x = g.sub_(xhat.mul_(dot)).mul_(rstd).to(ctx.dtype)
            return grad_x, grad_w, None, None

    return RMSNormFn


_FN = None


def rms_norm(x, weight, eps: float, keep_dtype):
    """`weight * (x * rsqrt(mean(x**2) + eps))` in float32, as Llama's RMSNorm, keeping `x` in `keep_dtype` and
    the per-token reciprocal root for backward."""
    global _FN
    if _FN is None:
        _FN = _rms_norm_fn()
    return _FN.apply(x, weight, eps, keep_dtype)


def _forward(self, hidden_states):
    import torch

    if autocast_dtype(hidden_states) != torch.bfloat16 or hidden_states.dtype != torch.float32 or \
            not (hidden_states.requires_grad or self.weight.requires_grad):  # fmt: skip
        return self._peft_magic_own_forward(hidden_states)
    return rms_norm(hidden_states, self.weight, self.variance_epsilon, torch.bfloat16)


def keep_input_16(model, mixed_precision: str):
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
            module.__dict__.pop("forward", None)
            module.__dict__.pop("_peft_magic_own_forward", None)

    return release
