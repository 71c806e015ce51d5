"""The backbone end to end on tiny models: train, lower the loss, export, reload to the same logits."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import instruction_rows, lm_rows, sentiment_rows

import peft_magic
from peft_magic.errors import ConfigError


def _losses(run):
    return [r["loss"] for r in run.history if "loss" in r]


def lm_config(model, **train):
    return {
        "model": model,
        "method": {"name": "lora", "r": 4},
        "data": {"train": lm_rows(), "eval": 0.2},
        "train": {"max_steps": 20, "learning_rate": 5e-3, "logging_steps": 5, "eval_steps": 10, **train},
    }


def _logits(model, tok, text="the cat sat on the mat"):
    enc = tok([text], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(**enc).logits


@pytest.fixture(scope="module")
def lm_run(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm-run")
    return peft_magic.train(lm_config(tiny_llama, output_dir=str(out)), display="none")


def test_causal_lm_lora_lowers_loss_and_logs_history(lm_run):
    losses = _losses(lm_run)
    assert len(losses) == 4
    assert losses[-1] < losses[0] * 0.9
    assert lm_run.state.stop_reason == "completed" and lm_run.state.step == 20
    assert "eval_loss" in lm_run.history[-1] and lm_run.metrics["perplexity"] > 1
    assert {"step", "learning_rate"} <= set(lm_run.history[0])
    trainable, total = lm_run.trainable_params
    assert 0 < trainable < total


def test_export_reloads_with_peft_to_the_same_logits(lm_run, tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = lm_run.export(tmp_path / "adapter")
    files = set(os.listdir(path))
    assert {"adapter_config.json", "adapter_model.safetensors", "peft_magic.yaml", "README.md", "tokenizer.json"} <= files
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), path)
    diff = (_logits(reloaded, lm_run.tokenizer) - _logits(lm_run.model, lm_run.tokenizer)).abs().max().item()
    assert diff <= 1e-5
    card = open(os.path.join(path, "README.md")).read()
    assert "lora" in card and "PeftModel.from_pretrained" in card and "perplexity" in card


def test_merged_export_matches_adapter(lm_run, tmp_path):
    from transformers import AutoModelForCausalLM

    path = lm_run.export(tmp_path / "merged", merge=True)
    assert os.path.isfile(os.path.join(path, "model.safetensors"))
    merged = AutoModelForCausalLM.from_pretrained(path)
    diff = (_logits(merged, lm_run.tokenizer) - _logits(lm_run.model, lm_run.tokenizer)).abs().max().item()
    assert diff <= 1e-4


def test_peft_magic_load_roundtrip(lm_run, tmp_path):
    path = lm_run.export(tmp_path / "again")
    loaded = peft_magic.load(path)
    diff = (_logits(loaded.model, loaded.tokenizer) - _logits(lm_run.model, lm_run.tokenizer)).abs().max().item()
    assert diff <= 1e-5


def test_export_refuses_non_empty_folder_without_overwrite(lm_run, tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="overwrite"):
        lm_run.export(target)
    assert (target / "keep.txt").read_text() == "mine"
    lm_run.export(target, overwrite=True)
    assert (target / "adapter_config.json").exists() and not (target / "keep.txt").exists()


def test_seq_cls_string_labels_train_head_and_metrics(tiny_llama, tmp_path):
    # A decoder classifier reads the last token (the sentiment word here), so a tiny random model learns it fast;
    # BERT's [CLS]-pooling needs pretrained weights, which tests/test_real_models.py covers with MiniLM.
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    cfg = {
        "model": tiny_llama,
        "task": "seq-cls",
        "method": {"name": "lora", "r": 4},
        "data": {"train": sentiment_rows(96), "eval": sentiment_rows(32, seed=1)},
        "train": {"max_steps": 30, "learning_rate": 1e-2, "logging_steps": 5, "eval_steps": 15,
                  "output_dir": str(tmp_path / "out")},
    }  # fmt: skip
    run = peft_magic.train(cfg, display="none")
    losses = _losses(run)
    assert losses[-1] < losses[0]
    assert run.labels == ["neg", "pos"]
    assert run.model.config.id2label == {0: "neg", 1: "pos"}
    assert {"accuracy", "precision", "recall", "f1", "confusion_matrix"} <= set(run.metrics)
    assert run.metrics["accuracy"] >= 0.9
    assert run.predict("the film was really awful") == "neg"
    assert run.predict(["the plot was very lovely"]) == ["pos"]
    path = run.export(tmp_path / "cls")
    assert json.load(open(os.path.join(path, "labels.json"))) == ["neg", "pos"]
    base = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=2)
    reloaded = PeftModel.from_pretrained(base, path)
    enc = run.tokenizer(["the movie was good", "the plot was dull"], return_tensors="pt", padding=True)
    run.model.eval()
    reloaded.eval()
    with torch.no_grad():
        assert (reloaded(**enc).logits - run.model(**enc).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_qlora_trains_on_cpu(tiny_llama, tmp_path, quantization):
    cfg = lm_config(tiny_llama, output_dir=str(tmp_path), max_steps=15)
    cfg["model"] = {"name_or_path": tiny_llama, "quantization": quantization}
    run = peft_magic.train(cfg, display="none")
    layer = run.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(layer).__name__ == ("Linear4bit" if quantization == "4bit" else "Linear8bitLt")
    losses = _losses(run)
    assert losses[-1] < losses[0]
    merged = run.export(tmp_path / "merged", merge=True)
    cfg_json = json.load(open(os.path.join(merged, "config.json")))
    assert "quantization_config" not in cfg_json  # merged models are dequantized


def test_qlora_method_implies_4bit(tiny_llama, tmp_path):
    cfg = lm_config(tiny_llama, output_dir=str(tmp_path), max_steps=2)
    cfg["method"] = "qlora"
    parsed = peft_magic.parse_config(cfg)
    assert parsed.model.quantization == "4bit"


def test_instruction_data_masks_the_prompt_and_learns_answers(tiny_llama, tmp_path):
    cfg = {"model": tiny_llama, "data": {"train": instruction_rows()},
           "train": {"max_steps": 40, "learning_rate": 1e-2, "logging_steps": 10, "output_dir": str(tmp_path)}}  # fmt: skip
    run = peft_magic.train(cfg, display="none")
    assert run.data.kind == "instruction"
    row = run.data.train[0]
    prompt_len = sum(1 for x in row["labels"] if x == -100)
    assert 0 < prompt_len < len(row["input_ids"])
    assert row["labels"][prompt_len:] == row["input_ids"][prompt_len:]
    assert run.generate("say hello") == "hello world"


def test_dry_run_trains_nothing(tiny_llama, workdir, capsys):
    plan = peft_magic.dry_run(lm_config(tiny_llama))
    text = plan.text()
    assert "LlamaForCausalLM" in text and "trainable" in text and "20 steps" in text
    assert plan.trainable > 0 and plan.total > plan.trainable
    assert not os.path.exists(workdir / "peft_runs")


def test_overrides_and_aliases(tiny_llama):
    cfg = peft_magic.parse_config(lm_config(tiny_llama), overrides=["train.max_steps=7", "train.batch_size=2", "method.r=2"])
    assert cfg.train.max_steps == 7 and cfg.train.per_device_train_batch_size == 2 and cfg.method.params["r"] == 2


@pytest.mark.parametrize(
    "patch, key, fragment",
    [
        ({"trian": {}}, "trian", "Did you mean 'train'"),
        ({"train": {"learnig_rate": 1}}, "train.learnig_rate", "Did you mean 'learning_rate'"),
        ({"train": {"max_steps": "many"}}, "train.max_steps", "whole number"),
        ({"train": {"learning_rate": -1}}, "train.learning_rate", "positive"),
        ({"method": {"name": "lora", "rank": 4}}, "method.rank", "has no parameter"),
        ({"method": {"name": "lorra"}}, "method.name", "Did you mean 'lora'"),
        ({"model": {"name_or_path": "/nope/model"}}, "model.name_or_path", "does not exist"),
        ({"data": {"train": "$missing_df"}}, "data.train", "not defined"),
        ({"data": {"train": [{"words": "x"}]}}, "data.train", "no column 'text'"),
        ({"data": {"train": []}}, "data.train", "empty"),
    ],
)
def test_bad_configs_raise_usage_errors(tiny_llama, workdir, patch, key, fragment):
    from IPython.core.error import UsageError

    cfg = lm_config(tiny_llama)
    for section, value in patch.items():
        if isinstance(value, dict) and isinstance(cfg.get(section), dict) and section != "method":
            cfg[section] = {**cfg[section], **value}
        else:
            cfg[section] = value
    with pytest.raises(UsageError) as err:
        peft_magic.train(cfg, display="none")
    assert str(err.value).startswith(key) and fragment in str(err.value)


def test_yaml_error_names_the_line():
    with pytest.raises(ConfigError, match="line 3"):
        peft_magic.parse_config("model: x\ntrain:\n  max_steps: [1\n")


def test_config_yaml_roundtrip(tiny_llama):
    cfg = peft_magic.parse_config(lm_config(tiny_llama))
    text = cfg.to_yaml(minimal=True)
    again = peft_magic.parse_config(text.replace("<list>", "x.jsonl"))
    assert again.train == cfg.train and again.method == cfg.method and again.model == cfg.model


def test_stop_keeps_trained_weights_and_checkpoint(tiny_llama, tmp_path):
    class StopAt:
        def __init__(self):
            self.run = None

        def on_step_end(self, state):
            if state.step == 6:
                self.run.stop()

    stopper = StopAt()
    cfg = lm_config(tiny_llama, output_dir=str(tmp_path), max_steps=50)
    # train() builds the Run inside; reach it through the callback's state instead
    import peft_magic.session as session

    original = session.Run

    def capture(*a, **k):
        run = original(*a, **k)
        stopper.run = run
        return run

    session.Run = capture
    try:
        run = peft_magic.train(cfg, display="none", callbacks=[stopper])
    finally:
        session.Run = original
    assert run.state.stop_reason == "stopped" and run.state.step == 6
    assert os.path.isdir(tmp_path / "checkpoint-6")
    assert run.evaluate()["loss"] > 0
    assert os.path.isfile(os.path.join(run.export(tmp_path / "partial"), "adapter_model.safetensors"))


def test_cli_trains_from_yaml(tiny_llama, tmp_path):
    import yaml

    from peft_magic.cli import main

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in lm_rows()))
    cfg = lm_config(tiny_llama, output_dir=str(tmp_path / "out"), max_steps=5)
    cfg["data"] = {"train": str(data), "eval": None}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    code = main(["train", str(tmp_path / "cfg.yaml"), "--set", "train.max_steps=6", "--export", str(tmp_path / "ad")])
    assert code == 0
    assert (tmp_path / "ad" / "adapter_model.safetensors").exists()
    assert (tmp_path / "out" / "checkpoint-6").exists()


def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, peft_magic; print(sorted(m for m in ('torch','transformers','peft','datasets','accelerate') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
