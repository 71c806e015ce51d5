"""RMSNorms keeping the residual stream in bf16 for backward under bf16 autocast (training/rms_norm.py): the model's
own output bit for bit, gradients within bf16 rounding of autograd's, half the bytes kept per norm, only under bf16
and for allow-listed classes, and the model's own forward back after the run."""

from __future__ import annotations

import pytest
import torch
from conftest import instruction_rows
from test_swiglu import step, tiny

import peft_magic
from peft_magic.training.rms_norm import RMS_NORMS, norms_keep_16_bit, rms_norm


def reference(x, weight, eps):
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@pytest.mark.parametrize("keep", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("from_output", [False, True])
def test_same_output_bit_for_bit_and_gradients_within_the_kept_precision(keep, from_output):
    torch.manual_seed(0)
    x = (torch.randn(4, 7, 64) * 3).requires_grad_()
    w = (torch.randn(64) * 0.5 + 1).requires_grad_(not from_output)  # remade from the output: a frozen weight
    g = torch.randn(4, 7, 64)
    y0, y1 = reference(x, w, 1e-5), rms_norm(x, w, 1e-5, keep, from_output)
    assert y1.dtype == y0.dtype and torch.equal(y1, y0)
    assert hasattr(y1, "_peft_magic_copy16") == from_output
    if from_output:
        assert torch.equal(y1._peft_magic_copy16, y0.detach().to(keep))  # what frozen_casts would have cast
    inputs = (x,) if from_output else (x, w)
    ref = torch.autograd.grad((y0 * g).sum(), inputs)
    ours = torch.autograd.grad((y1 * g).sum(), inputs)
    tol = 1e-5 if keep == torch.float32 else 2**-7  # the remade normalised x is off by bf16's rounding at most
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype
        assert (a - b).norm() <= tol * b.norm()


def test_under_bf16_autocast_the_same_loss_close_gradients_and_half_the_residual_bytes_kept():
    model = tiny()
    ids = torch.randint(1, 97, (3, 16), generator=torch.Generator().manual_seed(0))

    def bf16_step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return step(model, ids)

    loss0, grads0, kept0 = bf16_step()
    release = norms_keep_16_bit(model.get_base_model(), "bf16")
    assert sum("forward" in m.__dict__ for m in model.modules()) == 5  # 2 blocks x 2 norms, the final norm
    loss1, grads1, kept1 = bf16_step()
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    diff = sum((grads1[n] - g).norm() ** 2 for n, g in grads0.items()) ** 0.5
    assert 0 < diff <= 2e-2 * sum(g.norm() ** 2 for g in grads0.values()) ** 0.5
    # the norms reading the stream (not the first, which reads the frozen embedding: no graph) keep 2 bytes per
    # element of it, not 4
    assert sum(kept0.values()) - sum(kept1.values()) == 4 * ids.numel() * 64 * 2
    release()
    assert not [m for m in model.modules() if "forward" in m.__dict__ or "_peft_magic_own_forward" in m.__dict__]


def test_with_the_norm_outputs_cast_once_the_copy_is_kept_once_and_a_zero_weight_keeps_the_input():
    from peft_magic.training.frozen_casts import half_norm_outputs

    model = tiny()
    ids = torch.randint(1, 97, (3, 16), generator=torch.Generator().manual_seed(0))
    base = model.get_base_model()

    def bf16_step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return step(model, ids)

    half_norm_outputs(base, "bf16")
    loss0, grads0, kept0 = bf16_step()
    release = norms_keep_16_bit(base, "bf16")
    loss1, grads1, kept1 = bf16_step()
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    diff = sum((grads1[n] - g).norm() ** 2 for n, g in grads0.items()) ** 0.5
    assert 0 < diff <= 2e-2 * sum(g.norm() ** 2 for g in grads0.values()) ** 0.5
    # 3 pre-norms reading the stream keep nothing new (the linears keep their output's copy); the final norm
    # (no linear reads it through the hook) keeps its own copy: 2 bytes per element instead of the stream's 4
    assert sum(kept0.values()) - sum(kept1.values()) == (3 * 4 + 2) * ids.numel() * 64
    with torch.no_grad():
        base.model.layers[1].input_layernorm.weight[5] = 0.0  # x = y / w would divide by zero: keep x
    loss2, grads2, _ = bf16_step()
    assert torch.isfinite(loss2) and all(torch.isfinite(g).all() for g in grads2.values())
    release()


def test_outside_bf16_the_norms_run_their_own_forward():
    model = tiny()
    ids = torch.randint(1, 97, (3, 16), generator=torch.Generator().manual_seed(0))
    loss0, grads0, _ = step(model, ids)
    assert norms_keep_16_bit(model.get_base_model(), "fp16")() is None and norms_keep_16_bit(model, "no")() is None
    norms_keep_16_bit(model.get_base_model(), "bf16")
    loss1, grads1, _ = step(model, ids)  # float32: the model's own norm
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=0, atol=0, msg=name)


def test_other_norms_keep_their_forward():
    import transformers as tf

    cfg = tf.GemmaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16)  # fmt: skip
    model = tf.GemmaForCausalLM(cfg)  # Gemma's RMSNorm scales by 1 + weight: not this formula
    norms_keep_16_bit(model, "bf16")
    assert not [m for m in model.modules() if "forward" in m.__dict__]


def test_a_bf16_run_uses_it_and_gives_the_norms_back(tiny_llama, workdir, monkeypatch):
    from peft_magic.training import rms_norm as module

    calls = []
    real = module.rms_norm
    monkeypatch.setattr(module, "rms_norm", lambda *a: calls.append(1) or real(*a))
    config = {"model": tiny_llama, "data": {"train": instruction_rows(32)},
              "train": {"max_steps": 4, "logging_steps": 2, "eval_steps": 0, "learning_rate": 5e-3,
                        "per_device_train_batch_size": 4, "mixed_precision": "bf16", "output_dir": str(workdir)}}  # fmt: skip
    run = peft_magic.train(config, display="none")
    losses = [r["loss"] for r in run.history if "loss" in r]
    assert losses[0] > losses[-1]
    assert calls
    norms = [m for m in run.model.modules() if type(m).__name__ in RMS_NORMS]
    assert norms and not [m for m in norms if "forward" in m.__dict__ or "_peft_magic_own_forward" in m.__dict__]


def test_a_loaded_model_keeps_the_runs_forwards_through_train_and_eval(tiny_llama):
    """transformers 5.2x kernelizes a model at load (its `kernels` dependency) and again at each train()/eval(),
    putting back every hub-kernel layer's forward: peft_magic loads without it, so the norms' forward stays."""
    import types

    from peft_magic.config.schema import ModelConfig
    from peft_magic.models import load_model

    model = load_model(ModelConfig(name_or_path=tiny_llama), "causal-lm")
    assert not getattr(model, "use_kernels", False)
    norm = model.model.norm
    norm.forward = types.MethodType(lambda self, h: h, norm)
    model.train()
    model.eval()
    model.train()
    assert "forward" in norm.__dict__
