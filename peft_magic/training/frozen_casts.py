"""What autocast casts again at every step, cast once per run: frozen Linear weights and pre-norm outputs.

Frozen weights. Autocast caches its casts of leaf tensors that require grad only, so under bf16/fp16 mixed
precision every frozen float32 base-layer weight of a LoRA model is cast to 16 bits at every forward (and again at
each recompute under activation checkpointing), and the cast copy is kept for backward. `cache_frozen_weights`
keeps one 16-bit copy of each frozen plain `nn.Linear`'s weight (and bias) for the run; under autocast to that
type the layer multiplies with the copy, which is bit for bit the tensor autocast would have made, so the result
and the gradients are identical. The parameters themselves are never touched: the model stays float32 (its
`dtype`, state dict, checkpoints, exports and merges), and a forward outside autocast (greedy samples, checks
that compare in float32, a reference model's forward) multiplies with the float32 weight as before. A weight
written during the run (a checkpoint load) is cast again at its next use (its version counter moved). Not for
quantized layers (not plain `nn.Linear`), trainable weights, or a weight shared with another module (tied
embeddings). The cost: a 16-bit copy of the frozen linear weights held for the whole run, so only runs without
activation checkpointing get it (there autocast's own copies were all alive at the backward anyway).

Float32 originals on disk. On CPU the float32 weights the copies stand in for are not read again until the run
ends (a forward under autocast multiplies with the copy), so for the run they wait in a file, mapped read-on-demand
(`offload_originals`), not in RAM: 4 bytes per frozen linear weight off the run's resident memory (0.42 GB for
SmolLM2-135M, 4 GB for a 1B model), for one write of them when the run starts (~0.3 s per GB to the page cache).
The tensors keep their dtype, shape and values; anything that reads one (a float32 forward outside autocast, a
merge) reads it from the file; anything that writes one (a checkpoint's load) writes to private memory (the
mapping is copy-on-write); at the end of the run they are copied back into memory. Only where a real disk holds the
temporary folder (not tmpfs, whose files are RAM) with room to spare, on Linux; `PEFT_MAGIC_OFFLOAD=0` turns it off.

Norm outputs. In pre-norm decoders (Llama, Mistral, Qwen2/3, Granite) the RMSNorm before the attention and
before the MLP returns float32, and each of q/k/v (gate/up) casts that same tensor to 16 bits separately and keeps
its own copy for backward. `half_norm_outputs` casts each such output once and hands the copy to every plain
`nn.Linear` that reads the output itself (the base layers, LoRA's A when there is no dropout before it, or when
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

from .chunked_loss import autocast_dtype

# model_type -> the pre-norms whose output only feeds linear layers (the attention's q/k/v, the MLP's gate/up)
PRE_NORM_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3", "granite"})
PRE_NORMS = {"input_layernorm": ("self_attn", ("q_proj", "k_proj", "v_proj")),
             "post_attention_layernorm": ("mlp", ("gate_proj", "up_proj"))}  # fmt: skip


def _dtype(mixed_precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)


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

    dtype = _dtype(mixed_precision)
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
    restore = offload_originals(changed)

    def release():
        restore()
        for module in changed:
            for name in ("forward", "_weight16", "_weight16_version", "_bias16"):
                module.__dict__.pop(name, None)

    return release


RAM_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "devtmpfs", "shm"})


def _filesystem(path: str, mounts: str = "/proc/mounts") -> str | None:
    """The type of the filesystem holding `path` (the longest mount point above it), None when unknown."""
    import os

    path, best, kind = os.path.realpath(path), "", None
    try:
        with open(mounts) as fh:
            rows = [line.split() for line in fh]
    except OSError:
        return None
    for row in rows:
        if len(row) >= 3:
            point = row[1].replace("\\040", " ")
            if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                best, kind = point, row[2]
    return kind


def offload_folder(nbytes: int) -> str | None:
    """A temporary folder on a disk with room for `nbytes` and some to spare, or None (not Linux, off, tmpfs)."""
    import os
    import shutil
    import sys
    import tempfile

    if not sys.platform.startswith("linux") or os.environ.get("PEFT_MAGIC_OFFLOAD", "1").strip() in ("0", "off"):
        return None
    for folder in (tempfile.gettempdir(), "/var/tmp"):
        kind = _filesystem(folder)
        if kind is None or kind in RAM_FILESYSTEMS or not os.access(folder, os.W_OK):
            continue
        try:
            if shutil.disk_usage(folder).free > 2 * nbytes + (1 << 30):
                return folder
        except OSError:
            continue
    return None


def offload_originals(modules) -> callable:
    """Move the float32 weights of `modules` (CPU layers multiplying with their 16-bit copies) into a private
    mapping of an unlinked temporary file; returns what copies them back into memory."""
    import os
    import tempfile

    import torch

    moved = [m for m in modules if m.weight.device.type == "cpu" and m.weight.is_contiguous()]
    total = sum(m.weight.numel() for m in moved)
    folder = offload_folder(4 * total) if total else None
    if folder is None:
        return lambda: None
    fd, path = tempfile.mkstemp(prefix="peft_magic-frozen-", suffix=".f32", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            for m in moved:
                fh.write(m.weight.detach().numpy().data)
        mapped = torch.from_file(path, shared=False, size=total, dtype=torch.float32)
    except (OSError, RuntimeError):
        return lambda: None
    finally:
        os.unlink(path)  # the mapping keeps the file's pages until it goes
    offset = 0
    for m in moved:
        n = m.weight.numel()
        m.weight.data = mapped[offset : offset + n].view_as(m.weight)
        m._weight16_version = _versions(m)  # the same values: the copy stands
        offset += n
    ptr = mapped.untyped_storage().data_ptr()
    _MAPPED[ptr] = 4 * total
    del mapped

    def restore():
        _MAPPED.pop(ptr, None)
        for module in moved:
            w = module.weight
            if w.untyped_storage().data_ptr() == ptr:  # still the mapping (not replaced meanwhile)
                w.data = w.data.clone()

    return restore


_MAPPED: dict = {}  # address -> bytes of the live mappings of float32 originals
MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now (clean file pages dropped, written ones kept)


def page_out() -> None:
    """Give back the RAM of float32 originals read during the run (a float32 forward outside autocast, such as the
    chunked loss's one check of the first batch): their pages are the file's, read again if needed. Pages written
    during the run stay (MADV_PAGEOUT drops clean file pages only, where there is no swap). Silent where the kernel
    has no MADV_PAGEOUT."""
    if not _MAPPED:
        return
    import ctypes

    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    for address, nbytes in list(_MAPPED.items()):
        madvise(address, nbytes, MADV_PAGEOUT)


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
        self.source, self.copy = weakref.ref(output), output.detach().to(dtype)

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

    config = getattr(model, "config", None)
    if _dtype(mixed_precision) is None or getattr(config, "model_type", None) not in PRE_NORM_MODELS:
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
                   if type(m) in (torch.nn.Linear, DroppedLinear)]  # fmt: skip
        if not linears:
            continue
        handles.append(module.register_forward_hook(shared.keep))
        handles += [m.register_forward_pre_hook(shared.give) for m in linears]

    def release():
        for h in handles:
            h.remove()
        shared.source = shared.copy = None

    return release
