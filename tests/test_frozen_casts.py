"""Frozen weights cast once per run and pre-norm outputs cast once per forward (training/frozen_casts.py): the same
loss and gradients under bf16 autocast (bit for bit for the weights, at rounding level for the norms), nothing
changed outside autocast, and the model exactly as it was after a run that completes, fails or is stopped."""

from __future__ import annotations

import pytest
import torch
from conftest import instruction_rows
from test_lora_casts import loss_and_grads, tiny_lora

import peft_magic
from peft_magic import models
from peft_magic.training import engine
from peft_magic.training.frozen_casts import cache_frozen_weights, half_norm_outputs
from peft_magic.training.lora_casts import skip_input_casts

IDS = torch.randint(1, 97, (3, 16), generator=torch.Generator().manual_seed(0))


def cached(model):
    return [m for m in model.modules() if "_weight16" in m.__dict__]


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same(model, before):
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for n, p in before.items():
        assert after[n].dtype == p.dtype and torch.equal(after[n], p), n


def test_frozen_weights_cast_once_give_the_same_loss_and_gradients_bit_for_bit():
    model = tiny_lora()
    skip_input_casts(model, "bf16")
    before = snapshot(model)
    ref_loss, ref = loss_and_grads(model, IDS)
    release = cache_frozen_weights(model, "bf16")
    base = model.get_base_model()
    assert base.model.layers[0].self_attn.q_proj.base_layer in cached(model)
    assert base.lm_head in cached(model)  # untied here: frozen and not shared
    assert all(m._weight16.dtype == torch.bfloat16 for m in cached(model))
    assert not any(p.requires_grad for m in cached(model) for p in m.parameters())  # LoRA's A and B stay out
    # the float32 originals wait in one file mapping for the run (not RAM), with their values
    assert len({m.weight.untyped_storage().data_ptr() for m in cached(model)}) == 1
    assert_same(model, before)
    loss, grads = loss_and_grads(model, IDS)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for name, g in ref.items():
        torch.testing.assert_close(grads[name], g, rtol=0, atol=0, msg=name)
    with torch.no_grad():  # outside autocast: the float32 weights, as without the copies
        model.eval()
        plain = model(input_ids=IDS).logits
        release()
        torch.testing.assert_close(model(input_ids=IDS).logits, plain, rtol=0, atol=0)
    assert not cached(model) and not any("forward" in m.__dict__ for m in model.modules())
    assert_same(model, before)
    assert base.dtype == torch.float32
    storages = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(set(storages)) == len(storages)  # back in memory, each weight its own


def test_originals_stay_in_memory_where_no_disk_holds_the_temporary_folder(tmp_path, monkeypatch):
    from peft_magic.training import offload

    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/vda / ext4 rw 0 0\ntmpfs /tmp tmpfs rw 0 0\nnone /tmp/my\\040dir ext4 rw 0 0\n")
    assert offload._filesystem("/tmp/x", str(mounts)) == "tmpfs"
    assert offload._filesystem("/tmp/my dir/x", str(mounts)) == "ext4"
    assert offload._filesystem("/home", str(mounts)) == "ext4"
    monkeypatch.setattr(offload, "_filesystem", lambda path: "tmpfs")
    assert offload.offload_folder(1) is None
    model = tiny_lora()
    release = cache_frozen_weights(model, "bf16")
    assert len({m.weight.untyped_storage().data_ptr() for m in cached(model)}) == len(cached(model)) > 1
    release()
    monkeypatch.setattr(offload, "_filesystem", lambda path: "ext4")
    assert offload.offload_folder(1) is not None
    monkeypatch.setenv("PEFT_MAGIC_OFFLOAD", "0")
    assert offload.offload_folder(1) is None


def test_a_weight_written_during_the_run_is_cast_again():
    model = tiny_lora()
    release = cache_frozen_weights(model, "bf16")
    q = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    with torch.no_grad():
        q.weight.mul_(0.5)
    x = torch.randn(2, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = q(x)
    written = q.weight.detach().clone()
    release()
    assert torch.equal(q.weight, written)  # the write (copy-on-write in the mapping) is kept
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(ours, q(x), rtol=0, atol=0)


def test_tied_trainable_and_other_precisions_are_left_alone():
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    model = tf.LlamaForCausalLM(cfg)
    model.model.layers[0].mlp.requires_grad_(False)
    release = cache_frozen_weights(model, "bf16")
    assert cached(model) == [model.model.layers[0].mlp.gate_proj, model.model.layers[0].mlp.up_proj,
                             model.model.layers[0].mlp.down_proj]  # fmt: skip
    release()
    assert not cached(model)
    model.requires_grad_(False)
    cache_frozen_weights(model, "no")
    half_norm_outputs(model, "no")
    assert not cached(model) and not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("dropout", [0.1, 0.0])
def test_norm_outputs_cast_once_give_the_same_loss_and_gradients(dropout):
    model = tiny_lora(dropout)  # p 0: LoRA's A reads the norm's output itself; else the dropout inside A does
    skip_input_casts(model, "bf16")
    ref_loss, ref = loss_and_grads(model, IDS)
    release = half_norm_outputs(model, "bf16")
    block = model.get_base_model().model.layers[0]
    assert block.input_layernorm._forward_hooks and block.mlp.up_proj.base_layer._forward_pre_hooks
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
             for m in (block.self_attn.k_proj.base_layer, block.self_attn.k_proj.lora_A.default)]  # fmt: skip
    loss, grads = loss_and_grads(model, IDS)
    [h.remove() for h in hooks]
    assert seen == [torch.bfloat16] * 2  # the copy, not the float32 output (dropout inside A too: it keeps the copy)
    release()
    assert not block.input_layernorm._forward_hooks and not block.mlp.up_proj.base_layer._forward_pre_hooks
    if dropout:  # A drops the 16-bit copy in 16 bits: a rounding apart (tests/test_dropout.py measures how close)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=0)
        diff = sum((grads[n] - g).norm() ** 2 for n, g in ref.items()) ** 0.5
        assert 0 < diff <= 0.1 * sum(g.norm() ** 2 for g in ref.values()) ** 0.5
        return
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for name, g in ref.items():
        torch.testing.assert_close(grads[name], g, rtol=0, atol=0, msg=name)


def test_both_together_and_outside_autocast_nothing_changes():
    model = tiny_lora(0.0)  # bit for bit: no dropout inside A (it drops the 16-bit copy: test above)
    skip_input_casts(model, "bf16")
    ref_loss, ref = loss_and_grads(model, IDS)
    releases = [cache_frozen_weights(model, "bf16"), half_norm_outputs(model, "bf16")]
    loss, grads = loss_and_grads(model, IDS)
    with torch.no_grad():
        plain = model.eval()(input_ids=IDS).logits
    for release in releases:
        release()
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for name, g in ref.items():
        torch.testing.assert_close(grads[name], g, rtol=0, atol=0, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, plain, rtol=0, atol=0)


def test_norm_outputs_of_other_architectures_are_left_alone():
    import transformers as tf

    gemma = tf.Gemma2ForCausalLM(tf.Gemma2Config(vocab_size=97, hidden_size=64, intermediate_size=128,
                                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                                 head_dim=16))  # fmt: skip
    half_norm_outputs(gemma, "bf16")  # sandwich norms: post_attention_layernorm's output joins the residual
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in gemma.modules())


@pytest.fixture
def watched(monkeypatch):
    """The run's model, and what the loop held after each step (copies, norm hooks); `fail_at` / `stop_at` a step."""
    seen = {"steps": [], "fail_at": None, "stop_at": None}
    real_load, real_after = models.load_model, engine.Loop.after_step

    def load_model(*a, **kw):
        seen["model"] = model = real_load(*a, **kw)
        seen["pretrained"] = snapshot(model)
        return model

    def after_step(self):
        step = self.step + 1
        hooks = sum(bool(m._forward_hooks) for n, m in self.model.named_modules() if n.endswith("layernorm"))
        seen["steps"].append((len(cached(self.model)), hooks))
        if step == seen["fail_at"]:
            raise RuntimeError("injected failure")
        if step == seen["stop_at"]:
            self.stop_event.set()
        return real_after(self)

    monkeypatch.setattr(models, "load_model", load_model)
    monkeypatch.setattr(engine.Loop, "after_step", after_step)
    return seen


def run_config(model, out, **train):
    return {"model": model, "method": {"name": "lora", "r": 4, "lora_dropout": 0.1},
            "data": {"train": instruction_rows(24), "eval": 0.25},
            "eval": {"samples": 2, "max_new_tokens": 3},
            "train": {"max_steps": 4, "eval_steps": 2, "logging_steps": 2, "learning_rate": 5e-3,
                      "per_device_train_batch_size": 4, "mixed_precision": "bf16", "output_dir": str(out),
                      **train}}  # fmt: skip


def base_weights_as_loaded(seen):
    """The pretrained weights bit for bit, float32, no copies or hooks left."""
    model = seen["model"]
    assert not cached(model) and not any(m._forward_hooks for m in model.modules())
    assert not any("forward" in m.__dict__ for m in model.modules())
    live = {n.replace("base_layer.", ""): p for n, p in model.named_parameters()}
    for n, p in seen["pretrained"].items():
        key = n.replace("base_model.model.", "").replace("base_layer.", "")
        match = [v for k, v in live.items() if k.endswith(key)]
        assert match and match[0].dtype == torch.float32 and torch.equal(match[0], p), n
    return True


def test_a_bf16_run_with_evaluation_and_samples_uses_the_casts_and_leaves_the_weights_as_loaded(
    tiny_llama, workdir, watched
):
    run = peft_magic.train(run_config(tiny_llama, workdir / "ok", save_steps=2), display="none")
    assert run.state.stop_reason == "completed"
    n_linear = 2 * 7 + 1  # 2 blocks of q/k/v/o/gate/up/down and the untied lm_head
    assert watched["steps"] == [(n_linear, 4)] * 4  # the copies and the 2 x 2 norm hooks, at every step
    rows = [r for r in run.history if "samples" in r]
    assert [r["step"] for r in rows] == [2, 4] and all("eval_loss" in r for r in rows)
    assert all(isinstance(s["answer"], str) for r in rows for s in r["samples"])
    assert base_weights_as_loaded(watched)
    assert run.model.get_base_model().dtype == torch.float32


def lora_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_a_failed_and_a_stopped_bf16_run_leave_the_weights_as_loaded_and_the_stopped_one_resumes(
    tiny_llama, workdir, watched
):
    watched["fail_at"] = 2
    with pytest.raises(Exception, match="injected failure"):
        peft_magic.train(run_config(tiny_llama, workdir / "failed"), display="none")
    assert watched["steps"][0][0] > 0 and base_weights_as_loaded(watched)
    watched.update(fail_at=None, stop_at=2, steps=[])
    run = peft_magic.train(run_config(tiny_llama, workdir / "stopped"), display="none")
    assert run.state.stop_reason == "stopped" and run.state.step == 2
    assert watched["steps"][0][0] > 0 and base_weights_as_loaded(watched)
    watched.update(stop_at=None, steps=[])
    resumed = peft_magic.train(run_config(tiny_llama, workdir / "stopped"), display="none", resume=True)
    assert resumed.state.step == 4 and len(watched["steps"]) == 2 and watched["steps"][0][0] > 0
    assert base_weights_as_loaded(watched)
    whole = peft_magic.train(run_config(tiny_llama, workdir / "whole"), display="none")
    ours, theirs = lora_weights(resumed.model), lora_weights(whole.model)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("task", ["sft", "sft-recomputed", "dpo", "grpo", "sft-dropout"])
def test_runs_with_and_without_the_casts_train_the_same_bit_for_bit(tiny_llama, workdir, monkeypatch, watched, task):
    """The whole run, evaluation, checkpoints and (dpo, grpo) the reference forwards and the sampling included:
    the same losses and the same LoRA weights as a run with only peft's input cast skipped. Bit for bit without
    LoRA dropout; with it (inside A, which then drops the norm output's 16-bit copy) a rounding apart."""
    from test_preference_training import grpo_config, pref_config, says_good

    def train(out):
        if task.startswith("sft"):  # recomputed: activation checkpointing casts and hooks again in backward
            cfg = run_config(tiny_llama, out, save_steps=2, gradient_checkpointing=task == "sft-recomputed")
        else:
            cfg = (grpo_config if task == "grpo" else pref_config)(tiny_llama, out, steps=4)
            cfg["train"].update(mixed_precision="bf16", logging_steps=1, save_steps=2)
        cfg["method"]["lora_dropout"] = 0.1 if task == "sft-dropout" else 0.0
        run = peft_magic.train(cfg, display="none", namespace={"says_good": says_good})
        return [{k: v for k, v in r.items() if k != "samples"} for r in run.history], lora_weights(run.model)

    ours = train(workdir / "ours")
    assert watched["model"].is_gradient_checkpointing == (task == "sft-recomputed")
    # the norm hooks were on; the weights' copies only without checkpointing (there they would add to the peak)
    assert all((n == 0) == (task == "sft-recomputed") and hooks == 4 for n, hooks in watched["steps"])
    assert any("loss" in r or "rewards_margin" in r or "reward" in r for r in ours[0])
    monkeypatch.setattr(engine, "cast_once", lambda model, accelerator, checkpointing: skip_input_casts(
        model, str(accelerator.mixed_precision)))  # fmt: skip
    history, weights = train(workdir / "theirs")
    assert ours[1].keys() == weights.keys()
    if task == "sft-dropout":
        assert [r.keys() for r in ours[0]] == [r.keys() for r in history]
        for a, b in zip(ours[0], history):
            assert all(a[k] == pytest.approx(b[k], rel=1e-2) for k in a if k.endswith("loss")), (a, b)
        diff = sum((ours[1][k] - w).norm() ** 2 for k, w in weights.items()) ** 0.5
        assert diff <= 0.02 * sum(w.norm() ** 2 for w in weights.values()) ** 0.5  # each B within ~10% after 4 steps
        return
    assert ours[0] == history
    assert all(torch.equal(ours[1][k], weights[k]) for k in weights)


def test_pages_given_back_are_read_again_and_written_ones_kept():
    from peft_magic.training import offload

    torch.manual_seed(0)
    layers = [torch.nn.Linear(300, 700, bias=False).requires_grad_(False) for _ in range(3)]
    before = [m.weight.detach().clone() for m in layers]
    restore = offload.offload_originals(layers)
    assert len({m.weight.untyped_storage().data_ptr() for m in layers}) == 1 and offload._MAPPED
    with torch.no_grad():
        layers[1].weight[3:5] = 7.0  # copy-on-write
    before[1][3:5] = 7.0
    offload.page_out()
    assert all(torch.equal(m.weight, b) for m, b in zip(layers, before))
    restore()
    assert not offload._MAPPED
    assert all(torch.equal(m.weight, b) for m, b in zip(layers, before))
    assert len({m.weight.untyped_storage().data_ptr() for m in layers}) == 3


def test_pages_of_a_mapped_checkpoint_are_given_back_after_loading(tmp_path):
    import sys

    from peft_magic.training import offload

    import os

    release = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2] if x.isdigit())
    if not sys.platform.startswith("linux") or release < (5, 4):
        pytest.skip("Linux 5.4+: /proc/self/smaps and MADV_PAGEOUT")
    path = tmp_path / "model.safetensors"  # any mapped file named like a checkpoint
    values = torch.arange(4 << 20, dtype=torch.float32)
    path.write_bytes(values.numpy().tobytes())
    mapped = torch.from_file(str(path), shared=False, size=values.numel(), dtype=torch.float32)

    def resident_kb():
        lines = open("/proc/self/smaps").read().splitlines()
        for i, line in enumerate(lines):
            if line.endswith(str(path)):
                return next(int(x.split()[1]) for x in lines[i + 1 :] if x.startswith("Rss:"))
        return 0

    assert torch.equal(mapped, values)  # every page read: 16 MB resident
    assert resident_kb() > 15_000
    offload.page_out_checkpoints()
    assert resident_kb() < 1_000
    assert torch.equal(mapped, values)  # read again from the file
