"""LoRA dropout with a one-byte mask on CPU (training/dropout.py): drops each element with probability p and keeps
the expectation, its gradient is the same mask and scale, it is reproducible under a seed and under activation
checkpointing, and `train.kernels` swaps it into peft's LoRA layers for real training runs (not with `none`)."""

from __future__ import annotations

import pytest
import torch
from conftest import instruction_rows

import peft_magic
from peft_magic.training.dropout import MaskDropout, use_mask_dropout


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_drops_with_probability_p_and_keeps_the_expectation(p):
    torch.manual_seed(0)
    n = 1 << 21
    y = MaskDropout(p)(torch.ones(n))
    dropped = (y == 0).float().mean().item()
    assert dropped == pytest.approx(p, abs=5 * (p * (1 - p) / n) ** 0.5 + 1 / 65536)
    values = torch.unique(y).tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / (1 - p), rel=1e-4)
    assert y.mean().item() == pytest.approx(1.0, abs=5 * (p / (1 - p) / n) ** 0.5)


def test_each_position_of_the_draw_is_dropped_alike():
    """Both 16-bit lanes of each 32-bit draw are uniform (a draw over [0, 2**31) would bias the high lane)."""
    torch.manual_seed(0)
    y = MaskDropout(0.5)(torch.ones(2 * (1 << 20)))
    rates = (y.view(-1, 2) == 0).float().mean(0)
    assert torch.allclose(rates, torch.full((2,), 0.5), atol=5 * (0.25 / (1 << 20)) ** 0.5)


def test_gradient_is_the_same_mask_and_scale():
    torch.manual_seed(0)
    x = torch.randn(4, 7, 33, requires_grad=True)
    w = torch.randn(4, 7, 33)
    y = MaskDropout(0.2)(x)
    (y * w).sum().backward()
    kept = y != 0
    assert torch.allclose(x.grad, torch.where(kept, w / 0.8, 0.0), atol=1e-5)
    assert torch.allclose(y[kept], x[kept] / 0.8, atol=1e-5)


def test_eval_mode_and_p_zero_are_the_identity():
    x = torch.randn(5, 9)
    assert MaskDropout(0.3).eval()(x) is x
    assert MaskDropout(0.0)(x) is x
    with pytest.raises(ValueError):
        MaskDropout(1.0)
    assert MaskDropout(0.9999999).scale == pytest.approx(65536.0)  # finite: one value in 65536 is kept


def test_seeded_draws_repeat_and_successive_draws_differ():
    x = torch.ones(1000, 64)
    torch.manual_seed(3)
    a, b = MaskDropout(0.1)(x), MaskDropout(0.1)(x)
    torch.manual_seed(3)
    assert torch.equal(MaskDropout(0.1)(x), a)
    assert not torch.equal(a, b)


def test_activation_checkpointing_replays_the_same_mask():
    from torch.utils.checkpoint import checkpoint

    lin = torch.nn.Linear(32, 32)
    drop = MaskDropout(0.3)

    def block(h):
        return lin(drop(h)).tanh()

    x = torch.randn(16, 32, requires_grad=True)
    torch.manual_seed(5)
    block(x).sum().backward()
    plain = x.grad.clone()
    x.grad = None
    torch.manual_seed(5)
    checkpoint(block, x, use_reentrant=False).sum().backward()
    assert torch.allclose(x.grad, plain, atol=1e-6)


def test_swapped_into_lora_layers_only_on_cpu():
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = get_peft_model(tf.LlamaForCausalLM(cfg), LoraConfig(r=2, target_modules="all-linear", lora_dropout=0.1))
    assert use_mask_dropout(model, "meta") == 0
    assert use_mask_dropout(model, "cpu") == 14  # 7 linear layers per block, 2 blocks
    kinds = {type(m) for m in model.modules() if isinstance(m, (torch.nn.Dropout, MaskDropout))}
    assert kinds == {MaskDropout}
    assert use_mask_dropout(model, "cpu") == 0  # already swapped


def test_a_models_own_dropout_is_swapped_too():
    """BERT's hidden and embedding dropout (modules) as well as LoRA's; its attention reads only `.p`."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    cfg = tf.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_labels=3)  # fmt: skip
    torch.manual_seed(0)
    model = get_peft_model(tf.BertForSequenceClassification(cfg),
                           LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"], lora_dropout=0.1))
    before = sum(type(m) is torch.nn.Dropout for m in model.modules())
    assert use_mask_dropout(model, "cpu") == before > 4  # 4 LoRA layers, and BERT's own
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    model.train()
    ids = torch.randint(1, 64, (4, 10))
    out = model(input_ids=ids, labels=torch.tensor([0, 1, 2, 0]))
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("kernels", ["auto", "none"])
def test_training_run_uses_it_with_kernels_auto_and_learns(tiny_llama, workdir, kernels):
    config = {"model": tiny_llama, "data": {"train": instruction_rows(32)},
              "method": {"name": "lora", "lora_dropout": 0.1},
              "train": {"max_steps": 6, "logging_steps": 2, "eval_steps": 0, "learning_rate": 5e-3,
                        "per_device_train_batch_size": 4, "kernels": kernels, "mixed_precision": "no",
                        "output_dir": str(workdir / kernels)}}  # fmt: skip
    run = peft_magic.train(config, display="none")
    losses = [r["loss"] for r in run.history if "loss" in r]
    assert losses[0] > losses[-1]
    dropouts = {type(m).__name__ for m in run.model.modules() if "Dropout" in type(m).__name__}
    assert dropouts == ({"MaskDropout"} if kernels == "auto" else {"Dropout"})
