"""Re-running a cell whose folder holds a run: an interrupted run of the same config is offered `--resume` at once
(`train.resume: auto` resumes it), another config is refused unless `--overwrite`, and the two never mix."""

from __future__ import annotations

import os

import pytest
import yaml
from conftest import lm_rows

import peft_magic
from peft_magic.errors import ConfigError

from .conftest import StopAt
from .test_interrupt_resume import assert_same_as, config, created, reference  # noqa: F401 - fixtures


def stopped_at(step, tiny_llama, out, created):
    cfg = config(tiny_llama, out)
    run = peft_magic.train(cfg, display="none", callbacks=[StopAt(step, lambda s: created[-1].stop())])
    assert run.state.stop_reason == "stopped"
    return cfg


def test_same_config_is_offered_resume_and_resume_auto_continues_exactly(tiny_llama, workdir, reference, created):
    cfg = stopped_at(3, tiny_llama, workdir / "r", created)
    with pytest.raises(ConfigError, match=r"holds an interrupted run of this config \(step 3/8\)\. Fix: --resume "
                                          r"to continue it .*train.resume: auto.*--overwrite to start over") as err:
        peft_magic.train(cfg, display="none")
    assert "\n" not in str(err.value)
    assert os.listdir(workdir / "r") == ["checkpoint-3"]  # untouched
    cfg["train"]["resume"] = "auto"
    assert_same_as(reference, peft_magic.train(cfg, display="none"))


def test_another_config_is_refused_and_overwrite_replaces_it(tiny_llama, workdir, created):
    stopped_at(3, tiny_llama, workdir / "r", created)
    other = config(tiny_llama, workdir / "r", learning_rate=1e-3)
    with pytest.raises(ConfigError, match=r"train.output_dir: .* holds an interrupted run of another config "
                                          r"\(train.learning_rate 0.005 → 0.001\)\. Fix: --overwrite"):
        peft_magic.train(other, display="none")
    with pytest.raises(ConfigError, match="cannot continue with another config"):
        peft_magic.train(other, display="none", resume=True)
    with pytest.raises(ConfigError, match="another config"):  # resume: auto never mixes either
        peft_magic.train({**other, "train": {**other["train"], "resume": "auto"}}, display="none")
    assert os.listdir(workdir / "r") == ["checkpoint-3"]
    run = peft_magic.train(other, display="none", overwrite=True)
    assert run.state.stop_reason == "completed" and os.listdir(workdir / "r") == ["checkpoint-8"]
    saved = yaml.safe_load(open(workdir / "r" / "checkpoint-8" / "trainer_state.json"))["config"]
    assert saved["train"]["learning_rate"] == 1e-3 and saved["data"]["train"] == "<list>"  # no rows in it


def test_a_completed_run_of_the_same_config_is_trained_again_not_mixed(tiny_llama, workdir):
    cfg = config(tiny_llama, workdir / "r", save_steps=2)
    first = peft_magic.train(cfg, display="none")
    again = peft_magic.train(cfg, display="none")
    assert sorted(os.listdir(workdir / "r")) == ["checkpoint-6", "checkpoint-8"]
    assert again.history == first.history


def test_the_magic_says_so_at_once_and_takes_overwrite(tiny_llama, workdir, created, shell, capsys):
    out = workdir / "cell"
    stopped_at(2, tiny_llama, out, created)
    shell.user_ns["rows"] = lm_rows(20)
    body = config(tiny_llama, out)
    body["data"]["train"] = "$rows"
    result = shell.run_cell(f"%%peft_train run\n{yaml.safe_dump(body)}")
    assert "holds an interrupted run of this config (step 2/8). Fix: --resume" in str(result.error_in_exec)
    result = shell.run_cell(f"%%peft_train run --overwrite\n{yaml.safe_dump(body)}")
    assert result.error_in_exec is None, result.error_in_exec
    assert shell.user_ns["run"].state.step == 8 and os.listdir(out) == ["checkpoint-8"]
