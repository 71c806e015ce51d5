"""What the panel, the printed lines, the summary and the model card show of `eval.samples`: the greedy answers to
fixed eval prompts at each evaluation, as a table of (step, prompt, answer) that grows with the run.

Pure functions of history rows (an evaluation row holds ``"samples": [{"prompt", "answer"}]``): no widgets here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from html import escape
from typing import Any

PROMPT_CHARS = 90  # a prompt is shown by its end (the question), an answer by its start
ANSWER_CHARS = 160
LINE_CHARS = 60  # in a printed line, each side


def sample_rows(history: Iterable[Mapping[str, Any]] | None) -> list[dict]:
    """``[{"step", "prompt", "answer"}]`` of every evaluation's samples, in the order they were generated."""
    out = []
    for row in history or ():
        samples = row.get("samples") if isinstance(row, Mapping) else None
        for s in samples if isinstance(samples, list) else ():
            if isinstance(s, Mapping) and "answer" in s:
                out.append({"step": row.get("step"), "prompt": str(s.get("prompt", "")), "answer": str(s["answer"])})
    return out


def head(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def tail(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else "…" + text[-(n - 1):]


def answers_html(history, max_rows: int = 12) -> str:
    """A small HTML table of the sample answers (step, prompt, answer), the latest `max_rows`; '' when none."""
    rows = sample_rows(history)
    if not rows:
        return ""
    hidden = max(len(rows) - max_rows, 0)
    cell = "padding:1px 6px;border-bottom:1px solid #eee;vertical-align:top;text-align:left"
    body = "".join(
        f'<tr><td style="{cell};text-align:right">{r["step"]}</td><td style="{cell};color:#555">'
        f'{escape(tail(r["prompt"], PROMPT_CHARS))}</td><td style="{cell};font-family:monospace">'
        f'{escape(head(r["answer"], ANSWER_CHARS)) or "<i>(empty)</i>"}</td></tr>'
        for r in rows[hidden:]
    )
    th = "".join(f'<th style="{cell}">{h}</th>' for h in ("step", "prompt", "answer"))
    note = f'<div style="font-size:11px;color:#888">{hidden} earlier answers not shown</div>' if hidden else ""
    return (f'<div style="font-size:12px;margin-top:4px"><b>sample answers (greedy)</b><table class="peft-answers" '
            f'style="border-collapse:collapse;font-size:12px"><tr>{th}</tr>{body}</table>{note}</div>')  # fmt: skip


def answer_lines(row: Mapping[str, Any]) -> list[str]:
    """The printed lines of one evaluation's samples: ``  answer · …say yes → yes``."""
    return [f"  answer · {tail(s['prompt'], LINE_CHARS)} → {head(s['answer'], LINE_CHARS) or '(empty)'}"
            for s in sample_rows([row])]  # fmt: skip


def card_lines(history) -> list[str]:
    """Model-card lines: every evaluation's sample answers as a Markdown table (the latest 40)."""
    rows = sample_rows(history)[-40:]
    if not rows:
        return []

    def md(text):
        return text.replace("|", "\\|")

    return ["## Sample answers (greedy, at each evaluation)", "", "| step | prompt | answer |", "|---|---|---|",
            *[f"| {r['step']} | {md(tail(r['prompt'], PROMPT_CHARS))} | {md(head(r['answer'], ANSWER_CHARS))} |"
              for r in rows], ""]  # fmt: skip
