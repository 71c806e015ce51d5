"""How `%peft_eval` and `%peft_generate` show their results: rich HTML in a notebook, plain text elsewhere.

Both return objects that IPython displays by itself (``_repr_html_`` in a notebook, ``_repr_pretty_`` in a
terminal), so a bare `%peft_eval` shows one output and ``m = %peft_eval`` still gets the plain values.
Pure strings and the SVG helpers of `ui.chart`; no ipywidgets, so the output survives a saved notebook.
"""

from __future__ import annotations

from html import escape

from .ui.chart import confusion_matrix_svg
from .ui.format import format_number, metric_name

TABLE = 'style="border-collapse:collapse;font-size:12px"'
CELL = 'style="padding:2px 10px;text-align:left;vertical-align:top;border-bottom:1px solid #eee"'
SCALARS = ("loss", "perplexity", "accuracy", "precision", "recall", "f1")


class EvalMetrics(dict):
    """The metrics dict of an evaluation (``run.evaluate()``), shown as a table, per-class F1 and a confusion
    matrix picture in a notebook, and as one line in a terminal."""

    def scalars(self) -> dict:
        keys = [k for k in SCALARS if k in self] + [k for k in self if k not in SCALARS]
        return {k: self[k] for k in keys if isinstance(self[k], (int, float)) and not isinstance(self[k], bool)}

    def text(self) -> str:
        return " · ".join(f"{metric_name(k)} {format_number(v)}" for k, v in self.scalars().items())

    def _repr_pretty_(self, p, cycle):
        p.text(self.text())

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td {CELL}>{escape(metric_name(k))}</td><td {CELL}>{escape(format_number(v))}</td></tr>"
                       for k, v in self.scalars().items())  # fmt: skip
        parts = [f'<div class="peft-eval" style="display:flex;gap:24px;align-items:flex-start">',
                 f"<table {TABLE}>{rows}</table>"]  # fmt: skip
        per_class = self.get("f1_per_class") or {}
        if per_class:
            body = "".join(f"<tr><td {CELL}>{escape(str(k))}</td><td {CELL}>{escape(format_number(v))}</td></tr>"
                           for k, v in per_class.items())  # fmt: skip
            parts.append(f"<table {TABLE}><tr><th {CELL}>class</th><th {CELL}>F1</th></tr>{body}</table>")
        matrix = self.get("confusion_matrix")
        if matrix:
            names = list(per_class) if len(per_class) == len(matrix) else [str(i) for i in range(len(matrix))]
            parts.append(f"<div>{confusion_matrix_svg(matrix, names)}</div>")
        parts.append("</div>")
        return "".join(parts)


class Generations:
    """Base model and adapter outputs for one prompt, side by side.

    Attributes:
        prompt: The prompt as the user gave it.
        tuned: The adapted model's completion.
        base: The base model's completion, or None when the method cannot switch its change off.
    """

    def __init__(self, prompt: str, tuned: str, base: str | None):
        self.prompt, self.tuned, self.base = prompt, tuned, base

    def text(self) -> str:
        base = self.base if self.base is not None else "(not available: this method changes the weights in place)"
        return f"prompt: {self.prompt}\nbase:   {base}\ntuned:  {self.tuned}"

    def __repr__(self) -> str:
        return self.text()

    def _repr_pretty_(self, p, cycle):
        p.text(self.text())

    def _repr_html_(self) -> str:
        def cell(text):
            if text is None:
                return f'<td {CELL}><i style="color:#888">not available (weights changed in place)</i></td>'
            return f'<td {CELL}><pre style="white-space:pre-wrap;margin:0">{escape(text)}</pre></td>'

        return (
            f'<div class="peft-generate"><div style="color:#666;font-size:12px">prompt: {escape(self.prompt)}</div>'
            f'<table {TABLE} class="peft-generate-table"><tr><th {CELL}>base model</th><th {CELL}>with adapter</th>'
            f"</tr><tr>{cell(self.base)}{cell(self.tuned)}</tr></table></div>"
        )


def generate_both(run, prompt: str, **kw) -> Generations:
    """The run's completion of `prompt` with and without its adapter (peft's `disable_adapter`)."""
    tuned = run.generate(prompt, **kw)
    disable = getattr(run.model, "disable_adapter", None)
    base = None
    if disable is not None:
        with disable():
            base = run.generate(prompt, **kw)
    return Generations(prompt, tuned, base)
