"""Every peft-backed method of the catalog, for real, on tiny models: it lowers the loss on a fixed batch, changes
exactly the parameters it claims (and no base weight), and its export reloads with `PeftModel.from_pretrained`
to the same outputs. Plus the defaults that make each method work out of the box, and the clear refusals."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import lm_rows, sentiment_rows

from peft_magic import api, session
from peft_magic.config.parse import parse_config
from peft_magic.errors import ConfigError
from peft_magic.events import EventBus
from peft_magic.methods import available, get_method
from peft_magic.run import Run

# Two shared CPU cores: one intra-op thread avoids the spin-waiting that makes tiny matmuls 100x slower.
torch.set_num_threads(1)

LORA = r"\.lora_[AB]\.default\.weight$"
HEAD = r"\.(classifier|score)\.modules_to_save\.default\.(weight|bias)$"
FOURIERFT = {"name": "peft", "peft_type": "FOURIERFT"}

# method -> (learning rate, regexes of the parameters it claims to train). Rates are per method because the
# methods move very different numbers of parameters: a few scaling vectors (ia3, vera) need a larger step
# than a rank-8 update to show in 8 steps.
CAUSAL = {
    "lora": (5e-3, [LORA]),
    "dora": (5e-3, [LORA, r"\.lora_magnitude_vector\.default\.weight$"]),
    "rslora": (5e-3, [LORA]),
    "qlora": (5e-3, [LORA]),
    "adalora": (5e-3, [r"\.lora_[ABE]\.default$"]),
    "loha": (2e-2, [r"\.hada_w[12]_[ab]\.default$"]),
    "lokr": (2e-2, [r"\.lokr_w[12](_[ab])?\.default$"]),
    "vera": (5e-2, [r"\.vera_lambda_[bd]\.default$"]),
    "oft": (5e-3, [r"\.oft_R\.default\.weight$"]),
    "boft": (5e-2, [r"\.boft_[Rs]\.default$"]),
    "ia3": (5e-2, [r"\.ia3_l\.default$"]),
    "prompt-tuning": (5e-2, [r"^prompt_encoder\.default\.embedding\.weight$"]),
    "prefix-tuning": (5e-2, [r"^prompt_encoder\.default\.embedding\.weight$"]),
    "p-tuning": (5e-3, [r"^prompt_encoder\.default\.(embedding|mlp_head\.\d)\.(weight|bias)$"]),
    "llama-adapter": (5e-2, [r"\.self_attn\.adaption_(prompt|gate)$"]),
    "ln-tuning": (5e-2, [r"norm\.ln_tuning_layers\.default\.weight$"]),
    "fourierft": (5e-2, [r"\.fourierft_spectrum\.default$"]),
}
SEQ_CLS = {
    "lora": (5e-3, [LORA, HEAD]),
    "adalora": (5e-3, [r"\.lora_[ABE]\.default$", HEAD]),
    "vera": (5e-2, [r"\.vera_lambda_[bd]\.default$", HEAD]),
    "oft": (5e-3, [r"\.oft_R\.default\.weight$", HEAD]),
    "ia3": (5e-2, [r"\.ia3_l\.default$", HEAD]),
    "prompt-tuning": (5e-2, [r"^prompt_encoder\.default\.embedding\.weight$", HEAD]),
    "p-tuning": (5e-3, [r"^prompt_encoder\.default\.(embedding|mlp_head\.\d)\.(weight|bias)$", HEAD]),
    "ln-tuning": (5e-2, [r"LayerNorm\.ln_tuning_layers\.default\.(weight|bias)$", HEAD]),
}


def spec(name):
    return FOURIERFT if name == "fourierft" else name


def observed_run(config):
    """Set up a run, snapshot its parameters and the loss on a fixed batch, train, and measure again."""
    run = Run("t", api.resolve_config(config))
    bus = EventBus()
    session.setup(run, None, bus)
    exact_4bit_cpu_path(run.model)
    batch = run.data.collator([run.data.train[i] for i in range(8)])
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    loss_before = loss_on(run.model, batch)
    session.fit(run, bus)
    return run, batch, before, loss_before


def exact_4bit_cpu_path(model):
    """bitsandbytes repacks 4-bit weights in place on the first no-grad CPU forward and then computes in bf16
    (AVX512-BF16), but not when inputs require grad (as after kbit preparation): two equal models would differ
    by ~1e-3 depending on the path taken. Pin both to the float32 dequantize path so equality is exact."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def loss_on(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).loss.item()


def outputs(model, batch):
    """Logits without labels: a reloaded AdaLoRA fails on labels in plain peft (see `fix_loaded`)."""
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def check_claims(run, before, claims):
    """Only parameters matching `claims` may train and change; every one of them must change."""
    after = dict(run.model.named_parameters())
    claimed = {n for n in after if any(re.search(c, n) for c in claims)}
    trainable = {n for n, p in after.items() if p.requires_grad}
    changed = {n for n, p in after.items() if not torch.equal(p.detach(), before[n])}
    assert claimed, f"no parameter matches {claims}"
    assert trainable == claimed, f"trainable but unclaimed: {sorted(trainable - claimed)[:3]}; claimed but frozen: {sorted(claimed - trainable)[:3]}"  # fmt: skip
    assert changed == claimed, f"changed but unclaimed: {sorted(changed - claimed)[:3]}; unchanged: {sorted(claimed - changed)[:3]}"  # fmt: skip
    for c in claims:  # each claimed kind is present, not only the union
        assert any(re.search(c, n) for n in changed), c


def train_config(model, task, method, lr, out, data):
    return {
        "model": model,
        "task": task,
        "method": spec(method),
        "data": {"train": data},
        "train": {"max_steps": 8, "learning_rate": lr, "per_device_train_batch_size": 8, "logging_steps": 4,
                  "eval_steps": 0, "output_dir": str(out), "mixed_precision": "no"},
    }  # fmt: skip


def check_method(run, batch, before, loss_before, claims, base, tmp_path):
    from peft import PeftModel

    assert run.state.stop_reason == "completed" and run.state.step == 8
    check_claims(run, before, claims)
    loss_after = loss_on(run.model, batch)
    assert loss_after < loss_before - 0.01, (loss_before, loss_after)
    trainable, total = run.state.trainable_params, run.state.total_params
    assert 0 < trainable < total
    path = run.export(tmp_path / "adapter")
    reloaded = exact_4bit_cpu_path(PeftModel.from_pretrained(base, path))
    diff = (outputs(reloaded, batch) - outputs(run.model, batch)).abs().max().item()
    assert diff <= 1e-5


@pytest.mark.parametrize("method", list(CAUSAL))
def test_causal_lm_method_trains_changes_only_its_parameters_and_reloads(method, tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    lr, claims = CAUSAL[method]
    observed = observed_run(train_config(tiny_llama, "causal-lm", method, lr, tmp_path / "out", lm_rows()))
    kw = {}
    if method == "qlora":  # the same 4-bit base the run trained on
        assert observed[0].config.model.quantization == "4bit"
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, **kw)
    check_method(*observed, claims, base, tmp_path)


@pytest.mark.parametrize("method", list(SEQ_CLS))
def test_seq_cls_method_trains_its_parameters_and_the_head(method, separable_bert, tmp_path):
    from transformers import AutoModelForSequenceClassification

    lr, claims = SEQ_CLS[method]
    observed = observed_run(train_config(separable_bert, "seq-cls", method, lr, tmp_path / "out", sentiment_rows()))
    base = AutoModelForSequenceClassification.from_pretrained(separable_bert, num_labels=2)
    check_method(*observed, claims, base, tmp_path)


def test_every_peft_method_of_the_registry_is_in_the_suite():
    peft_backed = {name for name, m in available().items() if getattr(m, "is_peft", False)}
    assert peft_backed == (set(CAUSAL) - {"fourierft"}) | {"peft"}
    assert {m.family for n, m in available().items() if n in peft_backed and n != "peft"} <= {"A", "S", "R"}


# ---------------------------------------------------------------- defaults that adapt, refusals that explain


def tiny_llama_model(hidden, heads, kv_heads, intermediate):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=hidden, intermediate_size=intermediate,
                                        num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                        max_position_embeddings=32))  # fmt: skip


def cfg_for(method, task="causal-lm", **train):
    return parse_config({"model": "unused/name", "task": task, "method": method, "data": {"train": "unused"},
                         "train": train})  # fmt: skip


def test_boft_block_size_adapts_to_layer_widths():
    # widths 30 (hidden) and 62 (intermediate) share only 2: the default 4 would not divide them
    model = tiny_llama_model(hidden=30, heads=3, kv_heads=1, intermediate=62)
    peft_model = get_method("boft").apply(model, cfg_for("boft"))
    assert peft_model.peft_config["default"].boft_block_size == 2
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) > 0


def test_boft_refuses_widths_without_an_even_divisor():
    model = tiny_llama_model(hidden=30, heads=3, kv_heads=1, intermediate=45)  # gcd 15: odd
    with pytest.raises(ConfigError, match="boft_block_num") as e:
        get_method("boft").apply(model, cfg_for("boft"))
    assert e.value.key == "method.boft_block_size" and "30, 45" in str(e.value)


def test_user_boft_block_size_is_kept():
    model = tiny_llama_model(hidden=32, heads=4, kv_heads=2, intermediate=64)
    peft_model = get_method("boft").apply(model, cfg_for({"name": "boft", "boft_block_size": 8}))
    assert peft_model.peft_config["default"].boft_block_size == 8


def test_adalora_total_step_follows_the_run_length():
    model = tiny_llama_model(hidden=32, heads=4, kv_heads=2, intermediate=64)
    peft_model = get_method("adalora").apply(model, cfg_for("adalora", max_steps=37))
    assert peft_model.peft_config["default"].total_step == 37


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_adalora_total_step_counts_the_processes(processes, monkeypatch):
    """With N processes each takes its own batches, so an epoch has 1/N of the steps: AdaLoRA's schedule must end
    on the step the engine plans (40 rows, batch 4, accumulation 1, 3 epochs: 30 / 15 / 12 steps)."""
    from torch.utils.data import DataLoader

    from peft_magic.training.schedule import plan_steps

    monkeypatch.setenv("WORLD_SIZE", str(processes))  # what every launcher sets in each process
    cfg = cfg_for("adalora", max_steps=-1, num_train_epochs=3, per_device_train_batch_size=4,
                  gradient_accumulation_steps=1)  # fmt: skip
    rows = [{"input_ids": [1, 2]}] * 40
    peft_model = get_method("adalora").apply(tiny_llama_model(hidden=32, heads=4, kv_heads=2, intermediate=64), cfg,
                                             calibration=lambda: DataLoader(rows, batch_size=4))  # fmt: skip
    planned = plan_steps(cfg, len(rows), processes)[0]  # what engine.fit runs (accelerator.num_processes == N)
    assert planned == {1: 30, 2: 15, 3: 12}[processes]
    assert peft_model.peft_config["default"].total_step == planned


def test_adalora_total_step_from_epochs_and_rank_budget_is_reallocated(tiny_llama, tmp_path):
    # 40 rows / batch 8 = 5 steps per epoch, 2 epochs = 10 steps; the run calls update_and_allocate each step
    cfg = train_config(tiny_llama, "causal-lm", "adalora", 5e-3, tmp_path, lm_rows(40))
    cfg["train"].update(max_steps=-1, num_train_epochs=2, logging_steps=5)
    run = api.train(cfg, display="none")
    config = run.model.peft_config["default"]
    assert config.total_step == 10 and run.state.step == 10
    assert run.model._peft_magic_adalora["step"] == 10
    ranks = [int(v.sum()) if hasattr(v, "sum") else sum(v) for v in config.rank_pattern.values()]
    assert ranks and min(ranks) < config.init_r  # the budget moved: some ranks were pruned


def test_llama_adapter_uses_all_layers_of_a_small_model():
    model = tiny_llama_model(hidden=32, heads=4, kv_heads=2, intermediate=64)
    peft_model = get_method("llama-adapter").apply(model, cfg_for("llama-adapter"))
    assert peft_model.peft_config["default"].adapter_layers == 2


def test_ln_tuning_finds_the_norms_of_models_peft_does_not_know(tiny_bert):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    peft_model = get_method("ln-tuning").apply(model, cfg_for("ln-tuning", task="seq-cls"))
    assert set(peft_model.peft_config["default"].target_modules) == {"LayerNorm"}


def test_prefix_tuning_is_refused_on_bert(tiny_bert, tmp_path):
    with pytest.raises(ConfigError, match="prompt-tuning") as e:
        api.train(train_config(tiny_bert, "seq-cls", "prefix-tuning", 1e-2, tmp_path, sentiment_rows()), display="none")
    assert e.value.key == "method.name"


def test_llama_adapter_is_refused_on_bert(tiny_bert, tmp_path):
    with pytest.raises(ConfigError, match="llama, mistral") as e:
        api.train(train_config(tiny_bert, "seq-cls", "llama-adapter", 1e-2, tmp_path, sentiment_rows()), display="none")
    assert e.value.key == "method.name" and "'bert'" in str(e.value)


def test_generic_peft_needs_a_known_peft_type():
    with pytest.raises(ConfigError, match="FOURIERFT") as e:
        cfg_for({"name": "peft", "peft_type": "FOURIER"})
    assert e.value.key == "method.peft_type"


def test_peft_parameter_typo_gets_did_you_mean():
    with pytest.raises(ConfigError, match="boft_block_size") as e:
        cfg_for({"name": "boft", "boft_blocksize": 4})
    assert e.value.key == "method.boft_blocksize"


def test_reloaded_adalora_evaluates_with_peft_magic_load(tiny_llama, tmp_path):
    import peft_magic

    cfg = train_config(tiny_llama, "causal-lm", "adalora", 5e-3, tmp_path / "out", lm_rows(40))
    cfg["data"]["eval"] = lm_rows(8, seed=1)
    run = api.train(cfg, display="none")
    loaded = peft_magic.load(run.export(tmp_path / "adapter"))
    loaded.config.data.eval = None
    metrics = loaded.evaluate(lm_rows(8, seed=1))
    # the same task loss as the run's own final evaluation: the orthogonality regulariser is left out of both
    assert metrics["loss"] == pytest.approx(run.metrics["loss"], abs=1e-5)
    assert metrics["perplexity"] == pytest.approx(run.metrics["perplexity"], rel=1e-4)
