"""Plain progress lines for terminal IPython, scripts and the CLI.

One line per log, evaluation, status change and at the end: readable in a terminal, greppable in a log
file, and nothing that needs a cursor (no carriage returns, no colours).
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from ..events import Callback, TrainState
from .format import format_count, format_epochs, format_number, metric_name
from .answers import answer_lines
from .lines import end_text, forgetting_text, header_text, log_line, metric_items, throughput_text
from .objective import objective_facts


class TerminalPrinter(Callback):
    """Prints ``step 20/200 · loss 2.31 · lr 1.6e-4 · 12.3 samples/s · ETA 01:10`` lines as training goes.

    Args:
        stream: Where to print; default is whatever ``sys.stdout`` is at print time (so redirections and
            pytest's capture work).
    """

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream
        self._last_status: str | None = None

    def _print(self, line: str) -> None:
        print(line, file=self.stream or sys.stdout, flush=True)

    def on_status(self, state: TrainState, status: str) -> None:
        # Printed only when it changes: the engine may repeat "training" after every evaluation.
        if status != self._last_status:
            self._last_status = status
            text = f"failed: {state.error}" if status == "failed" and state.error else status
            self._print(f"status: {text}")

    def on_train_begin(self, state: TrainState) -> None:
        self._last_status = state.status
        plan = f"{state.max_steps} steps" if state.max_steps else "steps unknown"
        if state.num_epochs:
            plan += f" · {format_epochs(state.num_epochs)}"
        if state.total_params and not state.trainable_params:
            plan += f" · {format_count(state.total_params)} params"
        self._print(f"{header_text(state)} · {plan}")
        if getattr(state, "output_note", None):
            self._print(f"checkpoints: {state.output_note}")
        if getattr(state, "data_warning", None):
            self._print(f"warning: {state.data_warning}")

    def on_log(self, state: TrainState, logs: dict[str, Any]) -> None:
        if "loss" in logs or "learning_rate" in logs:
            extra = " · ".join(f"{k} {v}" for k, v in objective_facts([logs]))  # dpo/orpo/grpo figures
            self._print(log_line(state, logs) + (f" · {extra}" if extra else ""))

    def on_evaluate(self, state: TrainState, metrics: dict[str, Any]) -> None:
        items = metric_items(metrics)
        text = " · ".join(f"{metric_name(k)} {format_number(v, 3)}" for k, v in items)
        self._print(f"eval step {metrics.get('step', state.step)} · {text or 'no metrics'}")
        for line in answer_lines(metrics):  # eval.samples: one short line per prompt
            self._print(line)

    def on_train_end(self, state: TrainState) -> None:
        parts = [end_text(state)]
        loss = next((row["loss"] for row in reversed(state.log_history) if "loss" in row), None)
        if loss is not None:
            parts.append(f"final loss {format_number(loss, 3)}")
        forgetting = forgetting_text(state.log_history)
        if forgetting:
            parts.append(f"general-text loss {forgetting}")
        if state.samples_seen:
            parts.append(throughput_text(state))
        if state.output_dir:
            parts.append(f"output in {state.output_dir}")
        self._print(" · ".join(parts))
