"""The static end-of-run summary: plain HTML that survives a saved, reopened or nbconvert'ed notebook.

Widget state is gone when a notebook is reopened; a ``text/html`` output is not. The summary holds the
final curve (an SVG inlined as a data-URI image, which notebook sanitizers and renderers keep), the
metrics, how the run ended and where its files are. No ipywidgets here: scripts can call it too.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from typing import Any

from .chart import loss_chart_from_history
from .format import format_duration, format_memory, format_number, metric_name
from .answers import answers_html
from .objective import objective_facts, samples_html
from .lines import (
    end_text,
    eval_rows,
    forgetting_text,
    header_text,
    last_value,
    lr_text,
    metric_items,
    throughput_text,
)

END_COLORS = {"completed": "#2e7d32", "stopped": "#b26a00", "interrupted": "#b26a00", "failed": "#c62828"}
TABLE_STYLE = "border-collapse:collapse;font-size:12px"
CELL_STYLE = "padding:1px 8px;text-align:right;border-bottom:1px solid #eee"


def svg_data_uri(svg: str) -> str:
    """``data:image/svg+xml;base64,...`` for an SVG string (the form an ``<img>`` shows everywhere)."""
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode("utf-8")).decode("ascii")


def metrics_table_html(rows: Sequence[Mapping[str, Any]], max_rows: int = 12) -> str:
    """HTML table of evaluation rows: one row per evaluation, one column per metric; ``''`` when none.

    Args:
        rows: Eval rows such as ``{"step": 50, "eval_loss": 2.1, "eval_accuracy": 0.8}``.
        max_rows: Show only the last ``max_rows`` evaluations (with a note of how many are hidden).
    """
    if not rows:
        return ""
    keys: list[str] = []
    for row in rows:
        for key, _ in metric_items(row):
            if key not in keys:
                keys.append(key)
    keys.sort(key=lambda k: k != "eval_loss")
    head = "".join(f'<th style="{CELL_STYLE}">{escape(metric_name(k))}</th>' for k in ["step", *keys])
    body = []
    hidden = max(len(rows) - max_rows, 0)
    for row in rows[hidden:]:
        cells = [row.get("step")] + [row.get(k) for k in keys]
        body.append(
            "<tr>" + "".join(f'<td style="{CELL_STYLE}">{escape(format_number(v))}</td>' for v in cells) + "</tr>"
        )
    note = f'<div style="font-size:11px;color:#888">{hidden} earlier evaluations not shown</div>' if hidden else ""
    return f'<table class="peft-metrics" style="{TABLE_STYLE}"><tr>{head}</tr>{"".join(body)}</table>{note}'


def confusion_of(metrics: Mapping[str, Any] | None) -> tuple[list, list[str]] | None:
    """``(matrix, labels)`` from full evaluation metrics (``confusion_matrix`` + ``f1_per_class``), else None.

    Args:
        metrics: What the evaluation returned (the engine passes it as ``metrics["_full"]`` to ``on_evaluate``).
    """
    matrix = (metrics or {}).get("confusion_matrix")
    if not matrix:
        return None
    names = list((metrics.get("f1_per_class") or {}).keys())
    labels = names if len(names) == len(matrix) else [str(i) for i in range(len(matrix))]
    return matrix, labels


def _facts(state, history: list[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(label, HTML) rows of the summary's fact table."""
    facts = [("steps", f"{state.step}/{state.max_steps or '?'}"), ("time", format_duration(state.elapsed))]
    loss = last_value(history, "loss")
    if loss is not None:
        facts.append(("final train loss", format_number(loss)))
    evals = [row["eval_loss"] for row in history if isinstance(row.get("eval_loss"), (int, float))]
    if evals:
        facts.append(("eval loss", f"{format_number(evals[-1])} (best {format_number(min(evals))})"))
    forgetting = forgetting_text(history)
    if forgetting:
        facts.append(("general-text loss", forgetting))
    facts += objective_facts(history)
    facts.append(("learning rate", lr_text(state)))
    facts.append(("throughput", throughput_text(state)))
    if state.memory:
        facts.append(("memory", format_memory(state.memory)))
    facts = [(label, escape(text)) for label, text in facts]
    for label, path in (("output", state.output_dir), ("checkpoint", state.checkpoint_dir)):
        if path:
            facts.append((label, f"<code>{escape(str(path))}</code>"))
    return facts


def _is_rich(value: Any) -> bool:
    return callable(getattr(value, "_repr_html_", None))


def details_html(details) -> str:
    """The libraries' warnings and logs of a run, collapsed: ``▸ details: 3 library messages`` (plain HTML
    ``<details>``, so it opens in every front end and in a saved notebook), or '' when there are none."""
    details = list(details or ())
    if not details:
        return ""
    noun = "message" if len(details) == 1 else "messages"
    lines = "\n".join(escape(line) for line in details)
    return (
        '<details class="peft-details" style="font-size:12px;color:#666;margin-top:4px">'
        f"<summary>details: {len(details)} library {noun} (transformers, peft, ...)</summary>"
        f'<pre style="white-space:pre-wrap;max-height:240px;overflow:auto;margin:2px 0">{lines}</pre></details>'
    )


def summary_html(state, history: Iterable[Mapping[str, Any]], extra: Mapping[str, Any] | None = None) -> str:
    """Self-contained HTML summary of a finished (or failed) run.

    Args:
        state: The run's `TrainState` (title, step counts, stop reason, error, memory, directories).
        history: ``Run.history`` rows (train and eval), used for the curve and the metrics table.
        extra: More rows to show, label -> value: text is shown as code (e.g. the export command), objects with
            ``_repr_html_`` are embedded as they are (e.g. a confusion matrix).
    """
    history = list(history)
    reason = state.stop_reason or state.status
    color = END_COLORS.get(reason, "#444")
    svg = loss_chart_from_history(history, width=420, height=200)
    facts = _facts(state, history)
    fact_rows = "".join(
        f'<tr><td style="padding:1px 8px;color:#666">{escape(k)}</td><td style="padding:1px 8px">{v}</td></tr>'
        for k, v in facts
    )
    extra = dict(extra or {})
    # Text extras (the export command) join the facts; rich ones (a confusion matrix) sit by the eval table.
    extra_rows = "".join(
        f'<tr><td style="padding:1px 8px;color:#666">{escape(str(k))}</td>'
        f'<td style="padding:1px 8px"><code>{escape(str(v))}</code></td></tr>'
        for k, v in extra.items()
        if not _is_rich(v)
    )
    blocks = []
    metrics = metrics_table_html(eval_rows(history))
    if metrics:
        blocks.append(f"<div><b>evaluation</b>{metrics}</div>")
    if getattr(state, "samples", None):
        blocks.append(samples_html(state.samples))
    answers = answers_html(history, max_rows=24)  # eval.samples
    if answers:
        blocks.append(answers)
    blocks += [
        f"<div><b>{escape(str(k))}</b><div>{v._repr_html_() or ''}</div></div>" for k, v in extra.items() if _is_rich(v)
    ]
    metrics_block = (
        f'<div style="display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start;margin-top:6px">{"".join(blocks)}</div>'
        if blocks
        else ""
    )
    return (
        '<div class="peft-magic-summary" style="font-family:sans-serif;font-size:13px;border:1px solid #ddd;'
        'border-radius:4px;padding:8px 10px;max-width:900px">'
        f'<div style="font-weight:bold">{escape(header_text(state))}</div>'
        f'<div class="peft-end" style="color:{color};margin:2px 0 6px">{escape(end_text(state))}</div>'
        '<div style="display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start">'
        f'<img class="peft-curve" alt="loss curve" width="420" height="200" src="{svg_data_uri(svg)}"/>'
        f'<table style="{TABLE_STYLE}">{fact_rows}{extra_rows}</table></div>'
        f"{metrics_block}{details_html(getattr(state, 'details', None))}</div>"
    )
