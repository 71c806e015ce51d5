"""A SwiGLU MLP keeping two of its three tensors (training/swiglu.py): the same output and gradients as the
model's own MLP, a third less kept for backward, only for allow-listed SiLU families, and the model's own forward
back after the run."""

from __future__ import annotations

import pytest
import torch
from conftest import instruction_rows

import peft_magic
from peft_magic.training.swiglu import keep_two_of_three, silu_mul


def test_silu_mul_matches_autograd():
    torch.manual_seed(0)
    gate = torch.randn(3, 5, 40, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 5, 40, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(silu_mul, (gate, up))
    g = torch.randn(3, 5, 40, dtype=torch.float64)
    ref = torch.autograd.grad((torch.nn.functional.silu(gate) * up * g).sum(), (gate, up))
    ours = torch.autograd.grad((silu_mul(gate, up) * g).sum(), (gate, up))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


def tiny(hidden_act="silu"):
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, hidden_act=hidden_act)  # fmt: skip
    lora = LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    return get_peft_model(tf.LlamaForCausalLM(cfg), lora).train()


def step(model, ids):
    model.zero_grad(set_to_none=True)
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, kept


def test_same_loss_and_gradients_and_one_intermediate_tensor_less_per_block():
    model = tiny()
    ids = torch.randint(1, 97, (3, 16), generator=torch.Generator().manual_seed(0))
    loss0, grads0, kept0 = step(model, ids)
    release = keep_two_of_three(model.get_base_model())
    loss1, grads1, kept1 = step(model, ids)
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=1e-5, atol=1e-6, msg=name)
    assert sum(kept0.values()) - sum(kept1.values()) == 2 * ids.numel() * 128 * 4  # SiLU's output, 2 blocks
    release()
    assert not [m for m in model.modules() if "forward" in m.__dict__]


@pytest.mark.parametrize("hidden_act", ["gelu", "relu"])
def test_other_activations_keep_their_mlp(hidden_act):
    model = tiny(hidden_act)
    keep_two_of_three(model.get_base_model())
    assert not [m for m in model.modules() if "forward" in m.__dict__]


@pytest.mark.parametrize("kernels", ["auto", "none"])
def test_a_run_uses_it_with_kernels_on_and_gives_the_mlp_back(tiny_llama, workdir, kernels, monkeypatch):
    from peft_magic.training import swiglu

    calls = []
    monkeypatch.setattr(swiglu, "silu_mul", lambda gate, up: calls.append(1) or swiglu._silu_mul()[0].apply(gate, up))
    config = {"model": tiny_llama, "data": {"train": instruction_rows(32)},
              "train": {"max_steps": 4, "logging_steps": 2, "eval_steps": 0, "learning_rate": 5e-3,
                        "per_device_train_batch_size": 4, "kernels": kernels, "output_dir": str(workdir / kernels)}}  # fmt: skip
    run = peft_magic.train(config, display="none")
    losses = [r["loss"] for r in run.history if "loss" in r]
    assert losses[0] > losses[-1]
    assert bool(calls) == (kernels == "auto")
    assert not [m for m in run.model.modules() if "forward" in m.__dict__]


def test_with_dropout_inside_a_the_down_projection_keeps_gate_and_up_not_the_product():
    """LoRA's A on down_proj (dropout inside, CPU) keeps the gate and up outputs SiluMul keeps anyway, not its
    input, and remakes the product in backward: the same loss bit for bit and the same gradients as peft's dropout
    then A on the model's own MLP, with two intermediate-size tensors per block less kept (SiLU's output, the
    product)."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model
    from test_dropout import loss_grads_and_saved

    from peft_magic.training.dropout import MaskDropout, use_mask_dropout

    def model():
        torch.manual_seed(0)
        cfg = tf.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
        lora = LoraConfig(r=4, target_modules=["down_proj"], lora_dropout=0.1, init_lora_weights=False)
        model = get_peft_model(tf.LlamaForCausalLM(cfg), lora).train()
        model.enable_input_require_grads()  # every MLP's gate and up need their gradient, as with all-linear
        return model

    ids = torch.randint(1, 97, (3, 16), generator=torch.Generator().manual_seed(0))
    plain, ours = model(), model()
    for module in list(plain.modules()):  # the same draws, A a plain nn.Linear after the dropout
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Dropout:
                setattr(module, name, MaskDropout(child.p))
    use_mask_dropout(ours, "cpu")
    keep_two_of_three(ours.get_base_model())
    loss0, grads0, kept0 = loss_grads_and_saved(plain, ids)
    loss1, grads1, kept1 = loss_grads_and_saved(ours, ids)
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=1e-5, atol=1e-6, msg=name)
    # plain keeps SiLU's output and the dropped product (A's input); ours neither (the one-bit masks aside)
    assert kept0 - kept1 >= 2 * 2 * ids.numel() * 128 * 4


def test_float32_gate_and_up_under_bf16_autocast_multiply_in_float32_and_keep_16_bit_copies():
    """A QLoRA block hands float32 gate/up to SwiGLU under bf16 autocast (training/quantized_cpu.py): the product is
    autograd's float32 one rounded once to bf16 (what down_proj multiplies), only bf16 copies are kept, and the
    gradients are float32 autograd's to bf16 rounding. Outside autocast the float32 tensors themselves are kept
    (bit-exact gradients)."""
    from peft_magic.training.swiglu import remade_from

    torch.manual_seed(0)
    gate = (2 * torch.randn(4, 9, 48)).requires_grad_()
    up = torch.randn(4, 9, 48).requires_grad_()
    g = torch.randn(4, 9, 48)
    ref_out = torch.nn.functional.silu(gate) * up
    ref = torch.autograd.grad((ref_out * g).sum(), (gate, up))
    kept = []
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t)
    with hooks, torch.autocast("cpu", dtype=torch.bfloat16):
        out = silu_mul(gate, up)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref_out.detach().bfloat16())
    assert kept and all(t.dtype == torch.bfloat16 for t in kept)
    assert sum(t.numel() for t in kept) == 2 * gate.numel()
    fn, *sources = remade_from(out)
    torch.testing.assert_close(fn(*sources), out.detach(), rtol=2e-2, atol=2e-2)  # from the copies, in bf16
    ours = torch.autograd.grad((out * g).sum(), (gate, up))
    for a, b in zip(ours, ref):
        assert a.dtype == torch.float32
        assert (a - b).norm() <= 1e-2 * b.norm()
    kept.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = silu_mul(gate, up)  # no autocast: the float32 tensors, gradients bit for bit
    assert {t.dtype for t in kept} == {torch.float32}
    for a, b in zip(torch.autograd.grad((out * g).sum(), (gate, up)), ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
