"""Causal attention in blocks of queries on CPU under bf16 (training/block_attention.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import lm_rows

import peft_magic
from peft_magic.training import block_attention


def qkv(b, h, kv, n, d, seed=0):
    """bf16 q [b, h, n, d], k and v [b, kv, n, d] as the model hands them over: transposed views."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, heads, d, generator=g).transpose(1, 2) for heads in (h, kv, kv))
    return [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("h,kv,n", [(6, 2, 75), (4, 4, 32), (3, 1, 7), (4, 2, 1 + 2 * block_attention.BLOCK)])
def test_blocks_match_float32_attention_and_its_gradients(h, kv, n):
    """Output and q/k/v gradients against float32 sdpa, within bf16's error and no worse than sdpa's own bf16
    kernel by more than 2x; lengths below, at and across block edges, grouped-query and plain multi-head."""
    q, k, v = qkv(2, h, kv, n, 16)
    grad = torch.randn(2, h, n, 16, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_in, is_causal=True, enable_gqa=True)
    ref.backward(grad.float())
    sd_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    sd = F.scaled_dot_product_attention(*sd_in, is_causal=True, enable_gqa=True)
    sd.backward(grad)
    out = block_attention.block_causal(q, k, v, 16**-0.5)
    out.backward(grad)
    assert out.dtype == torch.bfloat16 and out.shape == (2, h, n, 16)
    assert rel(out, ref) < max(2 * rel(sd, ref), 8e-3)
    for mine, theirs, exact in zip((q, k, v), sd_in, ref_in):
        assert mine.grad.dtype == torch.bfloat16
        assert rel(mine.grad, exact.grad) < max(2 * rel(theirs.grad, exact.grad), 1e-2)


def test_causality_holds_a_later_token_changes_nothing_before_it():
    q, k, v = qkv(1, 2, 1, 40, 8)
    out = block_attention.block_causal(q, k, v, 0.3)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, 33:] += 5
    v2[:, :, 33:] -= 5
    out2 = block_attention.block_causal(q.detach(), k2, v2, 0.3)
    assert torch.equal(out[:, :, :33], out2[:, :, :33])
    assert not torch.equal(out[:, :, 33:], out2[:, :, 33:])


def tiny_lm():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")  # fmt: skip
    return tf.LlamaForCausalLM(cfg)


def test_a_routed_model_gives_sdpas_loss_and_gradients_and_is_routed_back():
    model = tiny_lm()
    ids = torch.randint(1, 97, (3, 45), generator=torch.Generator().manual_seed(0))

    def loss_and_grads():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])

    base_loss, base_grads = loss_and_grads()
    calls = []
    original = block_attention.block_causal
    block_attention.block_causal = lambda *a: calls.append(1) or original(*a)
    try:
        release = block_attention.use_block_attention(model, torch.device("cpu"), "bf16")
        assert model.config._attn_implementation == block_attention.NAME
        loss, grads = loss_and_grads()
    finally:
        block_attention.block_causal = original
    assert len(calls) == 2  # one per layer
    assert loss == pytest.approx(base_loss, rel=2e-3)
    assert rel(grads, base_grads) < 3e-2
    release()
    assert model.config._attn_implementation == "sdpa"


def test_calls_it_does_not_cover_go_to_sdpa_unchanged():
    """A padding mask (left-padded rows), float32, dropout: the model's sdpa path, bit for bit."""
    model = tiny_lm()
    ids = torch.randint(1, 97, (2, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        padded = model(input_ids=ids, attention_mask=mask).logits
    plain = model(input_ids=ids).logits
    release = block_attention.use_block_attention(model, torch.device("cpu"), "bf16")
    calls = []
    original = block_attention.block_causal
    block_attention.block_causal = lambda *a: calls.append(1) or original(*a)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, padded)
        assert torch.equal(model(input_ids=ids).logits, plain)  # float32
    finally:
        block_attention.block_causal = original
        release()
    assert calls == []


def test_only_bf16_cpu_runs_of_sdpa_models_are_routed():
    model = tiny_lm()
    for device, mp in ((torch.device("cpu"), "no"), (torch.device("cpu"), "fp16"), (torch.device("cuda"), "bf16")):
        block_attention.use_block_attention(model, device, mp)()
        assert model.config._attn_implementation == "sdpa"
    model.config._attn_implementation = "eager"
    block_attention.use_block_attention(model, torch.device("cpu"), "bf16")
    assert model.config._attn_implementation == "eager"


def test_a_bf16_cpu_run_uses_the_blocks_and_routes_back(tiny_llama, workdir, monkeypatch):
    calls = []
    original = block_attention.block_causal
    monkeypatch.setattr(block_attention, "block_causal", lambda *a: calls.append(1) or original(*a))
    config = {"model": {"name_or_path": tiny_llama}, "task": "causal-lm", "data": {"train": lm_rows(16)},
              "train": {"max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1,
                        "mixed_precision": "bf16", "output_dir": str(workdir / "b")}}  # fmt: skip
    run = peft_magic.train(config, display="none")
    assert len(calls) >= 2 * 2  # 2 steps x 2 layers
    assert run.model.get_base_model().config._attn_implementation == "sdpa"
    n = len(calls)
    config["train"].update(kernels="none", output_dir=str(workdir / "none"))
    peft_magic.train(config, display="none")
    assert len(calls) == n, "train.kernels: none runs torch's own attention"
