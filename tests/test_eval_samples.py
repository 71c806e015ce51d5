"""`eval.samples: N`: greedy answers to N fixed eval prompts at each evaluation of a causal LM, in the live panel (a
table that grows), the printed lines, the history, the static summary and the model card; training unaffected."""

from __future__ import annotations

import pytest
import torch
from conftest import instruction_rows, make_tokenizer

import peft_magic
from peft_magic.config.parse import parse_config
from peft_magic.errors import ConfigError
from peft_magic.training.eval_samples import PLAIN_PROMPT_TOKENS, pick_prompts, prompt_of

torch.set_num_threads(1)


def config(model, out, samples=2, **train):
    return {"model": model, "method": {"name": "lora", "r": 4, "lora_dropout": 0.1},
            "data": {"train": instruction_rows(24), "eval": 0.25},
            "eval": {"samples": samples, "max_new_tokens": 3},
            "train": {"max_steps": 6, "eval_steps": 3, "logging_steps": 3, "learning_rate": 5e-3,
                      "per_device_train_batch_size": 4, "output_dir": str(out), **train}}  # fmt: skip


@pytest.fixture(scope="module")
def sampled(tiny_llama, tmp_path_factory):
    """A run with eval.samples: 2 seen through the live panel (its events), as a notebook sees it."""
    from peft_magic.ui.panel import LivePanel

    panel = LivePanel(auto_show=False)
    run = peft_magic.train(config(tiny_llama, tmp_path_factory.mktemp("sampled")), display=panel)
    return run, panel


def test_each_evaluation_answers_the_same_prompts_and_the_history_keeps_them(sampled):
    run, _ = sampled
    rows = [r for r in run.history if "samples" in r]
    assert [r["step"] for r in rows] == [3, 6]  # the one between steps and the final one
    prompts = [[s["prompt"] for s in r["samples"]] for r in rows]
    assert prompts[0] == prompts[1] and len(prompts[0]) == 2  # fixed prompts, the first two of the eval split
    assert all(p.startswith("<|user|>") is False and "say" in p for p in prompts[0])  # the question, specials off
    assert all(isinstance(s["answer"], str) and len(s["answer"].split()) <= 3 for r in rows for s in r["samples"])


def test_the_panel_shows_a_table_that_grows_and_the_summary_keeps_it(sampled):
    run, panel = sampled
    answers = [s["answer"] for r in run.history if "samples" in r for s in r["samples"]]
    table = panel.metrics.value
    assert "sample answers (greedy)" in table and table.count("<tr>") >= 1 + 4  # header + 2 prompts x 2 evaluations
    assert "peft-answers" in panel.summary and "sample answers" in panel.summary
    from html import escape

    assert all(escape(a) in table for a in answers if a)


def test_the_model_card_keeps_the_answers(sampled, tmp_path):
    run, _ = sampled
    folder = run.export(str(tmp_path / "adapter"))
    card = open(f"{folder}/README.md", encoding="utf-8").read()
    assert "## Sample answers (greedy, at each evaluation)" in card
    assert card.count("\n| 3 | ") == 2 and card.count("\n| 6 | ") == 2


def test_terminal_lines_say_each_answer_briefly(tiny_llama, tmp_path, capsys):
    peft_magic.train(config(tiny_llama, tmp_path / "t", max_steps=3), display="terminal")
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("  answer · ")]
    assert len(lines) == 2 and all(" → " in line and len(line) < 140 for line in lines)


def test_training_is_the_same_with_and_without_samples(tiny_llama, tmp_path):
    with_samples = peft_magic.train(config(tiny_llama, tmp_path / "a", samples=3), display="none")
    without = peft_magic.train(config(tiny_llama, tmp_path / "b", samples=0), display="none")
    assert any("samples" in r for r in with_samples.history) and not any("samples" in r for r in without.history)
    a = {n: p for n, p in with_samples.model.named_parameters() if p.requires_grad}
    b = {n: p for n, p in without.model.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)  # dropout on: same RNG stream too
    assert [r.get("loss") for r in with_samples.history] == [r.get("loss") for r in without.history]
    assert with_samples.model.training == without.model.training


def test_prompts_end_where_the_last_answer_begins():
    tok = make_tokenizer()
    ids = tok("<|user|> say yes <|assistant|> yes </s> <|user|> say no <|assistant|> no ok </s>")["input_ids"]
    labels = [-100] * len(ids)
    for i in (4, 5, 10, 11, 12):  # both answers trained
        labels[i] = ids[i]
    assert prompt_of(ids, labels) == (6, 10)  # from the end of the first answer to the start of the second
    [(prompt, shown)] = pick_prompts([{"input_ids": ids, "labels": labels}], tok, 1)
    assert prompt == ids[:10] and shown == "say no"
    text = list(range(10, 90))  # plain text: every token trained, its first half (at most 32 tokens) prompts
    assert prompt_of(text, text) == (0, PLAIN_PROMPT_TOKENS)
    assert prompt_of([1, 2], [-100, -100]) is None


@pytest.mark.parametrize(
    "cfg, pattern",
    [
        ({"task": "seq-cls", "data": {"train": "x.csv", "eval": 0.1}, "eval": {"samples": 2}},
         r"train.eval_samples.*causal LM; this run's task is seq-cls. Fix: remove `eval.samples`"),
        ({"data": {"train": "x.csv"}, "eval": {"samples": 2}}, r"train.eval_samples.*needs eval data.*data: \{eval: 0.1\}"),
        ({"data": {"train": "x.csv", "eval": 0.1}, "eval": {"sample": 2}}, r"eval.*Did you mean 'samples'"),
        ({"data": {"train": "x.csv", "eval": 0.1}, "eval": {"samples": -1}}, r"train.eval_samples.*>= 0"),
        ({"data": {"train": "x.csv", "eval": 0.1}, "eval": {"samples": 2}, "train": {"eval_samples": 3}},
         r"given twice, as `eval.samples` and `train.eval_samples`"),
    ],
)  # fmt: skip
def test_eval_samples_mistakes_name_the_key_and_the_fix(cfg, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_config({"model": "unused/model", **cfg})


def test_eval_section_spells_train_keys_and_keeps_forgetting():
    cfg = parse_config({"model": "m", "data": {"train": "x.csv", "eval": 0.1},
                        "eval": {"samples": 4, "max_new_tokens": 16, "forgetting": "default"}})  # fmt: skip
    assert (cfg.train.eval_samples, cfg.train.eval_max_new_tokens, cfg.data.forgetting) == (4, 16, "default")


def test_the_dry_run_plan_says_how_many_answers_each_evaluation_generates(tiny_llama, tmp_path):
    plan = peft_magic.dry_run(config(tiny_llama, tmp_path / "plan", samples=2))
    assert "eval every 3 and at the end, with 2 sample answers · " in plan.rows["plan"]


@pytest.mark.parametrize("template", ["chatml", "llama3", "gemma", "zephyr"])
def test_the_shown_prompt_is_the_question_without_the_template_around_it(template):
    from test_data_formats import SYSTEM, TWO_TURNS, word_tokenizer

    from peft_magic.data import chat

    tok = word_tokenizer()
    tok.chat_template = chat.builtin(template, tok)
    ids, labels, _ = chat.Encoder(tok).conversation(SYSTEM + TWO_TURNS)
    [(prompt, shown)] = pick_prompts([{"input_ids": ids, "labels": labels}], tok, 1)
    assert shown == "say no"  # not the system turn, the first exchange, role names or the generation prompt
    assert tok.decode(ids[len(prompt):], skip_special_tokens=True).split()[:2] == ["no", "ok"]
