"""Periodic checkpoints (by steps and by wall time), atomic writes, pruning, and what survives a crash mid-save."""

from __future__ import annotations

import errno
import functools
import os
import types

import pytest
import torch
from conftest import lm_rows

import peft_magic
from peft_magic.training import checkpoint
from peft_magic.errors import ConfigError, TrainingFailed

from .conftest import lora_config

config = functools.partial(lora_config, max_steps=7)


class Saves:
    """Records the step of every checkpoint the engine writes."""

    def __init__(self):
        self.steps = []

    def on_status(self, state, status):
        if status == "saving checkpoint":
            self.steps.append(state.step)


def test_save_steps_checkpoints_periodically_and_prunes_to_the_limit(tiny_llama, workdir):
    saves = Saves()
    run = peft_magic.train(config(tiny_llama, workdir / "out", save_steps=2, save_total_limit=2), display="none",
                           callbacks=[saves])  # fmt: skip
    assert saves.steps == [2, 4, 6, 7]  # every 2 steps, plus the final one
    assert sorted(os.listdir(workdir / "out")) == ["checkpoint-6", "checkpoint-7"]
    assert run.state.checkpoint_dir == str(workdir / "out" / "checkpoint-7")


def test_save_minutes_checkpoints_by_wall_time(tiny_llama, workdir, monkeypatch):
    """A fake clock advancing 40 s per step: with save_minutes 1, a save falls every second step."""
    clock = {"now": 1000.0}
    monkeypatch.setattr(checkpoint, "time", types.SimpleNamespace(time=lambda: clock["now"]))

    class Tick:
        def on_step_end(self, state):
            clock["now"] += 40

    saves = Saves()
    peft_magic.train(config(tiny_llama, workdir / "out", save_minutes=1, save_total_limit=10), display="none",
                     callbacks=[Tick(), saves])  # fmt: skip
    assert saves.steps == [2, 4, 6, 7]


@pytest.mark.parametrize("value", [-1, "ten"])
def test_save_minutes_is_checked(value):
    with pytest.raises(ConfigError, match="train.save_minutes"):
        peft_magic.parse_config({"model": "org/m", "data": {"train": "x.csv"}, "train": {"save_minutes": value}})


@pytest.fixture
def failing_save(monkeypatch):
    """torch.save raises 'No space left on device' while writing the scheduler of the `n`-th checkpoint."""
    real = torch.save
    calls = {"scheduler": 0, "fail_at": 2, "exc": OSError(errno.ENOSPC, "No space left on device")}

    def save(obj, f, *a, **kw):
        if str(f).endswith("scheduler.pt"):
            calls["scheduler"] += 1
            if calls["scheduler"] == calls["fail_at"]:
                raise calls["exc"]
        return real(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    return calls


def _complete(path):
    return {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pt", "trainer_state.json"} <= set(os.listdir(path))  # fmt: skip


def test_a_crash_while_saving_keeps_the_previous_checkpoint_and_leaves_nothing_half_written(
    tiny_llama, workdir, failing_save
):
    out = workdir / "out"
    with pytest.raises(TrainingFailed, match="No space left on device") as info:
        peft_magic.train(config(tiny_llama, out, save_steps=2), display="none")
    assert "checkpoint-2" in str(info.value) and "intact" in str(info.value)
    assert os.listdir(out) == ["checkpoint-2"]  # no temp folder, no half checkpoint-4
    assert _complete(out / "checkpoint-2")
    assert checkpoint.latest_checkpoint(str(out)) == str(out / "checkpoint-2")
    run = info.value.run  # the run is kept: its model holds step 4's weights
    assert run.model is not None and run.state.step == 4 and run.state.stop_reason == "failed"
    resumed = peft_magic.train(config(tiny_llama, out, save_steps=2), display="none", resume=True)
    assert resumed.state.step == 7 and resumed.history[0]["step"] == 1  # history came back from checkpoint-2
    assert [r["step"] for r in resumed.history if "loss" in r] == list(range(1, 8))


def test_any_error_mid_save_removes_the_temporary_folder(tiny_llama, workdir, failing_save):
    failing_save["exc"] = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        peft_magic.train(config(tiny_llama, workdir / "out", save_steps=2), display="none")
    assert os.listdir(workdir / "out") == ["checkpoint-2"]


def test_incomplete_or_linked_checkpoints_are_never_picked_up(tiny_llama, workdir):
    out = workdir / "out"
    peft_magic.train(config(tiny_llama, out, max_steps=2), display="none")
    (out / ".tmp-checkpoint-5-abc").mkdir()  # a process killed mid-save leaves its temp folder
    (out / ".tmp-checkpoint-5-abc" / "optimizer.pt").write_bytes(b"\0" * 10)
    (out / "checkpoint-9").mkdir()  # half a folder (no trainer_state.json, which is always written last)
    (out / "checkpoint-9" / "adapter_model.safetensors").write_bytes(b"partial")
    elsewhere = workdir / "elsewhere"  # a link must not lead resume or pruning outside the run folder
    elsewhere.mkdir()
    (elsewhere / checkpoint.STATE_FILE).write_text('{"step": 50}')
    os.symlink(elsewhere, out / "checkpoint-50")
    assert checkpoint.latest_checkpoint(str(out)) == str(out / "checkpoint-2")
    run = peft_magic.train(config(tiny_llama, out, max_steps=4, save_total_limit=1), display="none", resume=True)
    assert run.state.step == 4 and os.path.isfile(out / "checkpoint-4" / checkpoint.STATE_FILE)
    assert not os.path.exists(out / "checkpoint-2")  # pruned
    assert (elsewhere / checkpoint.STATE_FILE).read_text() == '{"step": 50}'  # untouched


def test_a_failed_save_in_a_cell_is_one_line_and_keeps_the_run(tiny_llama, shell, failing_save):
    shell.user_ns["rows"] = lm_rows(16)
    result = shell.run_cell(f"%%peft_train run\nmodel: {tiny_llama}\ndata: {{train: $rows}}\n"
                            "train: {max_steps: 6, save_steps: 2, per_device_train_batch_size: 4}\n")  # fmt: skip
    from IPython.core.error import UsageError

    assert type(result.error_in_exec) is UsageError
    assert "No space left on device" in str(result.error_in_exec)
    run = shell.user_ns["run"]
    assert run.model is not None and run.state.step == 4
