"""LoRA dropout with a one-bit mask on CPU (training/dropout.py): drops each element with probability p and keeps
the expectation, keeps an eighth of a byte per element for backward, its gradient is the same mask and scale, it is reproducible under a seed and under activation
checkpointing, and `train.kernels` swaps it into peft's LoRA layers for real training runs (not with `none`)."""

from __future__ import annotations

import pytest
import torch
from conftest import instruction_rows

import peft_magic
from peft_magic.training.dropout import DroppedLinear, MaskDropout, use_mask_dropout


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


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5, 7), (4, 7, 33), (2, 64)])
def test_the_mask_is_kept_as_one_bit_per_element_and_comes_back_whole(shape):
    """Shapes that are no multiple of 8 too: the packed mask unpacks to the forward's mask, the gradient is the
    mask and scale, and backward keeps ceil(n / 8) bytes."""
    from peft_magic.training.dropout import _keep_mask, _pack, _unpack

    torch.manual_seed(0)
    for threshold in (-32768 + 3277, 0, 30000):
        keep, buf = _keep_mask(shape, threshold, "cpu")
        assert torch.equal(_unpack(_pack(buf), shape), keep)
    x = torch.randn(*shape, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        y = MaskDropout(0.5)(x)
    assert [(t.dtype, t.numel()) for t in kept] == [(torch.uint8, -(-x.numel() // 8))]
    y.backward(torch.ones(shape))
    torch.testing.assert_close(x.grad, (y != 0).float() * 2.0)


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
    lin = torch.nn.Linear(32, 32)
    drop = MaskDropout(0.3)

    def block(h):
        return lin(drop(h)).tanh()

    assert_checkpoint_replays(block, torch.randn(16, 32, requires_grad=True))


def assert_checkpoint_replays(block, x):
    """The input's gradient through `block` is the same recomputed under activation checkpointing (same draws)."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(5)
    block(x).sum().backward()
    plain = x.grad.clone()
    x.grad = None
    torch.manual_seed(5)
    checkpoint(block, x, use_reentrant=False).sum().backward()
    torch.testing.assert_close(x.grad, plain, rtol=1e-5, atol=1e-6)


def tiny_lora_llama(dropout=0.1):
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    lora = LoraConfig(r=4, target_modules="all-linear", lora_dropout=dropout, init_lora_weights=False)
    return get_peft_model(tf.LlamaForCausalLM(cfg), lora).train()


def test_lora_dropout_goes_into_a_only_on_cpu_and_comes_back_after():
    model = tiny_lora_llama()
    keys = set(model.state_dict())
    use_mask_dropout(model, "meta")()
    assert {type(m) for m in model.modules() if "Dropout" in type(m).__name__} == {torch.nn.Dropout}
    release = use_mask_dropout(model, "cpu")
    a = [m for n, m in model.named_modules() if ".lora_A." in n]
    assert len(a) == 14 and all(type(m) is DroppedLinear for m in a)  # 7 linear layers per block, 2 blocks
    assert not [m for m in model.modules() if "Dropout" in type(m).__name__]  # LoRA's are inside A now
    assert set(model.state_dict()) == keys  # same parameters, same names: checkpoints and exports unchanged
    release()
    assert all(type(m) is torch.nn.Linear for m in a)
    assert sum(type(m) is torch.nn.Dropout for m in model.modules()) == 14


def loss_grads_and_saved(model, ids, autocast=False):
    """Loss, LoRA gradients, and the bytes autograd keeps for backward (distinct storages, parameters excluded)."""
    model.zero_grad(set_to_none=True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(7)  # the same draws on both sides
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # fmt: skip
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, sum(kept.values())


@pytest.mark.parametrize("autocast", [False, True])
def test_dropout_inside_a_trains_alike_and_keeps_one_input_for_q_k_v(autocast):
    """Against `MaskDropout` then A (the same draws): the same loss and gradients, and for q/k/v (gate/up) their
    one input kept (under autocast the norm output's one 16-bit copy, engine.cast_once) where each kept its own
    dropped copy. Under autocast A drops that copy in 16 bits: the loss moves by a rounding, not more."""
    from peft_magic.training.frozen_casts import half_norm_outputs
    from peft_magic.training.lora_casts import skip_input_casts

    ids = torch.randint(1, 97, (3, 16), generator=torch.Generator().manual_seed(0))
    plain, fused = tiny_lora_llama(), tiny_lora_llama()
    for module in list(plain.modules()):  # the one-byte mask alone, A a plain nn.Linear
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Dropout:
                setattr(module, name, MaskDropout(child.p))
    use_mask_dropout(fused, "cpu")
    if autocast:  # as a bf16 run has it (engine.cast_once)
        for model in (plain, fused):
            skip_input_casts(model, "bf16"), half_norm_outputs(model.get_base_model(), "bf16")
    loss0, grads0, kept0 = loss_grads_and_saved(plain, ids, autocast)
    loss1, grads1, kept1 = loss_grads_and_saved(fused, ids, autocast)
    torch.testing.assert_close(loss1, loss0, rtol=1e-4 if autocast else 0, atol=0)
    if autocast:  # a tiny random model's bf16 gradients move by 2-8% between roundings (its distance to float32)
        diff = sum((grads1[n] - g).norm() ** 2 for n, g in grads0.items()) ** 0.5
        assert diff <= 0.1 * sum(g.norm() ** 2 for g in grads0.values()) ** 0.5
    else:
        for name, g in grads0.items():
            torch.testing.assert_close(grads1[name], g, rtol=1e-5, atol=1e-5, msg=name)
    tokens, hidden, blocks = ids.numel(), 64, 2
    dropped_b = 2 if autocast else 4  # the dropped copies A kept, in the type A multiplies in, and now its input
    assert kept0 - kept1 >= blocks * tokens * hidden * (3 * dropped_b - dropped_b + 2 * dropped_b - dropped_b) * 0.99


def test_dropout_inside_a_on_the_16_bit_copy_is_as_close_to_float32_as_on_the_float32_input():
    """Under autocast A drops the norm output's 16-bit copy in 16 bits: output, A's gradient and the input's gradient
    as close to the float32 computation as when it drops the float32 tensor (same draws)."""
    from peft_magic.training.dropout import _threshold

    torch.manual_seed(0)
    a = torch.nn.Linear(64, 4, bias=False)
    a.__class__, (a.threshold, a.scale) = DroppedLinear, _threshold(0.1)
    x, g = torch.randn(6, 16, 64), torch.randn(6, 16, 4)

    def run(x_in, autocast):
        a.zero_grad()
        x_in = x_in.detach().requires_grad_()
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = a(x_in)
        (y.float() * g).sum().backward()
        return y.float(), a.weight.grad.clone(), x_in.grad.float()

    ref = run(x, False)
    for ours, base, want in zip(run(x.bfloat16(), True), run(x, True), ref):
        assert (ours - want).norm() <= 1.5 * (base - want).norm() + 1e-6
        assert (ours - want).norm() <= 0.01 * want.norm()


def test_dropout_inside_a_under_activation_checkpointing_replays_its_draws():
    model = tiny_lora_llama()
    use_mask_dropout(model, "cpu")
    layer = model.get_base_model().model.layers[0]
    x = torch.randn(2, 8, 64, requires_grad=True)
    pos = model.get_base_model().model.rotary_emb(x, torch.arange(8)[None])

    def block(h):
        out = layer(h, position_embeddings=pos)
        return out[0] if isinstance(out, tuple) else out

    assert_checkpoint_replays(block, x)


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
    use_mask_dropout(model, "cpu")
    assert sum(type(m) is MaskDropout for m in model.modules()) == before - 4 > 0  # BERT's own
    assert sum(type(m) is DroppedLinear for m in model.modules()) == 4  # LoRA's, inside A
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    model.train()
    ids = torch.randint(1, 64, (4, 10))
    out = model(input_ids=ids, labels=torch.tensor([0, 1, 2, 0]))
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("kernels", ["auto", "none"])
def test_training_run_uses_it_with_kernels_auto_and_learns(tiny_llama, workdir, kernels, monkeypatch):
    config = {"model": tiny_llama, "data": {"train": instruction_rows(32)},
              "method": {"name": "lora", "lora_dropout": 0.1},
              "train": {"max_steps": 6, "logging_steps": 2, "eval_steps": 0, "learning_rate": 5e-3,
                        "per_device_train_batch_size": 4, "kernels": kernels, "mixed_precision": "no",
                        "output_dir": str(workdir / kernels)}}  # fmt: skip
    calls = []
    fused = DroppedLinear.forward
    monkeypatch.setattr(DroppedLinear, "forward", lambda self, x: calls.append(self.training) or fused(self, x))
    run = peft_magic.train(config, display="none")
    losses = [r["loss"] for r in run.history if "loss" in r]
    assert losses[0] > losses[-1]
    assert (True in calls) == (kernels == "auto")  # LoRA's dropout was drawn inside A in training
    # and after the run, peft's modules are back (the model's own dropouts would stay MaskDropout)
    assert {type(m).__name__ for m in run.model.modules() if "Dropout" in type(m).__name__} == {"Dropout"}
    assert not [m for m in run.model.modules() if type(m) is DroppedLinear]


def test_dropout_inside_a_drops_under_no_grad_in_training_mode_as_before():
    """A no-grad forward in training mode (a policy's log-probs before its update) draws as Dropout did."""
    model = tiny_lora_llama()
    a = model.get_base_model().model.layers[0].self_attn.q_proj.lora_A["default"]
    x = torch.randn(2, 8, 64)
    torch.manual_seed(3)
    with torch.no_grad():
        expected = torch.nn.functional.linear(MaskDropout(0.1)(x), a.weight)
    use_mask_dropout(model, "cpu")
    torch.manual_seed(3)
    with torch.no_grad():
        torch.testing.assert_close(a(x), expected, rtol=0, atol=0)
    assert torch.equal(a.eval()(x), torch.nn.functional.linear(x, a.weight))
