"""Full fine-tuning as the baseline, measured forgetting and data-efficiency sweeps, on tiny models.

* `method: full` trains every parameter, exports a transformers model that `AutoModelFor*.from_pretrained` and
  `peft_magic.load` reload with the same logits, resumes exactly, and is refused on a quantized base or when the
  memory pre-flight says it cannot fit (with an override).
* Forgetting: the base and tuned losses on the given general text equal a direct, independent computation with
  the untouched base model and the tuned model, for a peft method (base via disable_adapter) and full (base before).
* A `train_samples` sweep trains each variant on the stated number of rows; the comparison table and pictures
  carry trainable %, memory, time, the task metric and forgetting.
"""

from __future__ import annotations

import io
import math
import os

import pandas as pd
import pytest
import torch
from conftest import lm_rows

import peft_magic
from peft_magic import devices
from peft_magic.comparison.plan import plan_variants
from peft_magic.comparison.run import compare
from peft_magic.errors import ConfigError

torch.set_num_threads(1)  # two shared CPU cores: one intra-op thread is much faster for tiny matmuls

GENERAL = ["hello world say yes", "the dog sat on the mat", "what a great film", "why is the cat not on the mat",
           "ok the music was really nice", "how boring the plot was"]  # fmt: skip


def config(model, out, method="full", steps=3, **data):
    return {"model": model, "method": method, "data": {"train": lm_rows(24), **data},
            "train": {"max_steps": steps, "learning_rate": 1e-2, "logging_steps": 1, "eval_steps": 0,
                      "output_dir": str(out)}}  # fmt: skip


def base_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def logits(model, tokenizer):
    ids = tokenizer("the cat sat on the mat", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def direct_loss(model, tokenizer, texts, max_length=256) -> float:
    """Mean negative log-likelihood per predicted token, text by text, with no peft_magic code involved."""
    total, count = 0.0, 0
    model.eval()
    for text in texts:
        ids = tokenizer(text + tokenizer.eos_token, truncation=True, max_length=max_length)["input_ids"]
        ids = torch.tensor([ids])
        with torch.no_grad():
            out = model(input_ids=ids).logits[0, :-1].double()
        total += torch.nn.functional.cross_entropy(out, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return total / count


# ---------------------------------------------------------------- full fine-tuning


def test_full_trains_every_parameter_and_exports_a_transformers_model(tiny_llama, tokenizer, workdir):
    from transformers import AutoModelForCausalLM

    run = peft_magic.train(config(tiny_llama, workdir / "out"), display="none")
    base = dict(base_model(tiny_llama).named_parameters())
    trained = dict(run.model.named_parameters())
    assert trained.keys() == base.keys()
    assert all(p.requires_grad for p in trained.values())
    unchanged = [n for n, p in trained.items() if torch.equal(p.detach(), base[n])]
    assert unchanged == []
    n = sum(p.numel() for p in trained.values())
    assert run.state.trainable_params == run.state.total_params == n
    assert run.config.model.dtype == "float32"  # dtype auto -> fp32 master weights

    out = run.export(workdir / "export")
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "README.md", "peft_magic.yaml"} <= files
    assert "adapter_config.json" not in files
    with open(os.path.join(out, "README.md"), encoding="utf-8") as fh:
        card = fh.read()
    assert "library_name: transformers" in card and "AutoModelForCausalLM.from_pretrained" in card
    assert "| export | full model |" in card
    expected = logits(run.model.eval(), tokenizer)
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(out), tokenizer), expected, atol=1e-6)
    loaded = peft_magic.load(out)
    assert loaded.method.name == "full"
    assert torch.allclose(logits(loaded.model, tokenizer), expected, atol=1e-6)


def test_full_resumes_exactly_from_its_checkpoint(tiny_llama, workdir):
    cfg = config(tiny_llama, workdir / "a", steps=4)
    cfg["train"]["save_steps"] = 2
    whole = peft_magic.train(cfg, display="none")
    assert os.path.isfile(workdir / "a" / "checkpoint-2" / "model.safetensors")
    cfg["train"]["output_dir"] = str(workdir / "b")
    resumed = peft_magic.train(cfg, display="none", resume=str(workdir / "a" / "checkpoint-2"))
    assert resumed.state.step == 4
    for (name, p), q in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


@pytest.mark.parametrize("model_keys, key", [({"quantization": "4bit"}, "model.quantization"),
                                             ({"dtype": "float16"}, "model.dtype")])  # fmt: skip
def test_full_refuses_quantized_or_fp16_weights(tiny_llama, model_keys, key):
    with pytest.raises(ConfigError) as e:
        peft_magic.parse_config({"model": {"name_or_path": tiny_llama, **model_keys}, "method": "full",
                                 "data": {"train": lm_rows(4)}})  # fmt: skip
    assert e.value.key == key


def test_full_is_refused_with_an_estimate_when_it_cannot_fit(tiny_llama, workdir, monkeypatch):
    from peft_magic import models
    from peft_magic.methods import get_method
    from peft_magic.methods.full import estimate_full

    tiny = devices.DeviceInfo("cpu", "test CPU", total_memory=2**31, free_memory=2**20)
    monkeypatch.setattr(devices, "device_info", lambda: tiny)
    with monkeypatch.context() as m:
        m.setattr(models, "load_model", lambda *a, **k: pytest.fail("refused only after loading the weights"))
        with pytest.raises(ConfigError, match=r"needs ~[\d.]+ GB at its peak .* CPU RAM has") as e:
            peft_magic.train(config(tiny_llama, workdir / "out"), display="none")
    assert e.value.key == "method.name"
    assert "method: lora" in str(e.value) and "force: true" in str(e.value)
    assert not os.path.exists(workdir / "out")  # refused before training
    with pytest.raises(ConfigError, match="needs ~"):  # `apply` itself refuses too (direct use, re-run checks)
        get_method("full").apply(base_model(tiny_llama), peft_magic.parse_config(config(tiny_llama, workdir)))

    cfg = config(tiny_llama, workdir / "forced", steps=1)
    cfg["method"] = {"name": "full", "force": True}
    assert peft_magic.train(cfg, display="none").state.stop_reason == "completed"

    model = base_model(tiny_llama)
    n = sum(p.numel() for p in model.parameters())
    est = estimate_full(model, peft_magic.parse_config(cfg), tiny)
    # the weights are the trainable parameters: no extra copy; fp32 gradients and two fp32 AdamW moments
    assert (est.trainable, est.gradients, est.optimizer) == (0, 4 * n, 8 * n)
    assert est.total == est.weights + est.gradients + est.optimizer + est.activations + est.overhead


# ---------------------------------------------------------------- forgetting


@pytest.fixture(scope="module")
def lora_run(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-forgetting")
    return peft_magic.train(config(tiny_llama, out, method="lora", forgetting="$texts"), namespace={"texts": GENERAL},
                            display="none")  # fmt: skip


@pytest.mark.parametrize("method", ["lora", "full"])
def test_forgetting_equals_a_direct_computation_on_base_and_tuned_models(method, tiny_llama, tokenizer, lora_run,
                                                                         tmp_path):  # fmt: skip
    run = (
        lora_run
        if method == "lora"
        else peft_magic.train(
            config(tiny_llama, tmp_path / "full", forgetting="$texts"), namespace={"texts": GENERAL}, display="none"
        )
    )
    m = run.metrics
    assert m["forgetting_base_loss"] == pytest.approx(direct_loss(base_model(tiny_llama), tokenizer, GENERAL), rel=1e-5)
    assert m["forgetting_loss"] == pytest.approx(direct_loss(run.model, tokenizer, GENERAL), rel=1e-5)
    assert m["forgetting_loss"] != pytest.approx(m["forgetting_base_loss"], rel=1e-4)  # training moved it
    assert m["forgetting_loss_delta"] == pytest.approx(m["forgetting_loss"] - m["forgetting_base_loss"])
    assert m["forgetting_base_ppl"] == pytest.approx(math.exp(m["forgetting_base_loss"]))
    assert m["forgetting_ppl_ratio"] == pytest.approx(m["forgetting_ppl"] / m["forgetting_base_ppl"])
    row = run.history[-1]
    assert row["step"] == run.state.step and row["forgetting_loss_delta"] == m["forgetting_loss_delta"]


def test_forgetting_reads_the_source_it_is_given(tiny_llama, tokenizer, workdir):
    from peft_magic.training.forgetting import load_texts, tokenized
    from peft_magic.data.general_text import PARAGRAPHS

    spelled = peft_magic.parse_config(
        {"model": tiny_llama, "data": {"train": lm_rows(4)}, "eval": {"forgetting": True}}
    )
    assert spelled.data.forgetting == "default"  # `eval: {forgetting: ...}` is data.forgetting; true is the default
    assert tokenized(spelled, tokenizer).num_rows == len(PARAGRAPHS) >= 50
    path = workdir / "general.jsonl"
    path.write_text("\n".join(f'{{"body": "{t}"}}' for t in ["", *GENERAL]) + "\n")
    assert load_texts(str(path), text_column="body")["text"] == GENERAL  # the run's text column; blanks dropped
    assert load_texts(pd.DataFrame({"text": GENERAL}))["text"] == GENERAL
    other = ["say no say no say no", "yes yes yes"]
    a = peft_magic.train(config(tiny_llama, workdir / "a", method="full", steps=1, forgetting=GENERAL), display="none")
    b = peft_magic.train(config(tiny_llama, workdir / "b", method="full", steps=1, forgetting=other), display="none")
    assert a.metrics["forgetting_base_loss"] == pytest.approx(direct_loss(base_model(tiny_llama), tokenizer, GENERAL))
    assert b.metrics["forgetting_base_loss"] == pytest.approx(direct_loss(base_model(tiny_llama), tokenizer, other))


@pytest.mark.parametrize(
    "raw, key, fragment",
    [
        ({"task": "seq-cls", "data": {"train": [{"text": "a", "label": 0}], "forgetting": "default"}},
         "data.forgetting", "no language-model head"),
        ({"data": {"train": [{"text": "a"}]}, "eval": {"forgetting": "default", "steps": 3}}, "eval", "takes `forgetting: SOURCE`"),
        ({"data": {"train": [{"text": "a"}]}, "eval": 0.1}, "eval", "data: \\{eval"),
        ({"data": {"train": [{"text": "a"}], "forgetting": " "}}, "data.forgetting", "empty"),
    ],
)  # fmt: skip
def test_forgetting_config_mistakes_name_the_key(tiny_llama, raw, key, fragment):
    with pytest.raises(ConfigError, match=fragment) as e:
        peft_magic.parse_config({"model": tiny_llama, **raw})
    assert e.value.key == key


def test_a_source_without_text_fails_before_the_model_loads(tiny_llama, workdir):
    with pytest.raises(ConfigError, match="no text column") as e:
        peft_magic.train(config(tiny_llama, workdir / "out", forgetting=[{"body": "x"}]), display="none")
    assert e.value.key == "data.forgetting"


def test_forgetting_shows_in_summary_printer_panel_and_model_card(lora_run):
    from peft_magic.export.modelcard import model_card
    from peft_magic.ui.panel import LivePanel
    from peft_magic.ui.summary import summary_html
    from peft_magic.ui.terminal import TerminalPrinter

    m = lora_run.metrics
    base, tuned = f"{m['forgetting_base_loss']:.3g}", f"{m['forgetting_loss']:.3g}"
    html = summary_html(lora_run.state, lora_run.history)
    assert "general-text loss" in html and base in html and tuned in html
    stream = io.StringIO()
    TerminalPrinter(stream).on_train_end(lora_run.state)
    assert f"general-text loss {base} base → {tuned} tuned" in stream.getvalue()
    assert "general text" in LivePanel(auto_show=False)._stats_html(lora_run.state)
    card = model_card(lora_run)
    assert "## Forgetting (general text)" in card and f"{m['forgetting_loss_delta']:+.4f}" in card
    assert "forgetting_loss" not in card.split("## Final evaluation")[-1].split("##")[0]  # not repeated as a metric


# ---------------------------------------------------------------- data efficiency and comparisons


def test_train_samples_is_a_sweep_key_with_all_meaning_every_row(tmp_path):
    variants = plan_variants({"model": "org/m", "data": {"train": "x.csv"}, "train": {"output_dir": str(tmp_path)}},
                    sweep={"train_samples": [100, "all"]})  # fmt: skip
    assert [v.label for v in variants] == ["train_samples=100", "train_samples=all"]
    assert [v.raw["data"]["max_samples"] for v in variants] == [100, None]


def test_compare_full_and_lora_over_train_sizes_with_forgetting(tiny_llama, workdir):
    cfg = config(tiny_llama, workdir / "cmp", steps=2, eval=lm_rows(6, seed=5), forgetting="$texts")
    cmp = compare(cfg, methods=["full", "lora"], sweep={"train_samples": [8, "all"]}, namespace={"texts": GENERAL},
                  display="none")  # fmt: skip
    t = cmp.table
    assert list(t["variant"]) == ["full · train_samples=8", "full · train_samples=all",
                                  "lora · train_samples=8", "lora · train_samples=all"]  # fmt: skip
    assert list(t["train_rows"]) == [8, 24, 8, 24]  # trained on the stated sizes
    for col in ("trainable_pct", "peak_memory_gb", "train_time_s", "eval_loss", "forgetting_loss_delta",
                "forgetting_ppl_ratio"):  # fmt: skip
        assert t[col].notna().all(), col
    assert "eval_forgetting_loss" not in t.columns
    assert list(t["trainable_pct"])[:2] == [100.0, 100.0] and all(t["trainable_pct"][2:] < 100)
    bases = {r.metrics["forgetting_base_loss"] for r in cmp.runs.values()}
    assert max(bases) - min(bases) < 1e-5  # one base model, measured the same way before full and after lora
    assert cmp.best("forgetting_loss_delta") == t.loc[t["forgetting_loss_delta"].idxmin(), "variant"]
    scatter, sizes = cmp.tradeoff_svg(), cmp.size_svg()
    assert scatter.count('class="point"') == 4 and "loss (lower is better)" in scatter
    assert sizes.count("<polyline") == 2 and sizes.count('class="point"') == 4
    html = cmp._repr_html_()
    assert 'alt="task metric vs forgetting"' in html and 'alt="task metric vs training-set size"' in html
    assert "×" in html  # the ppl ratio column is formatted
