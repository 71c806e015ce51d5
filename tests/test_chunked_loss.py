"""The causal-LM loss at trained positions in chunks (training/chunked_loss.py) equals the model's own loss and gives
the same LoRA gradients, on tiny models: untied and tied output layers, a trainable (LoRA) output layer, logit
soft-capping and scaling, a 4-bit base, a padded batch with a fully-masked row; and a model it cannot reproduce
falls back to the plain loss."""

from __future__ import annotations

import traceback

import pytest
import torch
from conftest import instruction_rows

import peft_magic
from peft_magic.training.chunked_loss import ChunkedCausalLMLoss, loss_function

VOCAB = 97


def tiny(kind="llama", tied=False, **extra):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied, pad_token_id=0)  # fmt: skip
    if kind == "gemma2":
        cfg = tf.Gemma2Config(head_dim=16, final_logit_softcapping=3.0, **common, **extra)
        model = tf.Gemma2ForCausalLM(cfg)
    elif kind == "granite":
        model = tf.GraniteForCausalLM(tf.GraniteConfig(logits_scaling=4.0, **common, **extra))
    else:
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common, **extra))
    return model.float()


def lora(model, targets="all-linear"):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    return get_peft_model(model, cfg)


def batch():
    """3 rows: right padding, a masked prompt, and one row with no trained token at all."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, VOCAB, (3, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    ids[1, 15:] = 0
    labels = ids.clone()
    labels[:, :10] = -100  # the prompt
    labels[mask == 0] = -100
    labels[2] = -100  # fully masked row
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn(model, batch())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return loss.detach(), grads


def assert_same(model, chunk_elements=VOCAB * 5):
    """Plain vs chunked (chunks of 5 rows, so several): same loss, same gradient for every trainable tensor."""
    plain_loss, plain_grads = loss_and_grads(model, lambda m, b: m(**b).loss)
    chunked = ChunkedCausalLMLoss(model, chunk_elements=chunk_elements, pads_right=True)
    loss, grads = loss_and_grads(model, chunked)
    assert chunked.fallback is None and chunked.checked
    assert chunked.causal_only is True  # the right-padded batch ran without its mask, and gave the same loss
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
    for name, g in plain_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    return chunked


@pytest.mark.parametrize("tied", [False, True])
def test_same_loss_and_lora_gradients(tied):
    chunked = assert_same(lora(tiny(tied=tied)))
    assert chunked._fused()  # frozen plain output layer: the one-pass path


def test_trainable_output_layer_goes_through_the_module():
    model = lora(tiny(), targets=["q_proj", "v_proj", "lm_head"])
    chunked = assert_same(model)
    assert not chunked._fused()
    assert any("lm_head" in n and p.requires_grad for n, p in model.named_parameters())


@pytest.mark.parametrize("kind", ["gemma2", "granite"])
def test_softcapping_and_logit_scaling(kind):
    chunked = assert_same(lora(tiny(kind)))
    assert chunked.softcap == 3.0 if kind == "gemma2" else chunked.scale == 0.25


def test_4bit_base():
    pytest.importorskip("bitsandbytes")
    import tempfile

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    with tempfile.TemporaryDirectory() as d:
        tiny().save_pretrained(d)
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_type="nf4")
        base = AutoModelForCausalLM.from_pretrained(d, quantization_config=q, device_map="cpu")
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert_same(lora(base))


def masks_seen(model):
    """The attention_mask each forward of the transformers model receives."""
    seen = []
    base = model.get_base_model()
    base.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
    return seen


def test_right_padded_batch_runs_without_its_mask():
    model = lora(tiny())
    seen = masks_seen(model)
    chunked = ChunkedCausalLMLoss(model, pads_right=True)
    chunked(model, batch())
    assert seen[-1] is None and chunked.causal_only is True
    left = batch()
    left["attention_mask"] = left["attention_mask"].flip(1)  # left padding: the mask is needed
    on_the_left = ChunkedCausalLMLoss(model, pads_right=True)
    on_the_left(model, left)  # the collator promised right padding; the first batch says otherwise: checked, kept
    assert seen[-1] is not None and on_the_left.causal_only is False
    unknown = ChunkedCausalLMLoss(model)  # no promise from the collator: never dropped
    unknown(model, batch())
    assert seen[-1] is not None and unknown.causal_only is False


def test_model_whose_padding_is_not_inert_keeps_the_mask():
    """Bidirectional attention: without the mask real positions would see the padding; the one-time check sees it
    and the loss stays the model's own (with its mask)."""
    model = lora(tiny())
    for layer in model.get_base_model().model.layers:
        layer.self_attn.is_causal = False
    bidirectional = model.get_base_model().config
    bidirectional.use_bidirectional_attention = True
    seen = masks_seen(model)
    plain = model(**batch()).loss
    chunked = ChunkedCausalLMLoss(model, pads_right=True)
    loss = chunked(model, batch())
    assert chunked.causal_only is False and seen[-1] is not None
    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-6)


def test_model_with_unknown_logit_transform_falls_back():
    model = lora(tiny())
    chunked = ChunkedCausalLMLoss(model)
    chunked.scale = 2.0  # as if the model scaled its logits in a way the config does not say
    with pytest.warns(UserWarning, match="chunked loss off"):
        loss = chunked(model, batch())
    assert chunked.fallback
    torch.testing.assert_close(loss, model(**batch()).loss)


def test_not_for_other_tasks_or_when_off():
    from peft_magic.config.parse import parse_config

    model = lora(tiny())
    cfg = parse_config({"model": "x", "data": {"train": [{"text": "a"}]}})
    assert isinstance(loss_function(model, cfg), ChunkedCausalLMLoss)
    cfg.train.kernels = "none"
    assert not isinstance(loss_function(model, cfg), ChunkedCausalLMLoss)


def test_adalora_keeps_its_orthogonality_regulariser():
    """AdaLoRA adds a regulariser to the model's own loss (peft's AdaLoraModel.forward, with labels): the chunked
    loss would drop it, so the plain loss is used, and it includes the term."""
    from peft import AdaLoraConfig, get_peft_model

    from peft_magic.config.parse import parse_config

    model = get_peft_model(tiny(), AdaLoraConfig(init_r=4, total_step=10, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    cfg = parse_config({"model": "x", "data": {"train": [{"text": "a"}]}})
    fn = loss_function(model, cfg)
    assert not isinstance(fn, ChunkedCausalLMLoss)
    model.train()
    with_reg = fn(model, batch())
    model.base_model.peft_config["default"].orth_reg_weight = 0.0
    assert with_reg > fn(model, batch())  # the regulariser is in the loss that trains


def test_training_run_logs_the_same_losses(tiny_llama, workdir):
    """Through the engine: prompt/response data (prompt masked), the same logged losses with the chunked loss on
    and off (no dropout: `kernels` also chooses how LoRA dropout draws its masks on CPU, tests/test_dropout.py)."""
    losses = {}
    for kernels in ("auto", "none"):
        config = {"model": tiny_llama, "data": {"train": instruction_rows(32)}, "method": {"name": "lora", "lora_dropout": 0.0},
                  "train": {"max_steps": 6, "logging_steps": 2, "eval_steps": 0, "learning_rate": 5e-3,
                            "per_device_train_batch_size": 4, "kernels": kernels, "mixed_precision": "no",
                            "output_dir": str(workdir / kernels)}}  # fmt: skip
        run = peft_magic.train(config, display="none")
        losses[kernels] = [r["loss"] for r in run.history if "loss" in r]
    assert losses["auto"][0] > losses["auto"][-1]
    assert losses["auto"] == pytest.approx(losses["none"], rel=1e-4)


def test_under_accelerate_bf16_autocast_it_stays_chunked_and_matches_the_plain_loss():
    """accelerate autocasts the model's forward only: the one-time check must compare its bf16 logits with ours
    computed the same way (a float32 reference differs by bf16 rounding and used to switch the chunked loss off,
    running a second forward on top of the first), and the loss must match the model's own under autocast."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    try:
        model = accelerator.prepare(lora(tiny()))
        chunked = ChunkedCausalLMLoss(model, accelerator)
        with torch.no_grad():
            ours = chunked(model, batch())
            plain = model(**batch()).loss
        assert chunked.fallback is None and chunked.checked
        assert ours.item() == pytest.approx(plain.item(), rel=2e-2)
    finally:
        AcceleratorState._reset_state()


def test_training_runs_right_padded_batches_without_their_mask(tiny_llama, workdir, monkeypatch):
    """Through the engine: the collator pads on the right, so after the first batch's check the training
    forwards get no attention mask (and the losses are those of the masked plain loss, test above)."""
    from peft_magic import models

    masks, real = [], models.load_model

    def seen(module, args, kwargs):
        frames = {f.name for f in traceback.extract_stack()}
        if "micro_batch" in frames and "_padding_is_inert" not in frames:  # training forwards, not the check's
            masks.append(kwargs.get("attention_mask") is None)

    def load_model(*a, **kw):
        model = real(*a, **kw)
        model.register_forward_pre_hook(seen, with_kwargs=True)
        return model

    monkeypatch.setattr(models, "load_model", load_model)
    config = {"model": tiny_llama, "data": {"train": instruction_rows(32)},
              "train": {"max_steps": 4, "logging_steps": 2, "eval_steps": 0, "per_device_train_batch_size": 4,
                        "output_dir": str(workdir / "out")}}  # fmt: skip
    run = peft_magic.train(config, display="none")
    assert run.status == "done"
    assert masks == [True] * 4  # every training forward ran unmasked (the first after the one-time check)


@pytest.mark.parametrize("autocast", [False, True])
def test_the_frozen_heads_logits_buffers_are_reused_across_steps_and_grow_when_needed(autocast):
    """Steps of the fused loss share one set of logits buffers (faulted in once, not per chunk and step): the same
    storage from step to step, grown for a step with more trained positions, and each step's loss and gradient are
    those of `cross_entropy` over the full logits (several chunks per step)."""
    from peft_magic.training.chunked_loss import _FrozenHeadCE

    torch.manual_seed(0)
    weight, buffers, seen = torch.randn(VOCAB, 32), {}, []
    for rows in (10, 10, 40, 25):
        h = torch.randn(rows, 32, requires_grad=True)
        tgt = torch.randint(0, VOCAB, (rows,))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            total = _FrozenHeadCE.apply(h, weight, None, tgt, 16, 1.0, None, buffers)
            ref_h = h.detach().clone().requires_grad_()
            ref = torch.nn.functional.cross_entropy((ref_h @ weight.t()).float(), tgt, reduction="sum")
        total.backward(), ref.backward()
        tol = {"rtol": 2e-2, "atol": 1e-2} if autocast else {"rtol": 1e-5, "atol": 1e-5}
        torch.testing.assert_close(total, ref, **tol)
        torch.testing.assert_close(h.grad, ref_h.grad, **tol)
        seen.append({name: (buf.data_ptr(), buf.shape[0]) for name, (_, buf) in buffers.items()})
    assert set(seen[0]) == ({"logits", "logits32"} if autocast else {"logits"})
    assert seen[0] == seen[1] and all(rows == 10 for _, rows in seen[0].values())  # reused
    assert all(rows == 16 for _, rows in seen[2].values())  # grown, never past `chunk` (16) rows
    assert seen[2] == seen[3]
