"""The causal-LM training loss computed only where it is trained, in chunks.

`model(**batch).loss` projects every position onto the whole vocabulary (positions x vocab logits in float32,
plus their gradient: often the largest allocation of a step) and then throws away the prompt and padding
positions (labels == -100). Here the model runs with `logits_to_keep=1` (one position's logits, for the check
below), the final hidden states are taken from its backbone, the positions whose next label is trained are
gathered, and the output layer + cross-entropy run over them `chunk` rows at a time, so at most chunk x vocab
logits exist at once. The gradient flows through the gathered hidden states.

- Frozen plain output layer (LoRA/QLoRA: the usual case): one fused pass per chunk computes the loss and the
  hidden states' gradient together (`_FrozenHeadCE`), so nothing is recomputed in backward.
- Trainable or wrapped output layer (LoRA on lm_head, full fine-tuning of tied embeddings, a quantized head): each
  chunk calls the module itself under activation checkpointing (its logits are recomputed in backward).
- Logit scaling and soft-capping from the model's config (Cohere `logit_scale`, Granite `logits_scaling`, Gemma
  `final_logit_softcapping`) are applied. Whatever else a model does to its logits is caught by a one-time check:
  the last position's logits computed here must equal the model's own; if not, the plain loss is used (said once).

Right-padded batches run without their padding mask (the causal kernel alone; checked once per run, see
`_drop_mask`). The loss is the mean over trained tokens, as transformers' `ForCausalLMLoss` (a batch with no trained token
gives 0 here, NaN there). Evaluation and generation keep `model(...).logits`.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 25  # logits elements per chunk (128 MB in float32): 682 rows for SmolLM2's 49k vocab
_WARNED: set = set()


def _autocasting(tensor) -> bool:
    """Whether autocast to a 16-bit type is on for the device of `tensor` here."""
    import torch

    kind = tensor.device.type
    try:
        return torch.is_autocast_enabled(kind)
    except TypeError:  # torch < 2.4: per-device functions
        return torch.is_autocast_cpu_enabled() if kind == "cpu" else torch.is_autocast_enabled()


def autocast_dtype(tensor):
    """The 16-bit type autocast casts to on the device of `tensor` here, or None when autocast is off."""
    import torch

    if not _autocasting(tensor):
        return None
    kind = tensor.device.type
    try:
        return torch.get_autocast_dtype(kind)
    except AttributeError:  # torch < 2.4
        return torch.get_autocast_cpu_dtype() if kind == "cpu" else torch.get_autocast_gpu_dtype()


def _right_padded(mask) -> bool:
    """Every row of the (2-D) attention mask is real tokens first, then padding (and starts with a real token)."""
    return bool(mask[:, 0].all()) and bool((mask[:, 1:] <= mask[:, :-1]).all())


def plain_loss(model, batch):
    return model(**batch).loss


def _say_once(key, message):
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, stacklevel=3)


def _unwrap(model):
    """The transformers model under DDP/accelerate and peft wrappers."""
    inner = getattr(model, "module", model)  # DDP
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner


def _why_not(model, accelerator=None) -> str | None:
    """Why the chunked loss cannot run on `model` (None when it can)."""
    inner = getattr(model, "module", model)
    peft_config = getattr(inner, "peft_config", None)
    if peft_config and any(getattr(c, "is_prompt_learning", False) for c in peft_config.values()):
        return "prompt-learning methods add virtual tokens to the sequence"
    if peft_config and any(getattr(c, "orth_reg_weight", 0) for c in peft_config.values()):
        return "AdaLoRA adds its orthogonality regulariser to the model's own loss"
    if accelerator is not None and str(getattr(accelerator, "distributed_type", "")).upper().endswith(
        ("FSDP", "DEEPSPEED")
    ):
        return "the output layer is sharded (FSDP/DeepSpeed)"
    base = _unwrap(model)
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return f"{type(base).__name__}.forward has no logits_to_keep"
    backbone = getattr(base, "base_model", None)
    if backbone is None or backbone is base or base.get_output_embeddings() is None:
        return f"{type(base).__name__} has no separate backbone and output layer"
    return None


def _logit_transform(config):
    """(scale, softcap) the model applies to the output layer's result, from its config."""
    scale = 1.0
    if getattr(config, "logit_scale", None) not in (None, 1, 1.0) and isinstance(config.logit_scale, (int, float)):
        scale *= float(config.logit_scale)  # Cohere: logits * logit_scale
    if getattr(config, "logits_scaling", None) not in (None, 1, 1.0):
        scale /= float(config.logits_scaling)  # Granite: logits / logits_scaling
    softcap = getattr(config, "final_logit_softcapping", None) or None  # Gemma 2/3
    return scale, softcap


class _FrozenHeadCE:
    """Loss sum and d(loss sum)/d(hidden) in one pass over chunks, for a frozen `F.linear` output layer.

    Each chunk's logits go into buffers kept for the run (`buffers`, a dict the loss object owns): the 16-bit
    product and its float32 copy, softmax made in place there (max, exp once, sum: no logsumexp temporary) and cast
    back into the 16-bit buffer for the gradient's matmul. A fresh 100 MB-class tensor per chunk is a fresh mmap
    under glibc's malloc, page-faulted in for every chunk of every step (on a 2-core VM: 0.4 s per 134 MB float32
    chunk, more than the chunk's arithmetic); the buffers are faulted in once."""

    @staticmethod
    def apply(hidden, weight, bias, targets, chunk, scale, softcap, buffers=None):
        import torch

        buffers = {} if buffers is None else buffers

        def buffer(name, rows, dtype):
            key = (name, weight.shape[0], dtype, hidden.device)
            have = buffers.get(name)
            if have is None or have[0] != key or have[1].shape[0] < rows:
                grown = min(chunk, max(rows, 2 * have[1].shape[0])) if have is not None and have[0] == key else rows
                buffers[name] = (key, None)  # the old one goes before the new one is allocated
                buffers[name] = (key, torch.empty(grown, weight.shape[0], dtype=dtype, device=hidden.device))
            return buffers[name][1][:rows]

        class Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, h):
                need = h.requires_grad
                grad = torch.empty_like(h) if need else None
                # under autocast, the output layer's weight is cast once per step here, not once per chunk (28M
                # elements for SmolLM2's tied embeddings); the matmuls are the same bf16 ones autocast would run
                dt = autocast_dtype(h) or h.dtype
                w = weight.to(dt)
                b = bias.to(dt) if bias is not None else None
                total = torch.zeros((), dtype=torch.float32, device=h.device)
                rows = min(chunk, h.shape[0])
                for s in range(0, h.shape[0], chunk):
                    hs = h[s : s + chunk].to(dt)
                    n = hs.shape[0]
                    zd = buffer("logits", rows, dt)[:n]
                    if b is None:
                        torch.mm(hs, w.t(), out=zd)
                    else:
                        torch.addmm(b, hs, w.t(), out=zd)
                    z = zd if dt == torch.float32 else buffer("logits32", rows, torch.float32)[:n].copy_(zd)
                    tgt = targets[s : s + chunk, None]
                    if scale != 1.0:
                        z.mul_(scale)
                    if softcap:
                        t = torch.tanh(z / softcap)
                        z.copy_(t).mul_(softcap)
                    top = z.amax(dim=-1, keepdim=True)
                    picked = z.gather(1, tgt)
                    e = z.sub_(top).exp_()
                    sums = e.sum(dim=-1, keepdim=True)
                    total += (top + sums.log() - picked).sum()
                    if need:
                        g = e.mul_(sums.reciprocal_())  # softmax, in place of the logits
                        g.scatter_add_(1, tgt, torch.full_like(tgt, -1, dtype=g.dtype))
                        if softcap:
                            g.mul_(1 - t * t)
                        if scale != 1.0:
                            g.mul_(scale)
                        gd = g if g is zd else zd.copy_(g)
                        grad[s : s + chunk] = gd @ w
                ctx.save_for_backward(grad)
                return total

            @staticmethod
            def backward(ctx, g):
                (grad,) = ctx.saved_tensors
                return grad * g.to(grad.dtype)

        return Fn.apply(hidden)


def _module_chunks(head, hidden, targets, chunk, scale, softcap):
    """Loss sum through the output module itself (trainable or wrapped), each chunk recomputed in backward."""
    import torch
    from torch.utils.checkpoint import checkpoint

    def piece(h, tgt):
        z = head(h).float()
        if scale != 1.0:
            z = z * scale
        if softcap:
            z = torch.tanh(z / softcap) * softcap
        return torch.nn.functional.cross_entropy(z, tgt, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden.shape[0], chunk):
        h, tgt = hidden[s : s + chunk], targets[s : s + chunk]
        total = total + (checkpoint(piece, h, tgt, use_reentrant=False) if torch.is_grad_enabled() else piece(h, tgt))
    return total


class ChunkedCausalLMLoss:
    """`loss(model, batch)`: the mean cross-entropy over trained tokens, without full logits (see module doc)."""

    def __init__(self, model, accelerator=None, chunk_elements: int = CHUNK_ELEMENTS, pads_right: bool = False):
        base = _unwrap(model)
        self.backbone = base.base_model
        self.head = base.get_output_embeddings()
        self.scale, self.softcap = _logit_transform(base.config)
        vocab = getattr(self.head, "out_features", None) or self.head.weight.shape[0]
        self.chunk = max(16, chunk_elements // vocab)
        self.checked = False
        self.fallback = None  # a reason once the one-time check failed
        # batches padded on the right (the collator's tokenizer pads right) run without the padding mask once the
        # first batch showed the model's padding is inert (_drop_mask); None: not checked yet
        self.causal_only = None if pads_right else False
        self.name = type(base).__name__
        # mixed precision: accelerate autocasts the model's forward only; the output layer here runs under the same
        # autocast (bf16 matmuls, float32 loss, as the model's own loss does) and the check compares like with like
        self.autocast = getattr(accelerator, "autocast", None) or contextlib.nullcontext
        self.buffers = {}  # the frozen head's logits buffers, kept for the run (_FrozenHeadCE)

    def _fused(self) -> bool:
        import torch

        head = self.head
        return type(head) is torch.nn.Linear and not any(p.requires_grad for p in head.parameters())

    def _loss_sum(self, hidden, targets):
        if self._fused():
            return _FrozenHeadCE.apply(hidden, self.head.weight, self.head.bias, targets, self.chunk, self.scale,
                                       self.softcap, self.buffers)  # fmt: skip
        return _module_chunks(self.head, hidden, targets, self.chunk, self.scale, self.softcap)

    def __call__(self, model, batch):
        import torch

        if self.fallback or "labels" not in batch:
            return plain_loss(model, batch)
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        self._drop_mask(model, inputs)
        captured = []
        handle = self.backbone.register_forward_hook(lambda m, a, out: captured.append(out[0]))
        try:
            out = model(**inputs, logits_to_keep=1)
        finally:
            handle.remove()
        hidden = captured.pop()
        if not self.checked and not self._agrees(hidden[:, -1], out.logits[:, -1]):
            self.fallback = "its logits differ from the output layer's (the model transforms them in its own way)"
            _say_once(self.name, f"chunked loss off for {self.name}: {self.fallback}; using the plain loss.")
            del out, hidden  # this forward's activations go before the plain loss's forward allocates its own
            return plain_loss(model, batch)
        self.checked = True
        del out
        # position t predicts labels[t + 1]; the last position predicts nothing
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        n = keep.sum()
        selected = hidden[:, :-1][keep]
        with self.autocast():
            total = self._loss_sum(selected, targets[keep])
        return total / n.clamp(min=1).to(total.dtype)

    def _drop_mask(self, model, inputs) -> None:
        """Right-padded rows of a causal model need no padding mask: a real position attends only to earlier
        positions, all real, and padding (after them) is never trained. Without the mask, attention runs its
        causal kernel (on CPU the model's forward + backward took 0.84x the CPU time, benchmarks/cpu_kernels.py)
        and no 4-D mask is built. The collator pads every batch on the right (`pads_right`); the first batch is
        checked once, in float32 and eval mode: a row with the mask hiding its second half must give the same
        hidden states over its first half without the mask. A model whose padding is not inert (bidirectional
        attention, positions from the mask) keeps the mask. After the check no batch is read back (no host sync)."""
        mask = inputs.get("attention_mask")
        if mask is None or self.causal_only is False or "position_ids" in inputs or mask.dim() != 2:
            return
        if self.causal_only is None:
            self.causal_only = _right_padded(mask) and self._padding_is_inert(model, inputs)
            if not self.causal_only:
                return
        del inputs["attention_mask"]

    def _padding_is_inert(self, model, inputs) -> bool:
        import torch

        from .quantized_cpu import hold_training_layout

        mask = inputs["attention_mask"]
        if any(not (torch.is_tensor(v) and v.shape == mask.shape) for k, v in inputs.items()):
            return False  # inputs other than per-token ids (images, ...): keep the mask
        row = int(mask.sum(1).argmax())
        n = int(mask[row].sum())
        one = {k: v[row : row + 1, :n] for k, v in inputs.items() if k != "attention_mask"}
        half = torch.zeros((1, n), dtype=mask.dtype, device=mask.device)
        real = max(1, n // 2)
        half[:, :real] = 1  # the row's second half as padding
        # the transformers model itself: no accelerate autocast wrapper (float32 compares sharply), no DDP hooks
        base = _unwrap(model)
        captured = []
        handle = self.backbone.register_forward_hook(lambda m, a, out: captured.append(out[0].float()))
        was_training = base.training
        release = hold_training_layout(base)  # an eval forward must not repack 4-bit CPU layers (see there)
        base.eval()
        try:
            with torch.no_grad(), torch.autocast(mask.device.type, enabled=False):
                base(**one, attention_mask=half, logits_to_keep=1)
                base(**one, logits_to_keep=1)
        finally:
            handle.remove()
            base.train(was_training)
            release()
        from .offload import page_out

        page_out()  # the float32 forwards read the frozen originals a bf16 run keeps on disk (frozen_casts.py)
        masked, unmasked = captured[0][0, :real], captured[1][0, :real]
        tol = 1e-3 if self.head.weight.dtype == torch.float32 else 3e-2
        return bool(((masked - unmasked).norm() <= tol * masked.norm().clamp(min=1e-6)).item())

    def _agrees(self, hidden_last, model_logits) -> bool:
        import torch

        with torch.no_grad(), self.autocast():
            ours = self.head(hidden_last).float()
            if self.scale != 1.0:
                ours = ours * self.scale
            if self.softcap:
                ours = torch.tanh(ours / self.softcap) * self.softcap
            ref = model_logits.float()
            exact = hidden_last.dtype == torch.float32 and ref.dtype == torch.float32 and not _autocasting(hidden_last)
            tol = 1e-3 if exact else 3e-2
            return bool(((ours - ref).norm() <= tol * ref.norm().clamp(min=1e-6)).item())


def loss_function(model, cfg, accelerator=None, pads_right: bool = False):
    """The training loss for this run: `fn(model, batch) -> scalar`. The chunked loss for causal-LM supervised
    training when `train.kernels` allows it and the model supports it; `model(**batch).loss` otherwise."""
    choice = getattr(cfg.train, "kernels", "auto")
    if cfg.task != "causal-lm" or choice == "none":
        return plain_loss
    why = _why_not(model, accelerator)
    if why is not None:
        if choice == "chunked":
            _say_once(type(_unwrap(model)).__name__, f"train.kernels: chunked is not possible here ({why}); "
                                                     "using the plain loss.")  # fmt: skip
        return plain_loss
    return ChunkedCausalLMLoss(model, accelerator, pads_right=pads_right)
