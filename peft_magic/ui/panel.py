"""The live training panel: one notebook output updated in place, built from ipywidgets' core widgets only.

Core widgets (HTML, IntProgress, Button, boxes) render in JupyterLab, Notebook 7, Colab, Kaggle and VS Code
without any front-end extension. The loss curve is an SVG string in an ``HTML`` widget. Redraws go through a
`Throttle` (each one is a message to the browser), forced after an evaluation and at the end.

When the run ends, the live panel gives way to a static HTML summary in the same output (its display handle is
updated): the summary holds everything the finished panel showed (curve, figures, evaluation, where the files
are, the export command, the libraries' messages) and, unlike widget state, survives saving and reopening the
notebook, so the live view and the saved notebook both show the result once. Embedded in the `%peft_ui` form, the
panel hides and the form's summary slot shows the summary.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from html import escape
from typing import Any

import ipywidgets as widgets
from IPython import display as ipy_display

from ..events import Callback, TrainState
from .chart import CurveBuffer, confusion_matrix_svg, loss_chart_svg, series_from_history
from .format import format_memory
from .answers import answers_html
from .objective import objective_facts, samples_html
from .lines import (
    end_text,
    eval_text,
    forgetting_text,
    header_text,
    lr_text,
    metric_items,
    progress_text,
    throughput_text,
)
from .summary import confusion_of, details_html, metrics_table_html, summary_html, svg_data_uri
from .throttle import Throttle

__all__ = ["LivePanel", "summary_html"]

STATUS_COLORS = {"failed": "#c62828", "stopped": "#b26a00", "interrupted": "#b26a00", "done": "#2e7d32"}
STOPPING = "stopping after this step…"
LIVE_CHART_POINTS = 300  # per line; the live chart is ~360 px wide
NO_STOP_HINT = "Interrupt the kernel (■ / Ctrl-C) to stop: training stops after the current step and keeps its work."
STOP_HINT_HTML = '<span style="color:#666;font-size:12px;margin-right:6px">to stop: interrupt the kernel (■)</span>'


class LivePanel(Callback):
    """Live view of a training run, subscribed to the engine's events.

    Args:
        stop: Called (no arguments) when the user presses Stop; the engine should stop after the current step.
            Without it the button is disabled and its tooltip says to interrupt the kernel instead.
        max_redraws_per_second: Throttle for redraws of the progress, chart and stats.
        clock: Monotonic clock for the throttle (a fake one in tests and benchmarks).
        auto_show: Display the panel on the first event if `show` was not called before. Call `show` yourself
            from the cell's thread when training runs in a background thread, so the panel lands in that cell.
        summary_extra: Extra rows for the end-of-run summary (see `summary_html`); may be set until the end.
    """

    def __init__(
        self,
        stop: Callable[[], Any] | None = None,
        *,
        max_redraws_per_second: float = 4.0,
        clock: Callable[[], float] = time.monotonic,
        auto_show: bool = True,
        summary_extra: Mapping[str, Any] | None = None,
    ):
        self.stop = stop
        self.throttle = Throttle(max_redraws_per_second, clock=clock)
        # The curve is the costly part of a redraw and changes slowly: redrawn at most once a second.
        self.chart_throttle = Throttle(min(max_redraws_per_second, 1.0), clock=clock)
        self.auto_show = auto_show
        self.summary_extra = dict(summary_extra or {})
        self.summary: str | None = None  # the end-of-run HTML, once there
        self.redraws = 0
        self._shown = False
        self._summary_handle = None
        self._stopping = False
        self._ended = False
        self._curve = CurveBuffer(max_points=LIVE_CHART_POINTS // 2)
        self._evals: list[tuple[float, float]] = []
        self._eval_rows: list[dict[str, Any]] = []
        self._confusion: tuple[list, list[str]] | None = None  # of the last evaluation, for classifiers
        self._rows: list[dict[str, Any]] = []  # every row seen, for a summary when the engine keeps no history
        self._chart_dirty = True
        self._metrics_dirty = False
        self._build()

    # ----------------------------------------------------------------- widgets
    def _build(self) -> None:
        layout = widgets.Layout
        self.header = widgets.HTML(layout=layout(flex="1 1 auto"))
        self.stop_button = widgets.Button(
            description="Stop",
            icon="stop",
            button_style="danger",
            disabled=self.stop is None,
            tooltip="Stop after the current step; the checkpoint and adapter are kept" if self.stop else NO_STOP_HINT,
            layout=layout(width="auto", flex="0 0 auto"),
        )
        self.stop_button.on_click(self._on_stop_click)
        # A tooltip does not show on a disabled button: in a blocking cell, say in plain sight how to stop.
        self.stop_hint = widgets.HTML(value="" if self.stop else STOP_HINT_HTML, layout=layout(flex="0 0 auto"))
        self.progress = widgets.IntProgress(value=0, min=0, max=1, layout=layout(flex="1 1 auto", width="auto"))
        self.progress_label = widgets.HTML(layout=layout(flex="0 0 auto", margin="0 0 0 8px"))
        self.chart = widgets.HTML(value=loss_chart_svg(), layout=layout(flex="0 0 auto"))
        self.stats = widgets.HTML(layout=layout(flex="1 1 auto", margin="0 0 0 12px"))
        self.metrics = widgets.HTML()
        self.status = widgets.HTML(value=self._status_html("starting"))
        self.details = widgets.HTML()  # the libraries' warnings and logs, collapsed (redrawn when one is added)
        self._details_count = 0
        self.widget = widgets.VBox(
            [
                widgets.HBox([self.header, self.stop_hint, self.stop_button], layout=layout(align_items="center")),
                widgets.HBox([self.progress, self.progress_label], layout=layout(align_items="center")),
                widgets.HBox([self.chart, self.stats], layout=layout(align_items="flex-start")),
                self.metrics,
                self.status,
                self.details,
            ],
            layout=layout(border="1px solid #ddd", padding="6px 10px", width="100%"),
        )

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def show(self) -> None:
        """Display the panel in an output that the summary replaces when the run ends (idempotent)."""
        if self._shown:
            return
        self._shown = True
        # A display handle, taken now from the cell's thread, makes the summary replace the panel in this cell
        # even when the run ends in a background thread while another cell is executing.
        self._summary_handle = ipy_display.display(self.widget, display_id=True)

    def embed(self, summary: widgets.HTML | None = None) -> widgets.Widget:
        """The panel's widget, to place inside another widget (the `%peft_ui` form) instead of displaying it.

        Args:
            summary: An HTML widget that receives the end-of-run summary (the panel then hides); without it the
                summary is displayed in whatever output is current when the run ends.
        """
        self._shown = True
        if summary is not None:
            self._summary_handle = _HtmlSlot(summary, hide=self.widget)
        return self.widget

    def _maybe_show(self) -> None:
        if self.auto_show and not self._shown:
            self.show()

    # ------------------------------------------------------------------ events
    def on_status(self, state: TrainState, status: str) -> None:
        self._maybe_show()
        self.status.value = self._status_html(status, state)

    def on_train_begin(self, state: TrainState) -> None:
        self._maybe_show()
        # A panel attached late (or re-attached) starts from what the run already logged.
        if state.log_history and not self._rows:
            for row in state.log_history:
                self._record(row)
        self.throttle.ready(force=True)
        self._redraw(state, force=True)

    def on_step_end(self, state: TrainState) -> None:
        # Every optimizer step: one clock read unless a redraw is due.
        if self.throttle.ready():
            self._redraw(state)

    def on_log(self, state: TrainState, logs: dict[str, Any]) -> None:
        self._record({"step": state.step, **logs})
        if self.throttle.ready():
            self._redraw(state)

    def on_evaluate(self, state: TrainState, metrics: dict[str, Any]) -> None:
        # The engine adds the evaluation's full output under "_full" (per-class F1, confusion matrix).
        full = metrics.get("_full")
        self._confusion = confusion_of(full) if isinstance(full, Mapping) else self._confusion
        self._record({"step": state.step, **{k: v for k, v in metrics.items() if k != "_full"}})
        self.throttle.ready(force=True)
        self._redraw(state, force=True)

    def on_train_end(self, state: TrainState) -> None:
        self._maybe_show()
        self._ended = True
        self.throttle.ready(force=True)
        self._redraw(state, force=True)
        self.stop_button.disabled = True
        self.stop_hint.value = ""
        self.stop_button.description = "Stopped" if state.stop_reason in ("stopped", "interrupted") else "Stop"
        history = state.log_history or self._rows
        extra = dict(self.summary_extra)
        if self._confusion is not None:
            # As an image, like the curve: it survives notebook sanitizers that strip inline SVG.
            svg = confusion_matrix_svg(*self._confusion)
            extra.setdefault(
                "confusion matrix", ipy_display.HTML(f'<img alt="confusion matrix" src="{svg_data_uri(svg)}"/>')
            )
        self.summary = summary_html(state, history, extra)
        summary = ipy_display.HTML(self.summary)
        if self._summary_handle is not None:
            self._summary_handle.update(summary)
        else:
            ipy_display.display(summary)

    # -------------------------------------------------------------- internals
    def _on_stop_click(self, _button=None) -> None:
        if self._stopping or self._ended or self.stop is None:
            return
        self._stopping = True
        self.stop()
        self.stop_button.disabled = True
        self.stop_button.description = "Stopping…"
        self.status.value = self._status_html(STOPPING)

    def _record(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        train, evals = series_from_history([row])
        if train or evals:
            for step, loss in train:
                self._curve.add(step, loss)
            self._evals += evals
            self._chart_dirty = True
        if metric_items(row):
            self._eval_rows.append(row)
            self._metrics_dirty = True

    def _status_html(self, status: str, state: TrainState | None = None) -> str:
        text = status
        if state is not None and state.stop_reason is not None:
            text = end_text(state)
        elif status == "failed" and state is not None and state.error:
            text = f"failed: {state.error}"
        elif self._stopping and status in ("training", "evaluating"):
            text = STOPPING
        reason = (state.stop_reason if state is not None else None) or status
        color = STATUS_COLORS.get(reason, STATUS_COLORS.get(status, "#444"))
        if reason == "completed":
            color = STATUS_COLORS["done"]
        return f'<span style="color:{color}">status: {escape(text)}</span>'

    def _stats_html(self, state: TrainState) -> str:
        last_eval = self._eval_rows[-1] if self._eval_rows else None
        rows = [
            ("lr", lr_text(state)),
            ("throughput", throughput_text(state)),
            ("memory", format_memory(state.memory)),
            ("eval", eval_text(last_eval, last_eval.get("step")) if last_eval else "–"),
        ]
        forgetting = forgetting_text(state.log_history)
        if forgetting:
            rows.append(("general text", forgetting))
        if getattr(state, "output_note", None):  # Colab / Kaggle: where checkpoints survive the session
            rows.append(("checkpoints", state.output_note))
        if getattr(state, "data_warning", None):  # most rows cut by max_length: the plan's warning, kept in view
            rows.append(("⚠ data", state.data_warning))
        rows += objective_facts(state.log_history)  # dpo/orpo/grpo: rewards, margins, accuracy, KL
        cells = "".join(
            f'<tr><td style="color:#666;padding:0 10px 0 0">{k}</td><td>{escape(v)}</td></tr>' for k, v in rows
        )
        return f'<table style="font-size:12px;border-collapse:collapse">{cells}</table>{samples_html(state.samples)}'

    def _redraw(self, state: TrainState, force: bool = False) -> None:
        """Push the current state to the widgets (ipywidgets sends only the values that changed)."""
        self.redraws += 1
        self.header.value = f"<b>{escape(header_text(state))}</b>"
        self.progress.max = max(state.max_steps, 1)
        self.progress.value = min(state.step, self.progress.max)
        self.progress_label.value = escape(progress_text(state))
        if self._chart_dirty and self.chart_throttle.ready(force=force):
            self.chart.value = loss_chart_svg(
                self._curve.raw, self._evals, smooth=self._curve.smooth, max_points=LIVE_CHART_POINTS
            )
            self._chart_dirty = False
        self.stats.value = self._stats_html(state)
        if self._metrics_dirty:
            table = metrics_table_html(self._eval_rows)
            if self._confusion is not None:
                matrix = confusion_matrix_svg(*self._confusion, cell=min(28, max(8, 240 // len(self._confusion[1]))))
                table = f'<div style="display:flex;gap:16px;align-items:flex-start">{table}{matrix}</div>'
            self.metrics.value = table + answers_html(self._eval_rows)  # eval.samples: grows with each evaluation
            self._metrics_dirty = False
        self.status.value = self._status_html(state.status, state)
        details = getattr(state, "details", ())
        if len(details) != self._details_count:
            self._details_count = len(details)
            self.details.value = details_html(details)
        if state.stop_reason is not None:
            self.progress.bar_style = {"completed": "success", "failed": "danger"}.get(state.stop_reason, "warning")


class _HtmlSlot:
    """Stands in for a display handle (`update`) when the summary goes into an HTML widget."""

    def __init__(self, widget: widgets.HTML, hide: widgets.Widget | None = None):
        self.widget = widget
        self.hide = hide

    def update(self, obj) -> None:
        self.widget.value = obj.data
        if self.hide is not None:  # one copy of the result: the summary takes the finished panel's place
            self.hide.layout.display = "none"
