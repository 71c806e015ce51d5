"""DPO, ORPO and GRPO through our own loop on a tiny Llama: they learn, the reference is the base, resume is exact,
bad input is one clear line."""

from __future__ import annotations

import os
import statistics

import pytest
import torch

import peft_magic
from peft_magic.errors import ConfigError, TrainingFailed

PAIRS = [("what was the movie", "good", "bad"), ("what was the film", "great", "awful"),
         ("how was the plot", "nice", "poor"), ("how was the music", "lovely", "boring"),
         ("why was the acting", "fun", "dull"), ("what is the cat", "good", "dull")]  # fmt: skip


def pairs(n=12):
    return [{"prompt": PAIRS[i % 6][0] + " ", "chosen": PAIRS[i % 6][1], "rejected": PAIRS[i % 6][2]} for i in range(n)]


def chat_pairs(n=12):
    rows = []
    for p, c, r in (PAIRS * 2)[:n]:
        rows.append({"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
                     "rejected": [{"role": "assistant", "content": r}]})  # fmt: skip
    return rows


def pref_config(model, out, task="dpo", data=None, steps=20, **section):
    cfg = {"model": model, "task": task, "method": {"name": "lora", "r": 4},
           "data": {"train": data if data is not None else pairs(), "eval": None},
           "train": {"max_steps": steps, "learning_rate": 2e-2, "per_device_train_batch_size": 4, "logging_steps": 5,
                     "eval_steps": 0, "output_dir": str(out)}}  # fmt: skip
    if section:
        cfg[task] = section
    return cfg


def test_dpo_reaches_full_train_preference_accuracy(tiny_llama, workdir):
    cfg = pref_config(tiny_llama, workdir / "dpo", data=chat_pairs(), beta=0.5)
    cfg["data"]["eval"] = chat_pairs()  # the training pairs themselves: train preference accuracy
    run = peft_magic.train(cfg, display="none")
    rows = [r for r in run.history if "rewards_accuracy" in r]
    assert rows[0]["rewards_margin"] < rows[-1]["rewards_margin"]
    assert run.metrics["rewards_accuracy"] == 1.0 and run.metrics["rewards_margin"] > 0
    assert run.history[-1]["eval_rewards_accuracy"] == 1.0
    assert run.data.objective["chat"]  # conversational pairs: generate() goes through the chat template, as training
    prompt = [{"role": "user", "content": PAIRS[0][0]}]
    ids = run.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    greedy = run.model.generate(**ids, max_new_tokens=3, do_sample=False)[0, ids["input_ids"].shape[1]:]
    assert run.generate(PAIRS[0][0], max_new_tokens=3) == run.tokenizer.decode(greedy, skip_special_tokens=True).strip()


@pytest.mark.parametrize("loss_type", ["ipo", "hinge"])
def test_dpo_variants_raise_the_margin(tiny_llama, workdir, loss_type):
    cfg = pref_config(tiny_llama, workdir / loss_type, beta=0.5, loss_type=loss_type, steps=10)
    cfg["train"]["learning_rate"] = 5e-3  # IPO's squared loss has large gradients: 2e-2 oscillates
    run = peft_magic.train(cfg, display="none")
    rows = [r for r in run.history if "rewards_margin" in r]
    assert rows[-1]["rewards_margin"] > rows[0]["rewards_margin"]
    assert not run.data.objective["chat"]  # plain-text pairs: generate() continues the raw prompt


def test_orpo_prefers_chosen_without_a_reference(tiny_llama, workdir):
    run = peft_magic.train(pref_config(tiny_llama, workdir / "orpo", task="orpo", beta=1.0, steps=30), display="none")
    rows = [r for r in run.history if "rewards_accuracy" in r]
    assert rows[-1]["rewards_accuracy"] == 1.0 and rows[-1]["nll_loss"] < rows[0]["nll_loss"]


def test_reference_is_the_base_model(tiny_llama, workdir):
    """The adapter-disabled model gives the base model's log-probs, after training moved the adapter."""
    from transformers import AutoModelForCausalLM

    from peft_magic.training.objectives import reference_model

    run = peft_magic.train(pref_config(tiny_llama, workdir / "ref", steps=5), display="none")
    ids = torch.tensor([[2, 10, 11, 12, 13]])
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    run.model.eval()
    with torch.no_grad(), reference_model(run.model) as ref:
        assert torch.allclose(ref(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(run.model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-3)


def says_good(prompts, completions, **columns):
    return [float(c.split().count("good")) for c in completions]


def grpo_config(model, out, steps=12, rewards=("$says_good",), **section):
    prompts = [{"prompt": p, "topic": p.split()[-1]} for p, _, _ in PAIRS]
    return {"model": model, "task": "grpo", "method": {"name": "lora", "r": 8},
            "data": {"train": prompts, "eval": None},
            "grpo": {"rewards": list(rewards), "num_generations": 4, "max_new_tokens": 6, "beta": 0.04, **section},
            "train": {"max_steps": steps, "learning_rate": 3e-2, "per_device_train_batch_size": 2, "logging_steps": 3,
                      "eval_steps": 0, "output_dir": str(out)}}  # fmt: skip


def test_grpo_raises_the_mean_reward(tiny_llama, workdir):
    """Against the same run with a learning rate too small to move anything (the same prompts, the same sampling):
    8 completions a log row are a noisy reading, so the second half's mean is compared. Seeds 0-4 when written:
    0.34-0.54 trained, 0.08-0.14 not."""

    def second_half(lr, out):
        cfg = grpo_config(tiny_llama, workdir / out, steps=36)
        cfg["train"]["learning_rate"] = lr
        run = peft_magic.train(cfg, namespace={"says_good": says_good}, display="none")
        rows = [r for r in run.history if "reward" in r]
        return run, rows, statistics.fmean(r["reward"] for r in rows[len(rows) // 2 :])

    run, rows, trained = second_half(3e-2, "grpo")
    _, _, still = second_half(1e-7, "still")
    assert trained > 2 * still and trained > still + 0.15, ([r["reward"] for r in rows], still)
    assert rows[-1]["reward_says_good"] == rows[-1]["reward"] and "kl" in rows[-1] and "completion_length" in rows[-1]
    assert run.state.samples and {"prompt", "completion", "reward"} <= set(run.state.samples[-1])


def _weights(run):
    return {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("task", ["dpo", "grpo"])
def test_stop_and_resume_equal_an_uninterrupted_run(tiny_llama, workdir, task):
    ns = {"says_good": says_good}

    def cfg(out):
        c = grpo_config(tiny_llama, out, steps=6) if task == "grpo" else pref_config(tiny_llama, out, steps=6)
        c["train"]["save_steps"] = 3
        return c

    whole = peft_magic.train(cfg(workdir / "a"), namespace=ns, display="none")
    resumed = peft_magic.train(cfg(workdir / "b"), namespace=ns, display="none",
                               resume=str(workdir / "a" / "checkpoint-3"))  # fmt: skip
    assert resumed.state.step == 6
    a, b = _weights(whole), _weights(resumed)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    assert [r["loss"] for r in whole.history if "loss" in r][-1] == pytest.approx(
        [r["loss"] for r in resumed.history if "loss" in r][-1], rel=1e-5)


@pytest.mark.parametrize("task", ["dpo", "grpo"])
def test_stop_mid_run_and_resume_equal_an_uninterrupted_run(tiny_llama, workdir, task, monkeypatch):
    from peft_magic import session
    from peft_magic.run import Run

    runs = []  # the Run that train() creates: Stop is asked of it, as the panel's button does

    class Recorded(Run):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            runs.append(self)

    class StopAtThree:
        def on_step_end(self, state):
            if state.step == 3:
                runs[-1].stop()

    monkeypatch.setattr(session, "Run", Recorded)
    ns = {"says_good": says_good}
    cfg = (lambda out: grpo_config(tiny_llama, out, steps=6) if task == "grpo" else pref_config(tiny_llama, out, steps=6))
    whole = peft_magic.train(cfg(workdir / "a"), namespace=ns, display="none")
    stopped = peft_magic.train(cfg(workdir / "b"), namespace=ns, display="none", callbacks=[StopAtThree()])
    assert stopped.state.stop_reason == "stopped" and os.listdir(workdir / "b") == ["checkpoint-3"]
    resumed = peft_magic.train(cfg(workdir / "b"), namespace=ns, display="none", resume=True)
    assert resumed.state.step == 6 and resumed.state.stop_reason == "completed"
    a, b = _weights(whole), _weights(resumed)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    key = "reward" if task == "grpo" else "rewards_margin"  # the same samples, the same figures
    assert [r[key] for r in whole.history if key in r][-1] == pytest.approx(
        [r[key] for r in resumed.history if key in r][-1], rel=1e-5)


def broken(prompts, completions, **columns):
    raise ValueError("no score")


def short(prompts, completions, **columns):
    return [1.0]


def wordy(prompts, completions, **columns):
    return ["high"] * len(completions)


@pytest.mark.parametrize("fn, fragment", [(broken, "'broken' raised ValueError: no score"),
                                          (short, "'short' returned 1 values for 8 completions"),
                                          (wordy, "'wordy' returned 'high' (str)")])  # fmt: skip
def test_bad_reward_function_stops_with_one_line_keeping_the_checkpoint(tiny_llama, workdir, fn, fragment):
    good = peft_magic.train(grpo_config(tiny_llama, workdir / "r", steps=2), namespace={"says_good": says_good},
                            display="none")  # fmt: skip
    assert os.path.isdir(workdir / "r" / "checkpoint-2")
    cfg = grpo_config(tiny_llama, workdir / "r", steps=4, rewards=("$says_good", f"${fn.__name__}"))
    ns = {"says_good": says_good, fn.__name__: fn}
    with pytest.raises(ConfigError, match=r"another config \(grpo.rewards"):  # other rewards: only on --resume
        peft_magic.train(cfg, namespace=ns, display="none")
    with pytest.raises(TrainingFailed, match=fragment.replace("(", r"\(").replace(")", r"\)")) as e:
        peft_magic.train(cfg, namespace=ns, display="none", resume=str(workdir / "r" / "checkpoint-2"))
    assert "\n" not in str(e.value) and os.path.isdir(workdir / "r" / "checkpoint-2") and good.model is not None


@pytest.mark.parametrize("patch, key, fragment", [
    ({"task": "dpo", "data": {"train": [{"prompt": "a", "chosen": "b"}]}}, "data.train", "'rejected'"),
    ({"task": "dpo", "data": {"train": [{"question": "a", "chosen": "b", "rejected": "c"}]}}, "data.train", "'prompt'"),
    ({"task": "dpo", "dpo": {"beta": 0}}, "dpo.beta", "> 0"),
    ({"task": "orpo", "orpo": {"beta": -1}}, "orpo.beta", "> 0"),
    ({"task": "dpo", "dpo": {"loss_type": "sigmod"}}, "dpo.loss_type", "sigmoid"),
    ({"task": "grpo", "grpo": {"rewards": []}}, "grpo.rewards", "none is given"),
    ({"task": "grpo", "grpo": {"rewards": ["$says_good"], "num_generations": 1}}, "grpo.num_generations", "at least 2"),
    ({"task": "grpo", "grpo": {"rewards": ["$nope"]}}, "grpo.rewards", "'$nope' is not defined"),
    ({"task": "grpo", "grpo": {"rewards": ["$text"]}}, "grpo.rewards", "not a function"),
    ({"task": "grpo", "grpo": {"rewards": ["$two_args"]}}, "grpo.rewards", "cannot be called"),
    ({"task": "grpo", "data": {"train": [{"question": "a"}]}, "grpo": {"rewards": ["$says_good"]}}, "data.train", "'prompt'"),
])  # fmt: skip
def test_bad_input_is_one_clear_line(tiny_llama, workdir, patch, key, fragment):
    cfg = pref_config(tiny_llama, workdir / "bad", steps=1)
    if patch["task"] == "grpo":
        cfg = grpo_config(tiny_llama, workdir / "bad", steps=1)
        cfg["grpo"] = patch.get("grpo", {})
    cfg.update({k: v for k, v in patch.items() if k not in ("data", "grpo")})
    cfg["data"].update(patch.get("data", {}))
    ns = {"says_good": says_good, "text": "hello", "two_args": lambda a, b: [0.0]}
    with pytest.raises(ConfigError) as e:
        peft_magic.train(cfg, namespace=ns, display="none")
    assert e.value.key == key and fragment in str(e.value), str(e.value)


def test_classifier_model_is_refused_for_dpo(tiny_bert, workdir):
    with pytest.raises(ConfigError, match="task dpo tunes a language model") as e:
        peft_magic.train(pref_config(tiny_bert, workdir / "cls", steps=1), display="none")
    assert e.value.key == "task"


# ---------------------------------------------------------------- what the user sees


def test_dry_run_plans_generations_and_counts_the_reference(tiny_llama, workdir):
    from peft_magic.dryrun import dry_run
    from peft_magic.preflight import estimate_for_config

    ns = {"says_good": says_good}
    plan = dry_run(grpo_config(tiny_llama, workdir / "g"), namespace=ns)
    assert "2 prompts x 4 generations = 8 completions" in plan.rows["per step"] and "says_good" in plan.rows["objective"]
    plan = dry_run(pref_config(tiny_llama, workdir / "d"))
    assert "adapter disabled" in plan.rows["objective"] and "8 sequences per forward" in plan.rows["per step"]
    sft = peft_magic.parse_config({**pref_config(tiny_llama, workdir), "task": "causal-lm", "data": {"train": pairs()}})
    dpo = peft_magic.parse_config(pref_config(tiny_llama, workdir))
    est_sft, est_dpo = estimate_for_config(sft, seq_len=16), estimate_for_config(dpo, seq_len=16)
    assert est_dpo.activations > 2 * est_sft.activations and est_dpo.weights == est_sft.weights
    full = peft_magic.parse_config({**pref_config(tiny_llama, workdir), "method": "full"})
    assert estimate_for_config(full, seq_len=16).weights > 1.9 * estimate_for_config(
        peft_magic.parse_config({**pref_config(tiny_llama, workdir), "method": "full", "task": "orpo"}), seq_len=16).weights


def test_eval_summary_card_and_lines_show_the_figures(tiny_llama, workdir):
    import io

    from peft_magic.ui.objective import objective_facts
    from peft_magic.ui.summary import summary_html
    from peft_magic.ui.terminal import TerminalPrinter

    out = io.StringIO()
    cfg = pref_config(tiny_llama, workdir / "dpo", data=chat_pairs(), beta=0.5, steps=10)
    run = peft_magic.train(cfg, display=TerminalPrinter(out))
    assert "accuracy" in out.getvalue() and "margin" in out.getvalue()
    metrics = run.evaluate(data=chat_pairs())
    assert metrics["rewards_accuracy"] > 0.5 and run.history[-1]["eval_rewards_accuracy"] == metrics["rewards_accuracy"]
    html = summary_html(run.state, run.history)
    assert "preferences" in html and "eval preferences" in html
    card = open(os.path.join(run.export(workdir / "dpo-adapter"), "README.md")).read()
    assert "| preferences | accuracy" in card and "| task | dpo |" in card

    ns = {"says_good": says_good}
    gcfg = grpo_config(tiny_llama, workdir / "grpo", steps=3)
    gcfg["data"]["eval"] = [{"prompt": "what was the movie", "topic": "movie"}]
    grun = peft_magic.train(gcfg, namespace=ns, display="none")
    assert {"eval_reward", "eval_reward_says_good", "eval_completion_length"} <= set(grun.history[-1])
    facts = dict(objective_facts(grun.history))
    assert "KL" in facts["reward"] and "eval reward (greedy)" in facts
    html = summary_html(grun.state, grun.history)
    assert "recent samples" in html and "peft-samples" in html
    from peft_magic.ui.panel import LivePanel

    panel = LivePanel(auto_show=False)
    panel.on_train_begin(grun.state)  # the live panel's stats: reward row and the samples table
    assert "reward" in panel.stats.value and "recent samples" in panel.stats.value
    final = grun.history[-1]["eval_reward"]
    assert grun.evaluate()["reward"] == final  # greedy: the same completions, the same reward


def test_compare_sweeps_dpo_beta(tiny_llama, workdir):
    cfg = pref_config(tiny_llama, workdir / "cmp", steps=4)
    cfg["data"]["eval"] = pairs(6)
    del cfg["train"]["output_dir"]
    cmp = peft_magic.compare(cfg, sweep={"dpo.beta": [0.1, 0.5]}, display="none", name="beta")
    assert len(cmp.rows) == 2 and all("eval_rewards_accuracy" in r for r in cmp.rows), cmp.rows
