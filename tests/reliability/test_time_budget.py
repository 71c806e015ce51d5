"""`train.max_time`: a run with a time budget stops before it, saved, with the usual Stop result, and resuming it
ends exactly where an uninterrupted run ends; the ETA says when the budget ends the run before max_steps."""

from __future__ import annotations

import os
import time

import pytest

import peft_magic
from peft_magic.errors import ConfigError
from peft_magic.events import TrainState
from peft_magic.training.deadline import Deadline, parse_duration
from peft_magic.ui.lines import end_text, log_line, progress_text

from .test_interrupt_resume import assert_same_as, config


@pytest.fixture(scope="module")
def reference(tiny_llama, tmp_path_factory):
    return peft_magic.train(config(tiny_llama, tmp_path_factory.mktemp("reference")), display="none")


class Slow:
    """Each optimizer step takes `seconds` longer (a stand-in for a big model)."""

    def __init__(self, seconds):
        self.seconds = seconds

    def on_step_end(self, state):
        time.sleep(self.seconds)

    def on_train_end(self, state):
        self.ended_after = state.elapsed


def test_a_budget_of_a_few_seconds_stops_saved_and_resumes_exactly(tiny_llama, workdir, reference):
    cfg = config(tiny_llama, workdir / "budget", max_time="2s")
    slow = Slow(0.35)
    run = peft_magic.train(cfg, display="none", callbacks=[slow])
    assert run.state.stop_reason == "stopped" and 2 <= run.state.step < 8, run.state.step
    assert slow.ended_after < 2.0  # it ended, saved, before the budget ran out
    assert os.path.isdir(workdir / "budget" / f"checkpoint-{run.state.step}")
    assert "train.max_time 2s" in end_text(run.state) and "checkpoint in" in end_text(run.state)
    cfg["train"].pop("max_time")
    resumed = peft_magic.train(cfg, display="none", resume=True)
    assert_same_as(reference, resumed)


def test_the_eta_says_when_the_budget_ends_the_run():
    state = TrainState(max_steps=1000, step=100, time_budget=300.0)
    state.start_time = time.time() - 60.0  # 0.6 s a step: the budget ends it near step 500
    assert "(train.max_time ends it near step 500/1000)" in progress_text(state)
    assert "~04:00 left" in progress_text(state)  # the budget's end, not the 9 minutes to step 1000
    assert "ETA 04:00 (train.max_time" in log_line(state, {"step": 100})
    state.time_budget = 3600.0
    assert "max_time" not in progress_text(state) and "~09:00 left" in progress_text(state)


def test_the_stop_keeps_room_for_the_final_save_and_evaluation():
    def deadline(save_seconds):
        now = [0.0]
        d = Deadline(10.0, start=0.0, clock=lambda: now[0])
        for t in (1.0, 2.0):  # two 1-second steps
            now[0] = t
            assert not d.due(int(t))
        with d.timing("save"):
            now[0] += save_seconds
        now[0] += 1.0
        return d.due(3)

    assert not deadline(0.0)  # at 3 s, 1 s a step: room for more
    assert deadline(3.0)  # at 6 s, 2.5 s a step, and the final save may take 3 s again: stop now


@pytest.mark.parametrize("text, seconds", [("11h30m", 41400), ("90m", 5400), ("45s", 45), ("1.5h", 5400),
                                           ("2h15m30s", 8130), (None, None), ("0", None)])  # fmt: skip
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("value, pattern", [(90, "'90' has no unit"), ("1.5", "'1.5' has no unit"),
                                            ("an hour", "'an hour' is not a duration")])  # fmt: skip
def test_a_bad_budget_is_one_line_with_the_fix(value, pattern):
    from peft_magic.config.parse import parse_config

    with pytest.raises(ConfigError, match=f"train.max_time: {pattern}.*Fix: .*11h30m"):
        parse_config({"model": "m", "data": {"train": "x.csv"}, "train": {"max_time": value}})
