"""Causal self-attention on CPU under bf16 autocast, one block of queries at a time, in plain torch.

On CPU, sdpa's causal kernel (`_scaled_dot_product_flash_attention_for_cpu`) took 27% of a bf16 LoRA step on
SmolLM2-135M (torch.profiler, batches of 8 x ~490 tokens: 72 ms forward, 150 ms backward per layer), running at
~30 GFLOP/s where the same CPU multiplies bf16 matrices at ~300. Here each block of `BLOCK` queries meets all the
keys it may see (keys 0 .. its last query) at once, so its softmax needs no running maximum: one bf16 matmul for
the scores, the causal triangle masked on the block's diagonal only, one fused softmax (float32 inside, bf16
out), one matmul with the values. Backward recomputes the block's probabilities the same way and takes the
softmax's gradient in one fused kernel (`_softmax_backward_data`); nothing but q, k and v is kept for it
(sdpa keeps its output and log-sum-exp too). A grouped-query model's query heads that share a key/value head are
stacked into one matmul: no `repeat_kv` copies. Numerically it is transformers' eager attention under bf16
autocast (bf16 scores, softmax computed in float32, bf16 probabilities): relative error against float32 3.5e-3 on
the output and 4e-3 on the gradients, where sdpa's kernel gave 2e-3 and 2.5-6.5e-3.

Forward + backward of one layer's attention as SmolLM2's layers hand it over under bf16 autocast (8 rows, 9 heads,
3 key/value heads, head dim 64; `python benchmarks/cpu_kernels.py --only attention`, CPU ms, one thread): 128
tokens 17.6 against sdpa's 40.5; 300: 48 against 100; 490: 89 against 234.

`use_block_attention(model, device, mixed_precision)` routes a model that uses "sdpa" through `attention` for the
run (its config's `_attn_implementation`, masks still made by sdpa's mask function): CPU, bf16 only. Any call
the blocks do not cover goes to sdpa unchanged: a mask (left padding, packing, sliding windows that bite), a
cache, dropout, soft-capping, attention sinks, position biases, float32 or fp16 inputs. `PEFT_MAGIC_ATTENTION=sdpa`
(or `train.kernels: none`) keeps sdpa.
"""

from __future__ import annotations

import functools

NAME = "peft_magic_block_cpu"
BLOCK = 32  # queries per block: 64 measured alike at 128 and 300 tokens, 1.2x slower at 490

_NOT_COVERED = ("softcap", "s_aux", "sinks", "position_bias", "output_attentions")


def _causal_block(q, k, i0, i1):
    """Scores of queries i0..i1 (stacked over the heads sharing each key/value head) against keys 0..i1, with the
    causal triangle of the block's diagonal masked: [batch, kv_heads, group * (i1 - i0), i1]."""
    import torch

    b, kv, group, _, d = q.shape
    n = i1 - i0
    s = torch.matmul(q[:, :, :, i0:i1].reshape(b, kv, group * n, d), k[:, :, :i1].transpose(-1, -2))
    s.view(b, kv, group, n, i1)[..., i0:i1].masked_fill_(torch.ones(n, n, dtype=torch.bool).triu_(1), float("-inf"))
    return s


@functools.cache
def _function():
    """The autograd function, made on first use (torch is imported lazily)."""
    import torch

    class BlockCausal(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, scale):
            with torch.autocast("cpu", enabled=False):
                b, h, n, d = q.shape
                kv = k.shape[1]
                # contiguous once (the model hands over transposed views): the blocks slice them ~n/BLOCK times
                qs = torch.mul(q, scale, out=torch.empty(q.shape, dtype=q.dtype)).view(b, kv, h // kv, n, d)
                k, v = k.contiguous(), v.contiguous()
                out = torch.empty(b, kv, h // kv, n, v.shape[-1], dtype=v.dtype)
                for i0 in range(0, n, BLOCK):
                    i1 = min(i0 + BLOCK, n)
                    p = torch.softmax(_causal_block(qs, k, i0, i1), -1)
                    out[:, :, :, i0:i1] = torch.matmul(p, v[:, :, :i1]).view(b, kv, h // kv, i1 - i0, -1)
            ctx.save_for_backward(qs, k, v)  # copies in place of the views: nothing else keeps those
            ctx.scale = scale
            return out.view(b, h, n, -1)

        @staticmethod
        def backward(ctx, grad):
            qs, k, v = ctx.saved_tensors
            scale = ctx.scale
            with torch.autocast("cpu", enabled=False):
                b, kv, group, n, d = qs.shape
                grad = grad.to(v.dtype).contiguous().view(b, kv, group, n, -1)
                dq = torch.empty(b, kv, group, n, d, dtype=qs.dtype)
                dk = torch.zeros(b, kv, n, d, dtype=torch.float32)
                dv = torch.zeros(b, kv, n, v.shape[-1], dtype=torch.float32)
                for i0 in range(0, n, BLOCK):
                    i1 = min(i0 + BLOCK, n)
                    p = torch.softmax(_causal_block(qs, k, i0, i1), -1)
                    g = grad[:, :, :, i0:i1].reshape(b, kv, group * (i1 - i0), -1)
                    dv[:, :, :i1] += torch.matmul(p.transpose(-1, -2), g)
                    ds = torch._softmax_backward_data(torch.matmul(g, v[:, :, :i1].transpose(-1, -2)), p, -1, p.dtype)
                    dq[:, :, :, i0:i1] = torch.matmul(ds, k[:, :, :i1]).mul_(scale).view(b, kv, group, i1 - i0, d)
                    dk[:, :, :i1] += torch.matmul(ds.transpose(-1, -2), qs[:, :, :, i0:i1].reshape(b, kv, -1, d))
            return dq.view(b, kv * group, n, d), dk.to(k.dtype), dv.to(v.dtype), None

    return BlockCausal


def block_causal(q, k, v, scale: float):
    """Causal attention of q [batch, heads, n, d] over k, v [batch, kv_heads, n, d] (heads a multiple of
    kv_heads), bf16 on CPU: [batch, heads, n, d_v]."""
    return _function().apply(q, k, v, scale)


def _bf16(*tensors) -> bool:
    """bf16 tensors, or tensors autocast would hand to sdpa in bf16 (rotary embeddings in float32 promote q and k
    to float32; sdpa is on autocast's bf16 list)."""
    import torch

    if all(t.dtype == torch.bfloat16 for t in tensors):
        return True
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16 and \
        all(t.dtype in (torch.float32, torch.bfloat16) for t in tensors)  # fmt: skip


def covers(module, query, key, value, attention_mask, dropout, is_causal, kwargs) -> bool:
    """Whether `attention` may take this call: causal self-attention without a mask over bf16 CPU tensors."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    return bool(
        attention_mask is None
        and causal
        and not dropout
        and query.device.type == "cpu"
        and _bf16(query, key, value)
        and query.shape[2] > 1
        and query.shape[2] == key.shape[2] == value.shape[2]
        and query.shape[1] % key.shape[1] == 0
        and not any(kwargs.get(name) is not None and kwargs.get(name) is not False for name in _NOT_COVERED)
    )


def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention-function signature: the blocks where they cover the call, sdpa otherwise."""
    if covers(module, query, key, value, attention_mask, dropout, is_causal, kwargs):
        import torch

        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        query, key, value = (t.to(torch.bfloat16) for t in (query, key, value))  # autocast's casts for sdpa
        return block_causal(query, key, value, scale).transpose(1, 2).contiguous(), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)  # fmt: skip


def _register() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register(NAME, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # the masks sdpa gets: None where causal suffices


def _set(config, name: str) -> None:
    """This config's attention implementation only: the property's setter also sets every sub-config's (a vision
    tower's, say), which may not use sdpa."""
    if hasattr(config, "_attn_implementation_internal"):
        config._attn_implementation_internal = name
    else:
        config._attn_implementation = name


def use_block_attention(model, device, mixed_precision: str):
    """Route `model`'s sdpa attention through `attention` for a bf16 CPU run; returns what routes it back."""
    from ..allocator import env_off

    if getattr(device, "type", str(device)) != "cpu" or str(mixed_precision) != "bf16" or \
            env_off("PEFT_MAGIC_ATTENTION", "sdpa"):  # fmt: skip
        return lambda: None
    configs = []
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "_attn_implementation", None) == "sdpa" and all(c is not config for c in configs):
            configs.append(config)
    if not configs:
        return lambda: None
    _register()
    for config in configs:
        _set(config, NAME)

    def release():
        for config in configs:
            if config._attn_implementation == NAME:
                _set(config, "sdpa")

    return release
