"""LoRA's dropout on CPU with a one-bit mask drawn from 16 random bits per element.

peft puts an `nn.Dropout` before each LoRA A matrix (`lora_dropout`), seven per block of a Llama-style model with
`all-linear`. On CPU, torch's dropout draws each element with `bernoulli_` (one 32-bit Mersenne-Twister draw and
a float compare per element), divides the noise by 1 - p and multiplies, and keeps that float32 noise tensor for
backward: 4 bytes per element of every LoRA input. On SmolLM2-135M with batches of 8 x ~300 tokens this was the
largest single cost of a training step (19% of the CPU time in `bernoulli_` alone).

`MaskDropout` does the same thing with less: 16 random bits per element (one 32-bit draw gives two elements),
a compare against a threshold, one multiply by the mask and the scale, and the mask kept for backward packed to one
bit per element (eight flags to a byte in int64 arithmetic, `_pack`/`_unpack`: a few percent of the draw's time).
Each element is dropped with probability p rounded to 1/65536 (0.05 -> 0.0500031), and kept elements are scaled by
1 / (1 - that p), so the expectation is unchanged, exactly as `nn.Dropout` does for its own p. It draws from
torch's default generator, so seeds, exact resume and activation checkpointing (which replays the RNG state)
behave as with `nn.Dropout`. In eval mode it is the identity.

Before LoRA's A the dropout goes further: `DroppedLinear` (A's own class, re-classed in place) draws the same
mask, multiplies and keeps only A's *input* and the mask for backward, and remakes the dropped input there (one
multiply) for A's gradient. Sibling layers read one input (q, k and v the attention's norm output; gate and up the
MLP's), so one tensor is kept for three (two) adapters where each kept its own dropped copy: ~10% of a LoRA
step's saved activations on Llama-style blocks. The draws, the forward and the gradients are those of `MaskDropout`
followed by `nn.Linear`. Under bf16/fp16 autocast the input it gets and keeps is the norm output's one 16-bit copy
(training/frozen_casts.py, `half_norm_outputs`), dropped in 16 bits: 2 bytes per element where the float32 output
took 4, and the dropped input one rounding from autocast's cast of the float32 one.

Per token and block of SmolLM2-135M under bf16 autocast (r=16, all-linear, p 0.05), what autograd keeps for
backward went from 27.7 KB to 21.0 KB with the one-bit mask and the 16-bit input (saved-tensor hooks).

`use_mask_dropout(model)` makes both swaps (peft's `lora_dropout` into A, a model's own hidden dropout), only on
CPU (on GPUs torch's fused dropout already keeps a bool mask) and only where `train.kernels` is not `none`.
"""

from __future__ import annotations

import torch

from .swiglu import remade_from

_LEVELS = 1 << 16


def _threshold(p: float) -> tuple[int, float]:
    """(int16 threshold, scale): a uniform int16 below the threshold is dropped, with probability round(p * 65536)
    / 65536; kept elements are scaled by 1 / (1 - that probability)."""
    dropped = min(round(p * _LEVELS), _LEVELS - 1)  # p just below 1 must not round to 'drop everything'
    return dropped - _LEVELS // 2, 1.0 / (1.0 - dropped / _LEVELS)


def _keep_mask(shape, threshold: int, device):
    """0/1 mask, 1 where kept, in a buffer rounded up to whole bytes of bits (`_pack`): two uniform 16-bit
    lanes from each full-range 32-bit draw, compared in one contiguous pass (int64 draws give three usable lanes of
    four, but the strided compare costs more than it saves). Returns (the mask of `shape`, its padded buffer)."""
    n = 1
    for d in shape:
        n *= d
    bits = torch.empty((n + 1) // 2, dtype=torch.int32, device=device).random_(-(2**31), 2**31)
    buf = torch.empty(-(-n // 8) * 8, dtype=torch.bool, device=device)
    buf[n:] = False
    torch.ge(bits.view(torch.int16)[:n], threshold, out=buf[:n])
    return buf[:n].view(torch.uint8).view(shape), buf  # 0/1 bytes multiply faster than bools


def _as_factor(keep, x):
    """The 0/1 byte mask as a factor for `x`: 16-bit floats multiply by the bytes directly, float32 by a float32
    copy (a float32 x uint8 multiply takes torch's slow mixed-type path: ~18x a float32 one on one core)."""
    return keep if x.dtype.itemsize == 2 else keep.to(x.dtype)


# Eight one-byte flags <-> the eight bits of one byte, eight at a time in int64 arithmetic (wrapping): a byte's
# flag i lands on bit 56 + i of the product with _GATHER (all partial products are distinct powers of two, so
# nothing carries); a byte copied into all eight bytes keeps bit i in byte i under _SPREAD, and adding 0x7f to each
# byte (never carrying: at most 0x80 + 0x7f) moves "nonzero" to its bit 7, shifted down to a 0/1 byte.
_GATHER = 0x0102040810204080
_SPREAD = 0x8040201008040201 - (1 << 64)
_COPY, _NONZERO, _ONES = 0x0101010101010101, 0x7F7F7F7F7F7F7F7F, 0x0101010101010101


def _pack(buf):
    """A padded bool buffer (`_keep_mask`) as one bit per element: an eighth of a byte kept for backward."""
    return ((buf.view(torch.uint8).view(torch.int64) * _GATHER) >> 56).to(torch.uint8)


def _unpack(packed, shape):
    """The 0/1 uint8 mask of `shape` back from `_pack`'s bits."""
    n = 1
    for d in shape:
        n *= d
    flags = packed.to(torch.int64).mul_(_COPY).bitwise_and_(_SPREAD).add_(_NONZERO)
    return flags.bitwise_right_shift_(7).bitwise_and_(_ONES).view(torch.uint8)[:n].view(shape)


class _MaskDropoutFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, threshold: int, scale: float):
        keep, buf = _keep_mask(x.shape, threshold, x.device)
        ctx.save_for_backward(_pack(buf))
        ctx.scale = scale
        return x.mul(_as_factor(keep, x)).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (packed,) = ctx.saved_tensors
        return grad.mul(_as_factor(_unpack(packed, grad.shape), grad)).mul_(ctx.scale), None, None


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


class _DroppedLinearFn(torch.autograd.Function):
    """linear(dropout(x), weight) keeping x and a one-bit mask, not the dropped copy. Under autocast the dropped
    input and the weight are cast as autocast would cast them, and the gradients go back in their own types."""

    @staticmethod
    def forward(ctx, x, weight, threshold: int, scale: float, dtype, remake=None):
        keep, buf = _keep_mask(x.shape, threshold, x.device)
        # x itself, or (a product of swiglu.silu_mul) the tensors it is remade from, kept for that product anyway
        sources = (x,) if remake is None else remake[1:]
        ctx.save_for_backward(_pack(buf), weight, *sources)
        ctx.scale, ctx.dtype, ctx.shape, ctx.x_dtype = scale, dtype, x.shape, x.dtype
        ctx.remake = None if remake is None else remake[0]
        return torch.nn.functional.linear(x.mul(_as_factor(keep, x)).mul_(scale).to(dtype), weight.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        packed, weight, *sources = ctx.saved_tensors
        keep = _unpack(packed, ctx.shape)
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            if ctx.remake is None:
                (x,) = sources
            else:
                with torch.no_grad():
                    x = ctx.remake(*sources)
        if ctx.needs_input_grad[0]:
            grad_x = grad.matmul(weight.to(grad.dtype)).to(ctx.x_dtype)
            grad_x = grad_x.mul_(_as_factor(keep, grad_x)).mul_(ctx.scale)
        if ctx.needs_input_grad[1]:
            dropped = x.mul(_as_factor(keep, x)).mul_(ctx.scale).to(ctx.dtype)
            grad_w = grad.reshape(-1, grad.shape[-1]).t().matmul(dropped.reshape(-1, x.shape[-1])).to(weight.dtype)
        return grad_x, grad_w, None, None, None, None


class DroppedLinear(torch.nn.Linear):
    """LoRA's A with its dropout inside (see the module doc). Only ever made by re-classing a bias-free
    `nn.Linear` (`fuse_lora_dropout`): same parameter, same state-dict keys; in eval mode a plain `nn.Linear`."""

    def forward(self, x):
        if not self.training:  # in training mode it drops under no_grad too, as the Dropout it replaces did
            return super().forward(x)
        from .chunked_loss import autocast_dtype

        dtype = autocast_dtype(x) or torch.promote_types(x.dtype, self.weight.dtype)
        return _DroppedLinearFn.apply(x, self.weight, self.threshold, self.scale, dtype, remade_from(x))


def fuse_lora_dropout(model, device):
    """Move the dropout of each vanilla LoRA layer (p in (0, 1)) into its A matrix on CPU; returns a function that
    undoes it (peft's own `nn.Dropout` and `nn.Linear` back, for whatever runs after the run)."""
    if torch.device(device).type != "cpu":
        return lambda: None
    from peft.tuners.lora import LoraLayer

    fused = []
    for layer in model.modules():
        if not isinstance(layer, LoraLayer):
            continue
        for name, dropout in list(layer.lora_dropout.items()):
            a = layer.lora_A[name] if name in layer.lora_A else None
            if (type(dropout) is not torch.nn.Dropout or not 0.0 < dropout.p < 1.0 or dropout.inplace
                    or type(a) is not torch.nn.Linear or a.bias is not None
                    or name in getattr(layer, "lora_variant", {})):  # fmt: skip
                continue  # DoRA and other variants read the dropped input themselves
            threshold, scale = _threshold(dropout.p)
            a.__class__, a.threshold, a.scale = DroppedLinear, threshold, scale
            layer.lora_dropout[name] = torch.nn.Identity()
            fused.append((layer, name, dropout, a))

    def release():
        for layer, name, dropout, a in fused:
            a.__class__ = torch.nn.Linear
            del a.threshold, a.scale
            layer.lora_dropout[name] = dropout

    return release


def use_mask_dropout(model, device):
    """Swap `MaskDropout` in for every plain `nn.Dropout` of `model` when training on CPU: peft's LoRA dropout
    (into A itself, `fuse_lora_dropout`) and the model's own (BERT's hidden and embedding dropout). Modules that
    read only `.p` (an attention module passing it to sdpa) see the same p. Returns a function that puts LoRA's
    dropout back as peft made it (the model's own stay `MaskDropout`, the identity in eval mode)."""
    if torch.device(device).type != "cpu":
        return lambda: None
    release = fuse_lora_dropout(model, device)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Dropout and not child.inplace and 0.0 < child.p < 1.0:
                setattr(module, name, MaskDropout(child.p).train(child.training))
    return release
