"""In a real kernel run by nbclient: the saved notebook keeps the static summary, in the panel's own cell."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parents[1]

SETUP = f"""
import sys, threading, time
sys.path.insert(0, {str(REPO)!r})
from peft_magic.events import EventBus, TrainState
from peft_magic.ui import in_notebook, make_display

def drive(bus, state, steps=40):
    bus.emit("on_status", state, "loading model")
    state.status = "training"
    bus.emit("on_train_begin", state)
    for i in range(1, steps + 1):
        state.step, state.samples_seen = i, 8 * i
        bus.emit("on_step_end", state)
        if i % 5 == 0:
            row = {{"step": i, "loss": 3.0 / (1 + i / 10), "learning_rate": 1e-4}}
            state.log_history.append(row)
            bus.emit("on_log", state, row)
        if i % 20 == 0:
            row = {{"step": i, "eval_loss": 2.5 - i / 40, "eval_accuracy": 0.5 + i / 100}}
            state.log_history.append(row)
            bus.emit("on_evaluate", state, row)
        time.sleep(0.005)
    state.stop_reason, state.status, state.output_dir = "completed", "done", "runs/nb-test"
    bus.emit("on_train_end", state)
"""

START = """
assert in_notebook()
panel = make_display(stop=lambda: None)
panel.show()  # from the cell's thread; the run itself goes on in a background thread
state = TrainState(max_steps=40, title="tiny-llama · LoRA r=4")
worker = threading.Thread(target=drive, args=(EventBus([panel]), state))
worker.start()
"""

LATER = """
worker.join()
print("joined")
"""


def test_summary_is_saved_in_the_panel_cell_even_from_a_background_thread():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(textwrap.dedent(src)) for src in (SETUP, START, LATER)]
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    panel_cell, later_cell = nb.cells[1], nb.cells[2]

    mimes = [set(out.get("data", {})) for out in panel_cell.outputs]
    assert "application/vnd.jupyter.widget-view+json" in mimes[0]
    summaries = [out["data"]["text/html"] for out in panel_cell.outputs if "text/html" in out.get("data", {})]
    assert len(summaries) == 1
    summary = summaries[0]
    assert 'class="peft-magic-summary"' in summary and "completed 40/40 steps" in summary
    assert 'class="peft-curve"' in summary and "runs/nb-test" in summary
    # Nothing of the panel leaked into the cell that was running when the thread finished.
    assert [out.get("text", "") for out in later_cell.outputs] == ["joined\n"]

    # And it is still there after a save and a reload (the widget state is not, by design).
    reloaded = nbformat.reads(nbformat.writes(nb), as_version=4)
    assert any(summary == out.get("data", {}).get("text/html") for out in reloaded.cells[1].outputs)
