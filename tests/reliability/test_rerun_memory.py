"""Re-running a %%peft_train cell frees the previous run's model: nothing else (accelerate, the display, IPython's
output cache, closures) keeps it alive, so process memory stays flat over re-runs."""

from __future__ import annotations

import gc
import weakref

import pytest
from conftest import lm_rows, make_tokenizer

from peft_magic import models


@pytest.fixture(scope="module")
def mid_llama(tmp_path_factory):
    """Large enough for a leak to show in RSS (~10M parameters, ~42 MB in float32), still quick on CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    path = tmp_path_factory.mktemp("mid-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def rss_mb() -> float:
    import os

    gc.collect()
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.fixture
def loaded(monkeypatch):
    """Weak references to every base model loaded."""
    refs = []
    real = models.load_model

    def load_model(*a, **kw):
        model = real(*a, **kw)
        refs.append(weakref.ref(model))
        return model

    monkeypatch.setattr(models, "load_model", load_model)
    return refs


def test_rerunning_a_cell_five_times_keeps_memory_flat(mid_llama, shell, loaded):
    shell.peft.display = "auto"  # the printed display is a subscriber too: it must not hold the model
    shell.user_ns["rows"] = lm_rows(8)
    cell = (f"%%peft_train run\nmodel: {mid_llama}\ndata: {{train: $rows, max_length: 16}}\n"
            "train: {max_steps: 2, per_device_train_batch_size: 4, logging_steps: 1}\n")  # fmt: skip
    sizes = []
    for i in range(5):
        result = shell.run_cell(cell)
        assert result.error_in_exec is None, result.error_in_exec
        shell.run_cell("run")  # displayed: IPython's Out/_ now hold the Run
        shell.run_cell("run.history[-1]")
        sizes.append(rss_mb())
    assert len(loaded) == 5
    assert [r() is None for r in loaded] == [True] * 4 + [False]  # only the current run's model is alive
    grown = sizes[-1] - sizes[0]
    assert grown < 25, f"RSS after each run (MB): {[round(s) for s in sizes]}"  # one model is ~42 MB


def test_release_drops_the_model_even_when_the_run_is_displayed(tiny_llama, shell, loaded):
    shell.user_ns["rows"] = lm_rows(8)
    cell = f"%%peft_train run\nmodel: {tiny_llama}\ndata: {{train: $rows}}\ntrain: {{max_steps: 1}}\n"
    assert shell.run_cell(cell).error_in_exec is None
    shell.run_cell("run")
    shell.run_cell("run.release()")
    gc.collect()
    assert loaded[0]() is None
