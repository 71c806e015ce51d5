"""What autocast casts again at every step, cast once per run: frozen Linear weights and pre-norm outputs.

Frozen weights. Autocast caches its casts of leaf tensors that require grad only, so under bf16/fp16 mixed
precision every frozen float32 base-layer weight of a LoRA model is cast to 16 bits at every forward (and again at
each recompute under activation checkpointing), and the cast copy is kept for backward. `cache_frozen_weights`
keeps one 16-bit copy of each frozen plain `nn.Linear`'s weight (and bias) for the run; under autocast to that
type the layer multiplies with the copy, which is bit for bit the tensor autocast would have made, so the result
and the gradients are identical. The parameters' values are never changed: the model stays float32 (its
`dtype`, state dict, checkpoints, exports and merges), and a forward outside autocast (greedy samples, checks
that compare in float32, a reference model's forward) multiplies with the float32 weight as before. A weight
written during the run (a checkpoint load) is cast again at its next use (its version counter moved). Not for
quantized layers (not plain `nn.Linear`), trainable weights, or a weight shared with another module (tied
embeddings). The cost: a 16-bit copy of the frozen linear weights held for the whole run, so only runs without
activation checkpointing get it (there autocast's own copies were all alive at the backward anyway). On CPU the
float32 originals wait on disk meanwhile (training/offload.py), so the copies cost 2 bytes per weight less than
nothing.

Norm outputs. In pre-norm decoders (Llama, Mistral, Qwen2/3, Granite) the RMSNorm before the attention and
before the MLP returns float32, and each of q/k/v (gate/up) casts that same tensor to 16 bits separately and keeps
its own copy for backward. `half_norm_outputs` casts each such output once and hands the copy to every plain
`nn.Linear` that reads the output itself (the base layers, bitsandbytes' 4-bit base layers, which ignore autocast
and then multiply in 16 bits too (quantized_cpu.py), LoRA's A when there is no dropout before it, or when
its dropout is inside A: training/dropout.py's `DroppedLinear`, which then keeps the 16-bit copy for backward
instead of the float32 output, and drops in 16 bits: its dropped input differs from autocast's cast of the float32
one by a rounding); a separate LoRA dropout still receives the float32 output, as before. Each layer's gradient goes back cast to float32, as from
autocast's own cast, so the gradients add up in float32 as before: forward and backward are bit for bit the same,
with 3 (attention) and 2 (MLP) casts and saved copies per block down to one. Only by an allow-list of
architectures and of norm names (Gemma 2/3's sandwich norms and BERT-style post-norms feed the residual stream).

Both only under `train.kernels` not `none`, only for runs under bf16/fp16 mixed precision, and undone after the
run (engine.Loop.release_casts).
"""

from __future__ import annotations

import weakref

from ..devices import autocast_type
from .chunked_loss import autocast_dtype

# model_type -> the pre-norms whose output only feeds linear layers (the attention's q/k/v, the MLP's gate/up)
PRE_NORM_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3", "granite"})
PRE_NORMS = {"input_layernorm": ("self_attn", ("q_proj", "k_proj", "v_proj")),
             "post_attention_layernorm": ("mlp", ("gate_proj", "up_proj"))}  # fmt: skip


def _linear16_forward(self, x):
    """nn.Linear's forward, with the run's 16-bit copy of the weight under autocast to that type."""
    import torch.nn.functional as F

    weight, bias = self.weight, self.bias
    if autocast_dtype(x) == self._weight16.dtype:
        if _versions(self) != self._weight16_version:  # written since the copy was made (a checkpoint's load)
            _copy16(self, self._weight16.dtype)
        weight, bias = self._weight16, self._bias16
    return F.linear(x, weight, bias)


def _versions(module) -> tuple:
    return module.weight._version, None if module.bias is None else module.bias._version


def _copy16(module, dtype) -> None:
    w, b = module.weight, module.bias
    module._weight16, module._weight16_version = w.detach().to(dtype), _versions(module)
    module._bias16 = None if b is None else b.detach().to(dtype)


def cache_frozen_weights(model, mixed_precision: str):
    """Give each frozen, unshared plain `nn.Linear` of `model` a 16-bit copy of its weight for a run under
    `mixed_precision`; returns a function that drops the copies (a no-op for other precisions)."""
    import types

    import torch

    dtype = autocast_type(mixed_precision)
    if dtype is None:
        return lambda: None
    uses: dict = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    changed = []
    for module in model.modules():
        if type(module) is not torch.nn.Linear or "forward" in module.__dict__:
            continue
        w, b = module.weight, module.bias
        if w.requires_grad or w.dtype != torch.float32 or uses[id(w)] > 1:
            continue
        if b is not None and (b.requires_grad or uses[id(b)] > 1):
            continue
        _copy16(module, dtype)
        module.forward = types.MethodType(_linear16_forward, module)
        changed.append(module)
    from .offload import offload_originals

    restore = offload_originals(changed)
    for module in changed:  # moved to disk or not, the values are the same: the copies stand
        module._weight16_version = _versions(module)

    def release():
        restore()
        for module in changed:
            for name in ("forward", "_weight16", "_weight16_version", "_bias16"):
                module.__dict__.pop(name, None)

    return release


class _Shared16:
    """The norm output of the current block and its one 16-bit copy: each linear layer that reads the output gets
    the copy under autocast, and its gradient goes back to the float32 output cast to float32, as autocast's own
    cast sends it (so the layers' gradients still add up in float32)."""

    def __init__(self):
        import torch

        class Alias(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, x16):
                return x16.view_as(x16)

            @staticmethod
            def backward(ctx, grad):
                return grad.to(torch.float32), None

        self.alias, self.source, self.copy = Alias, None, None

    def keep(self, module, args, output):
        """Forward hook of a pre-norm: remember its float32 output and cast it once (under autocast only)."""
        import torch

        dtype = autocast_dtype(output)
        if dtype is None or output.dtype != torch.float32:
            self.source = self.copy = None
            return
        copy = getattr(output, "_peft_magic_copy16", None)  # made by training/rms_norm.py, kept by it too
        if copy is None or copy.dtype != dtype:
            copy = output.detach().to(dtype)
        self.source, self.copy = weakref.ref(output), copy

    def give(self, module, args):
        """Forward pre-hook of a linear layer: the copy in place of the remembered output."""
        if not args or self.source is None or args[0] is not self.source():
            return None
        if autocast_dtype(args[0]) != self.copy.dtype:
            return None
        x = self.alias.apply(args[0], self.copy) if args[0].requires_grad else self.copy
        return (x, *args[1:])


def half_norm_outputs(model, mixed_precision: str):
    """Cast the pre-norms' outputs of an allow-listed decoder once per forward for a run under `mixed_precision`;
    returns a function that removes the hooks (a no-op when nothing qualifies)."""
    import torch

    from .dropout import DroppedLinear
    from .quantized_cpu import is_4bit

    config = getattr(model, "config", None)
    if autocast_type(mixed_precision) is None or getattr(config, "model_type", None) not in PRE_NORM_MODELS:
        return lambda: None
    shared, handles = _Shared16(), []
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        if leaf not in PRE_NORMS:
            continue
        parent = model.get_submodule(name.rpartition(".")[0])
        block, readers = PRE_NORMS[leaf]
        block = getattr(parent, block, None)
        linears = [m for r in readers for m in getattr(block, r, torch.nn.Identity()).modules()
                   if type(m) in (torch.nn.Linear, DroppedLinear) or is_4bit(m)]  # fmt: skip
        if not linears:
            continue
        handles.append(module.register_forward_hook(shared.keep))
        handles += [m.register_forward_pre_hook(shared.give) for m in linears]

    def release():
        for h in handles:
            h.remove()
        shared.source = shared.copy = None

    return release
