"""A NaN loss and running out of memory, caused for real inside the model's forward pass: training stops at once
with one clear sentence, good work is kept, memory is freed, and the notebook stays usable."""

from __future__ import annotations

import gc
import os
import traceback
import weakref

import pytest
import torch
from conftest import lm_rows
from IPython.core.error import UsageError

import peft_magic
from peft_magic import models
from peft_magic.errors import TrainingFailed

from .conftest import lora_config, lora_weights, saved_adapter


@pytest.fixture
def fault(monkeypatch):
    """Make the loaded model's forward pass misbehave at its `at`-th call: `kind` 'nan' turns the last hidden states (so the logits) into NaN,
    'cuda-oom' / 'host-oom' raise torch.OutOfMemoryError / MemoryError. Also keeps a weakref to the model."""
    spec = {"kind": "nan", "at": 3, "calls": 0, "model": None}
    real = models.load_model

    def hook(module, args, output):
        if any(f.name in ("train_flops_per_token", "_padding_is_inert") for f in traceback.extract_stack()):
            return None  # the FLOP count's probe pass and the chunked loss's one-time check are not training steps
        spec["calls"] += 1
        if spec["calls"] != spec["at"]:
            return None
        if spec["kind"] == "nan":
            return output * float("nan")
        if spec["kind"] == "cuda-oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        raise MemoryError()

    def load_model(*a, **kw):
        model = real(*a, **kw)
        # the final norm feeds the output layer: the chunked loss reads lm_head's weight without calling lm_head
        model.model.norm.register_forward_hook(hook)
        spec["model"] = weakref.ref(model)
        return model

    monkeypatch.setattr(models, "load_model", load_model)
    return spec


def test_nan_loss_stops_in_that_step_and_keeps_the_last_good_weights(tiny_llama, workdir, fault):
    with pytest.raises(TrainingFailed) as info:
        peft_magic.train(lora_config(tiny_llama, workdir / "out", save_steps=2), display="none")
    msg = str(info.value)
    assert "loss became nan at step 3" in msg and "learning rate" in msg and "fp16" in msg
    assert "checkpoint-2" in msg
    run = info.value.run
    assert run.state.stop_reason == "failed" and run.state.step == 2  # step 3 never completed
    assert sorted(os.listdir(workdir / "out")) == ["checkpoint-2"]  # the last good checkpoint, nothing after
    good, live = saved_adapter(workdir / "out" / "checkpoint-2"), lora_weights(run.model)
    assert good.keys() == live.keys()
    for k in good:  # the NaN never reached the weights: they are step 2's
        assert torch.equal(live[k], good[k]), k
    assert all(p.grad is None for p in run.model.parameters())
    assert all(r["loss"] == r["loss"] for r in run.history)  # no NaN row in the history


def test_nan_in_a_cell_is_one_line_and_the_run_is_kept(tiny_llama, shell, fault):
    shell.user_ns.update(rows=lm_rows(16), keep=[1, 2, 3])
    result = shell.run_cell(f"%%peft_train run\nmodel: {tiny_llama}\ndata: {{train: $rows}}\n"
                            "train: {max_steps: 6, per_device_train_batch_size: 4}\n")  # fmt: skip
    assert type(result.error_in_exec) is UsageError
    assert "training failed: the loss became nan at step 3" in str(result.error_in_exec)
    run = shell.user_ns["run"]
    assert run.model is not None and run.state.step == 2 and shell.user_ns["keep"] == [1, 2, 3]


@pytest.mark.parametrize("kind", ["cuda-oom", "host-oom"])
def test_out_of_memory_frees_the_model_and_suggests_next_settings(tiny_llama, workdir, fault, kind):
    fault["kind"] = kind
    with pytest.raises(TrainingFailed) as info:
        peft_magic.train(lora_config(tiny_llama, workdir / "out", max_steps=4), display="none")
    msg = str(info.value)
    assert msg.startswith("out of memory at step 3 (batch 4 x accum 1, max_length 256)")
    assert "--set train.per_device_train_batch_size=2 --set train.gradient_accumulation_steps=2" in msg
    assert "gradient_checkpointing=true" in msg and "model.quantization=4bit" in msg and "data.max_length=128" in msg
    assert info.value.__context__ is None and info.value.__cause__ is None  # no chained traceback holding tensors
    assert fault["model"]() is None  # the model (and its activations) are gone without any gc by the test
    assert info.value.run.model is None and info.value.run.state.status == "failed"


def test_out_of_memory_while_loading_is_caught_too(tiny_llama, workdir, monkeypatch):
    def too_big(*a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(models, "load_model", too_big)
    with pytest.raises(TrainingFailed, match="out of memory while loading the model"):
        peft_magic.train(lora_config(tiny_llama, workdir / "out"), display="none")


def test_after_out_of_memory_in_a_cell_the_kernel_is_usable_and_other_runs_untouched(tiny_llama, shell, fault):
    fault["at"] = 10**9  # first: a good run
    shell.user_ns["rows"] = lm_rows(16)
    cell = f"model: {tiny_llama}\ndata: {{train: $rows}}\ntrain: {{max_steps: 3, per_device_train_batch_size: 4}}\n"
    assert shell.run_cell(f"%%peft_train run\n{cell}").error_in_exec is None
    first = shell.user_ns["run"]
    before = lora_weights(first.model)
    fault.update(kind="cuda-oom", at=fault["calls"] + 2)
    result = shell.run_cell(f"%%peft_train big\n{cell}")
    assert type(result.error_in_exec) is UsageError and "out of memory" in str(result.error_in_exec)
    assert "big" not in shell.user_ns and shell.user_ns["run"] is first
    for k, v in lora_weights(first.model).items():
        assert torch.equal(v, before[k])
    gc.collect()
    fault["at"] = 10**9  # the same kernel trains again
    assert shell.run_cell(f"%%peft_train again\n{cell}").error_in_exec is None
    assert shell.user_ns["again"].state.stop_reason == "completed"
