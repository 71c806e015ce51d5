"""LoRA under autocast without peft's float32 round trip (training/lora_casts.py): the same loss and gradients,
only under mixed precision, and peft's cast back after the run."""

from __future__ import annotations

import pytest
import torch
from conftest import instruction_rows

import peft_magic
from peft_magic.training.dropout import use_mask_dropout
from peft_magic.training.lora_casts import skip_input_casts


def tiny_lora(dropout=0.1):
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = get_peft_model(tf.LlamaForCausalLM(cfg), LoraConfig(r=4, target_modules="all-linear", lora_dropout=dropout,
                                                                init_lora_weights=False))  # fmt: skip
    use_mask_dropout(model, "cpu")
    return model.train()


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same dropout masks on both sides
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_same_loss_and_gradients_under_bf16_autocast():
    model = tiny_lora()
    ids = torch.randint(1, 97, (3, 16), generator=torch.Generator().manual_seed(0))
    ref_loss, ref = loss_and_grads(model, ids)
    release = skip_input_casts(model, "bf16")
    o_proj = model.get_base_model().model.layers[0].self_attn.o_proj
    assert o_proj.cast_input_dtype_enabled is False
    loss, grads = loss_and_grads(model, ids)
    release()
    assert getattr(o_proj, "cast_input_dtype_enabled", True) is True
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for name, g in ref.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-3, atol=1e-6, msg=name)


def test_nothing_changes_without_mixed_precision():
    model = tiny_lora()
    skip_input_casts(model, "no")
    assert all(getattr(m, "cast_input_dtype_enabled", True) for m in model.modules())


def test_a_bf16_run_trains_and_hands_peft_its_cast_back(tiny_llama, workdir):
    config = {"model": tiny_llama, "data": {"train": instruction_rows(32)},
              "train": {"max_steps": 6, "logging_steps": 2, "eval_steps": 0, "learning_rate": 5e-3,
                        "per_device_train_batch_size": 4, "mixed_precision": "bf16",
                        "output_dir": str(workdir / "bf16")}}  # fmt: skip
    run = peft_magic.train(config, display="none")
    losses = [r["loss"] for r in run.history if "loss" in r]
    assert losses[-1] < losses[0]
    assert all(getattr(m, "cast_input_dtype_enabled", True) for m in run.model.modules())
