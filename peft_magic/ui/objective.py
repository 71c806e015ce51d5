"""What the panel, the printed lines, the summary and the model card say about dpo/orpo/grpo runs: the last
logged rewards, margin and accuracy (DPO/ORPO) or rewards per function, spread, length and KL (GRPO), and the
table of recent GRPO samples. Pure functions of history rows and `TrainState.samples`: no widgets here."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from html import escape
from typing import Any

from .format import format_number

PAIR_KEYS = ("rewards_accuracy", "rewards_margin", "rewards_chosen", "rewards_rejected")
SAMPLE_CHARS = 160


def _last_row(history: Iterable[Mapping[str, Any]] | None, key: str):
    return next((r for r in reversed(list(history or ())) if key in r), None)


def pair_text(row: Mapping[str, Any], prefix: str = "") -> str:
    """``accuracy 0.95 · margin 0.82 · chosen 0.41 / rejected -0.41`` from a row of DPO/ORPO figures."""
    def get(k):
        return row.get(prefix + k)

    return (f"accuracy {format_number(get('rewards_accuracy'), 3)} · margin {format_number(get('rewards_margin'), 3)} · "
            f"chosen {format_number(get('rewards_chosen'), 3)} / rejected {format_number(get('rewards_rejected'), 3)}")  # fmt: skip


def reward_text(row: Mapping[str, Any], prefix: str = "") -> str:
    """``0.80 (format 0.50 · correct 0.30) ± 0.21 · length 23 · KL 0.012`` from a row of GRPO figures."""
    per = [(k[len(prefix) + 7:], v) for k, v in row.items() if k.startswith(prefix + "reward_") and k != prefix + "reward_std"]
    text = format_number(row.get(prefix + "reward"), 3)
    if len(per) > 1:
        text += " (" + " · ".join(f"{name} {format_number(v, 3)}" for name, v in per) + ")"
    if prefix + "reward_std" in row:
        text += f" ± {format_number(row[prefix + 'reward_std'], 2)}"
    if prefix + "completion_length" in row:
        text += f" · length {format_number(row[prefix + 'completion_length'], 3)}"
    if prefix + "kl" in row:
        text += f" · KL {format_number(row[prefix + 'kl'], 2)}"
    return text


def objective_facts(history) -> list[tuple[str, str]]:
    """(label, text) rows for the last logged figures of a dpo/orpo/grpo run; [] for other runs."""
    facts = []
    for key, label, text, prefix in (("rewards_accuracy", "preferences", pair_text, ""),
                                     ("eval_rewards_accuracy", "eval preferences", pair_text, "eval_"),
                                     ("reward", "reward", reward_text, ""),
                                     ("eval_reward", "eval reward (greedy)", reward_text, "eval_")):  # fmt: skip
        row = _last_row(history, key)
        if row is not None:
            facts.append((label, text(row, prefix)))
    return facts


def _cut(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= SAMPLE_CHARS else text[: SAMPLE_CHARS - 1] + "…"


def samples_html(samples, last: int = 4) -> str:
    """A small table of the latest GRPO samples (step, prompt, completion, reward); '' when none."""
    if not samples:
        return ""
    cell = "padding:1px 6px;border-bottom:1px solid #eee;vertical-align:top;text-align:left"
    rows = "".join(
        f'<tr><td style="{cell}">{s.get("step", "")}</td><td style="{cell}">{escape(_cut(s["prompt"]))}</td>'
        f'<td style="{cell};font-family:monospace">{escape(_cut(s["completion"]))}</td>'
        f'<td style="{cell};text-align:right">{format_number(s["reward"], 3)}</td></tr>'
        for s in list(samples)[-last:]
    )
    head = "".join(f'<th style="{cell}">{h}</th>' for h in ("step", "prompt", "completion", "reward"))
    return (f'<div style="font-size:12px;margin-top:4px"><b>recent samples</b><table class="peft-samples" '
            f'style="border-collapse:collapse;font-size:12px"><tr>{head}</tr>{rows}</table></div>')  # fmt: skip


def card_lines(history) -> list[str]:
    """Model-card lines: the last figures of a dpo/orpo/grpo run."""
    facts = objective_facts(history)
    if not facts:
        return []
    return ["## Preference / reward figures (last logged)", "", "| | |", "|---|---|",
            *[f"| {k} | {v} |" for k, v in facts], ""]  # fmt: skip
