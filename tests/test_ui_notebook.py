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

    # One copy of the result: the panel's output was replaced by the summary (no widget view is left beside it).
    assert len(panel_cell.outputs) == 1
    assert "application/vnd.jupyter.widget-view+json" not in panel_cell.outputs[0]["data"]
    summary = panel_cell.outputs[0]["data"]["text/html"]
    assert 'class="peft-magic-summary"' in summary and "completed 40/40 steps" in summary
    assert 'class="peft-curve"' in summary and "runs/nb-test" in summary
    # Nothing of the panel leaked into the cell that was running when the thread finished.
    assert [out.get("text", "") for out in later_cell.outputs] == ["joined\n"]

    # And it is still there after a save and a reload (the widget state is not, by design).
    reloaded = nbformat.reads(nbformat.writes(nb), as_version=4)
    assert any(summary == out.get("data", {}).get("text/html") for out in reloaded.cells[1].outputs)


def test_a_run_leaves_only_the_summary_in_its_cell_and_the_libraries_messages_in_its_details(tiny_llama, tmp_path):
    """A real run in a real kernel whose libraries warn, log and draw a bar from inside the loop: the cell ends
    with the summary alone, and the libraries' messages are in its collapsed details; the user's own warning
    still shows."""
    setup = f"""
    import logging, sys, warnings
    sys.path.insert(0, {str(REPO)!r})
    import peft_magic, transformers
    from transformers.utils import logging as hf_logging

    class Noisy:
        def on_step_end(self, state):
            if state.step == 2:  # as transformers does when peft reads a deprecated property mid-run
                warnings.warn_explicit("`is_gradient_checkpointing` is deprecated (test)", FutureWarning,
                                       transformers.modeling_utils.__file__, 3312)
                logging.getLogger("transformers.trainer").warning("a library log line (test)")
                for _ in hf_logging.tqdm(range(3), desc="a library bar (test)"):
                    pass
                warnings.warn("the user's own warning (test)")

    rows = [{{"text": "the cat sat on the mat " * (1 + i % 3)}} for i in range(24)]
    """
    train = f"""
    run = peft_magic.train({{"model": {tiny_llama!r}, "method": {{"name": "lora", "r": 2}}, "data": {{"train": rows}},
                            "train": {{"max_steps": 4, "logging_steps": 1, "output_dir": "nb-run"}}}},
                           callbacks=[Noisy()])
    """
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(textwrap.dedent(src)) for src in (setup, train)]
    # the kernel works in tmp_path, so the run's folder (nb-run) lands there, not in the repository
    resources = {"metadata": {"path": str(tmp_path)}}
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources=resources).execute()
    assert (tmp_path / "nb-run").is_dir()
    outputs = nb.cells[1].outputs
    streams = "".join(out.get("text", "") for out in outputs if out["output_type"] == "stream")
    assert "FutureWarning" not in streams and "library log line" not in streams and "library bar" not in streams
    assert "the user's own warning (test)" in streams
    shown = [out for out in outputs if out["output_type"] in ("display_data", "execute_result")]
    assert len(shown) == 1 and "application/vnd.jupyter.widget-view+json" not in shown[0]["data"]
    summary = shown[0]["data"]["text/html"]
    assert 'class="peft-magic-summary"' in summary and "completed 4/4 steps" in summary
    details = summary.split('<details class="peft-details"', 1)[1]
    assert "FutureWarning: `is_gradient_checkpointing` is deprecated (test)" in details
    assert "warning (transformers.trainer): a library log line (test)" in details
    assert "the user&#x27;s own warning" not in details
