"""LoRA's dropout on CPU with a one-byte mask drawn from 16 random bits per element.

peft puts an `nn.Dropout` before each LoRA A matrix (`lora_dropout`), seven per block of a Llama-style model with
`all-linear`. On CPU, torch's dropout draws each element with `bernoulli_` (one 32-bit Mersenne-Twister draw and
a float compare per element), divides the noise by 1 - p and multiplies, and keeps that float32 noise tensor for
backward: 4 bytes per element of every LoRA input. On SmolLM2-135M with batches of 8 x ~300 tokens this was the
largest single cost of a training step (19% of the CPU time in `bernoulli_` alone).

`MaskDropout` does the same thing with less: 16 random bits per element (one 32-bit draw gives two elements),
a compare against a threshold, one multiply by the mask and the scale, and a one-byte mask kept for backward.
Each element is dropped with probability p rounded to 1/65536 (0.05 -> 0.0500031), and kept elements are scaled by
1 / (1 - that p), so the expectation is unchanged, exactly as `nn.Dropout` does for its own p. It draws from
torch's default generator, so seeds, exact resume and activation checkpointing (which replays the RNG state)
behave as with `nn.Dropout`. In eval mode it is the identity.

`use_mask_dropout(model)` swaps it in for the plain `nn.Dropout` modules (peft's `lora_dropout`, a model's own
hidden dropout), only on CPU (on GPUs torch's fused dropout already keeps a one-byte mask) and only where
`train.kernels` is not `none`.
"""

from __future__ import annotations

import torch

_LEVELS = 1 << 16


def _threshold(p: float) -> tuple[int, float]:
    """(int16 threshold, scale): a uniform int16 below the threshold is dropped, with probability round(p * 65536)
    / 65536; kept elements are scaled by 1 / (1 - that probability)."""
    dropped = min(round(p * _LEVELS), _LEVELS - 1)  # p just below 1 must not round to 'drop everything'
    return dropped - _LEVELS // 2, 1.0 / (1.0 - dropped / _LEVELS)


def _keep_mask(shape, threshold: int, device):
    """uint8 mask, 1 where kept: two uniform 16-bit lanes from each full-range 32-bit draw, compared in one
    contiguous pass (int64 draws give three usable lanes of four, but the strided compare costs more than it saves)."""
    n = 1
    for d in shape:
        n *= d
    bits = torch.empty((n + 1) // 2, dtype=torch.int32, device=device).random_(-(2**31), 2**31)
    return (bits.view(torch.int16)[:n] >= threshold).view(torch.uint8).view(shape)


class _MaskDropoutFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, threshold: int, scale: float):
        keep = _keep_mask(x.shape, threshold, x.device)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None


class MaskDropout(torch.nn.Module):
    """`nn.Dropout(p)` with a 1-byte mask from 16 random bits per element (see the module doc)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.threshold, self.scale = _threshold(p)

    def forward(self, x):
        if not self.training or self.threshold == -_LEVELS // 2:  # eval, or p rounds to 0
            return x
        return _MaskDropoutFn.apply(x, self.threshold, self.scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_mask_dropout(model, device) -> int:
    """Swap `MaskDropout` in for every plain `nn.Dropout` of `model` when training on CPU: peft's LoRA dropout
    (`lora_dropout`) and the model's own (BERT's hidden and embedding dropout). Modules that read only `.p` (an
    attention module passing it to sdpa) see the same p. Returns how many were swapped (0 on other devices)."""
    if torch.device(device).type != "cpu":
        return 0
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Dropout and not child.inplace and 0.0 < child.p < 1.0:
                setattr(module, name, MaskDropout(child.p).train(child.training))
                swapped += 1
    return swapped
