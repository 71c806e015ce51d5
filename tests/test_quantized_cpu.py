"""4-bit layers on CPU keep a trainable layout through a run (training/quantized_cpu.py).

bitsandbytes repacks a `Linear4bit` weight for its CPU inference kernel on the first eval-mode, no-grad forward
(CPUs with AVX-512 BF16), and that kernel has no autograd: gradients stop at the layer. A run must train on the
true gradient even after an evaluation or a `generate`, and inference after the run may repack again."""

from __future__ import annotations

import tempfile

import pytest
import torch
from conftest import instruction_rows

import peft_magic
from peft_magic.training.quantized_cpu import hold_training_layout

pytest.importorskip("bitsandbytes")


def qlora_tiny():
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        tf.LlamaForCausalLM(cfg).save_pretrained(d)
        q = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        base = tf.AutoModelForCausalLM.from_pretrained(d, quantization_config=q, device_map="cpu")
    torch.manual_seed(1)
    return get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False))


def grads(model, ids):
    model.train()
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def repacks(model) -> bool:
    layer = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    return bool(getattr(layer, "support_avx512bf16_for_cpu", False))


def test_gradients_stay_true_after_eval_forwards():
    """Without the guard, one eval forward cuts the gradients (70% off on this model, measured); with it, eval
    forwards before and during training leave them exactly as they were."""
    from peft_magic.training.quantized_cpu import never_repack

    model = qlora_tiny()
    if not repacks(model):
        pytest.skip("this CPU has no AVX-512 BF16: bitsandbytes never repacks here")
    ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    reference = grads(model, ids)
    never_repack(model)  # what peft_magic's loader does
    model.eval()
    with torch.no_grad():
        model(input_ids=ids[:1])  # an evaluation or generate before training
    release = hold_training_layout(model)  # what a run does first
    try:
        after = grads(model, ids)
        model.eval()
        with torch.no_grad():
            model(input_ids=ids[:1])  # an evaluation inside the run
        again = grads(model, ids)
    finally:
        release()
    for name, g in reference.items():
        torch.testing.assert_close(after[name], g, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(again[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_a_model_repacked_before_the_run_is_unpacked_for_it():
    model = qlora_tiny()
    if not repacks(model):
        pytest.skip("this CPU has no AVX-512 BF16: bitsandbytes never repacks here")
    ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids[:1])
    layer = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert layer.weight.quant_state.packing_format_for_cpu  # bitsandbytes repacked it
    with pytest.warns(UserWarning, match="repacked"):
        release = hold_training_layout(model)
    assert not layer.weight.quant_state.packing_format_for_cpu and not layer.support_avx512bf16_for_cpu
    first = grads(model, ids)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids[:1])
    assert not layer.weight.quant_state.packing_format_for_cpu  # held: no repack inside the run
    for name, g in grads(model, ids).items():
        torch.testing.assert_close(g, first[name], rtol=1e-5, atol=1e-7, msg=name)
    release()
    assert layer.support_avx512bf16_for_cpu


def test_qlora_run_loads_a_model_that_never_repacks(tiny_llama, workdir):
    config = {"model": {"name_or_path": tiny_llama, "quantization": "4bit"},
              "data": {"train": instruction_rows(32), "eval": 0.25},
              "train": {"max_steps": 6, "logging_steps": 2, "eval_steps": 2, "learning_rate": 5e-3,
                        "per_device_train_batch_size": 4, "output_dir": str(workdir / "q")}}  # fmt: skip
    run = peft_magic.train(config, display="none")
    import bitsandbytes as bnb

    layers = [m for m in run.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert not any(m.support_avx512bf16_for_cpu for m in layers)
    losses = [r["loss"] for r in run.history if "loss" in r]
    assert losses[-1] < losses[0]


def test_under_bf16_the_4bit_layers_read_the_norms_16_bit_copy_and_multiply_in_bf16():
    """bitsandbytes ignores autocast: a 4-bit layer fed the pre-norm's float32 output multiplied in float32 and
    returned float32, which SwiGLU then kept for backward. With the copy and the compute type set for the run the
    gate/up outputs are bf16, the loss and gradients those of the float32 path to bf16 rounding, and the layers
    get their own compute type back after."""
    from peft_magic.training.frozen_casts import half_norm_outputs
    from peft_magic.training.quantized_cpu import compute_in_16_bit

    model = qlora_tiny()
    ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    gate = model.get_base_model().model.layers[0].mlp.gate_proj
    seen = []
    gate.base_layer.register_forward_hook(lambda m, a, out: seen.append((a[0].dtype, out.dtype)))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model.train()
    loss0, grads0 = loss_and_grads()
    assert seen[-1] == (torch.float32, torch.float32)
    releases = [half_norm_outputs(model.get_base_model(), "bf16"), compute_in_16_bit(model, "bf16")]
    assert gate.base_layer.compute_dtype == torch.bfloat16
    loss1, grads1 = loss_and_grads()
    assert seen[-1] == (torch.bfloat16, torch.bfloat16)
    torch.testing.assert_close(loss1, loss0, rtol=2e-2, atol=0)
    diff = sum((grads1[n] - g).norm() ** 2 for n, g in grads0.items()) ** 0.5
    assert diff <= 5e-2 * sum(g.norm() ** 2 for g in grads0.values()) ** 0.5
    for release in releases:
        release()
    assert gate.base_layer.compute_dtype == torch.float32
    assert compute_in_16_bit(model, "no")() is None


def test_under_bf16_a_4bit_layer_hands_on_float32_so_the_lora_update_is_not_rounded_away(monkeypatch):
    """Early in training LoRA's update is a few bf16 roundings of the base output: a bf16 base output added to it in
    bf16 loses most of it (the real QLoRA job's step-2 loss moved +4% off Trainer's, whose 4-bit layers return
    float32). The 4-bit layer multiplies in bf16 but hands its output on in float32, so the update survives the sum;
    `PEFT_MAGIC_4BIT_OUT=16` (a benchmark's ablation) leaves it bf16 and the update is rounded away."""
    from peft_magic.training.quantized_cpu import compute_in_16_bit

    model = qlora_tiny()
    layer = model.get_base_model().model.layers[0].mlp.gate_proj
    # as in a run, the pre-norm output's bf16 copy (frozen_casts.py); bitsandbytes returns its input's type
    x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(0)).bfloat16()
    with torch.no_grad():
        base_rms = layer.base_layer(x.float()).pow(2).mean().sqrt()
        delta = layer.lora_B["default"](layer.lora_A["default"](x.float())) * layer.scaling["default"]
        layer.lora_B["default"].weight.mul_(3e-3 * base_rms / delta.pow(2).mean().sqrt())  # update ~ 1.5 roundings
        delta = layer.lora_B["default"](layer.lora_A["default"](x.float())) * layer.scaling["default"]

    def update_error():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            y, base = layer(x), layer.base_layer(x)
        assert layer.base_layer.compute_dtype == torch.bfloat16
        return y.dtype, float((y.float() - base.float() - delta).norm() / delta.norm())

    release = compute_in_16_bit(model, "bf16")
    dtype, error = update_error()
    release()
    assert dtype == torch.float32 and error < 0.02, error  # the update's own bf16 rounding
    monkeypatch.setenv("PEFT_MAGIC_4BIT_OUT", "16")
    release = compute_in_16_bit(model, "bf16")
    dtype16, error16 = update_error()
    release()
    assert dtype16 == torch.bfloat16 and error16 > 0.2, error16
