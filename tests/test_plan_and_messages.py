"""What the plan and the error messages say: figures a newcomer reads (epochs, eval schedule) and messages that
name the culprit (the $variable, not just its type)."""

from __future__ import annotations

import pytest
from conftest import lm_rows

import peft_magic
from peft_magic.errors import ConfigError


def _plan(model, **train):
    cfg = {"model": model, "method": {"name": "lora", "r": 2}, "data": {"train": lm_rows(56)}, "train": train}
    return peft_magic.dry_run(cfg).rows["plan"]


def test_a_short_run_without_eval_says_no_eval_schedule_and_rounds_epochs(tiny_llama, workdir):
    plan = _plan(tiny_llama, max_steps=4, eval_steps=50)
    assert "eval" not in plan
    assert plan.startswith("4 steps (0.57 epochs) · ")  # 56 rows, batch 8: 7 steps an epoch


def test_eval_every_n_only_when_n_comes_before_the_end(tiny_llama, workdir):
    cfg = {"model": tiny_llama, "method": {"name": "lora", "r": 2}, "data": {"train": lm_rows(40), "eval": 0.2}}
    short = peft_magic.dry_run({**cfg, "train": {"max_steps": 20, "eval_steps": 50}}).rows["plan"]
    long = peft_magic.dry_run({**cfg, "train": {"max_steps": 120, "eval_steps": 50}}).rows["plan"]
    assert "eval at the end" in short and "eval every" not in short
    assert "eval every 50 and at the end" in long


@pytest.mark.parametrize(
    "value, fragment",
    [(3, "$some_value is an int, which cannot be used as data"),
     (4.5, "$some_value is a float"), ([], "$some_value is an empty list"),
     ([{"text": "a"}, 7], "$some_value is a list holding an int")],
)  # fmt: skip
def test_a_wrong_variable_is_named_in_the_message(tiny_llama, workdir, value, fragment):
    cfg = {"model": tiny_llama, "data": {"train": "$some_value"}, "train": {"max_steps": 1}}
    with pytest.raises(ConfigError) as e:
        peft_magic.dry_run(cfg, namespace={"some_value": value})
    assert fragment in str(e.value) and str(e.value).startswith("data.train: ")
