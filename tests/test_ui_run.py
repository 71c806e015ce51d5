"""The live panel and the terminal printer subscribed to real training runs of a tiny model."""

from __future__ import annotations

import base64
import re
import threading
import xml.etree.ElementTree as ET

from conftest import lm_rows, sentiment_rows
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

import peft_magic


def curve_of(summary: str) -> ET.Element:
    src = re.search(r'class="peft-curve"[^>]*src="data:image/svg\+xml;base64,([^"]+)"', summary).group(1)
    return ET.fromstring(base64.b64decode(src))


def test_panel_follows_a_seq_cls_run_and_leaves_a_summary(tiny_llama, tmp_path, panels):
    cfg = {
        "model": tiny_llama,
        "task": "seq-cls",
        "method": {"name": "lora", "r": 4},
        "data": {"train": sentiment_rows(32), "eval": sentiment_rows(8, seed=1)},
        "train": {"max_steps": 6, "learning_rate": 1e-2, "logging_steps": 2, "eval_steps": 3,
                  "output_dir": str(tmp_path / "out")},
    }  # fmt: skip
    InteractiveShell.instance()  # before capture_output, which captures displays of an existing shell
    with capture_output() as captured:
        run = peft_magic.train(cfg, display="panel")
    (panel,) = panels
    assert panel.progress.value == panel.progress.max == 6
    assert "6/6 steps" in panel.progress_label.value
    losses = [row for row in run.history if "loss" in row]
    chart = curve_of(panel.summary)
    (raw,) = [el for el in chart.iter() if el.get("class") == "train-raw"]
    assert len(raw.get("points").split()) == len(losses) == 3
    evals = [row for row in run.history if "eval_loss" in row]
    assert len([el for el in chart.iter() if el.get("class") == "eval-point"]) == len(evals) == 2
    assert f"{run.history[-1]['eval_accuracy']:.4g}" in panel.summary
    assert 'alt="confusion matrix"' in panel.summary and "cm-cell" in panel.metrics.value
    assert str(tmp_path / "out") in panel.summary
    assert "completed 6/6 steps" in panel.status.value
    assert "RSS" in panel.stats.value or "GPU" in panel.stats.value
    # Shown once, then the summary fills the slot reserved under it.
    outputs = captured.outputs  # a property that builds new objects on each access
    assert [i for i, o in enumerate(outputs) if "application/vnd.jupyter.widget-view+json" in o.data] == [0]
    assert outputs[-1].data["text/html"] == panel.summary and outputs[-1].update
    assert outputs[-1].transient["display_id"] == outputs[1].transient["display_id"]


def test_stop_button_in_a_background_run_keeps_the_work(tiny_llama, tmp_path, panels):
    reached = threading.Event()

    class Signal:
        def on_step_end(self, state):
            if state.step == 3:
                reached.set()

    cfg = {
        "model": tiny_llama,
        "method": {"name": "lora", "r": 4},
        "data": {"train": lm_rows(), "eval": 0.2},
        "train": {"max_steps": 400, "logging_steps": 1, "save_steps": 1000, "output_dir": str(tmp_path / "bg")},
    }
    InteractiveShell.instance()
    with capture_output():
        run = peft_magic.train(cfg, display="panel", background=True, callbacks=[Signal()])
        assert reached.wait(60)
        (panel,) = panels
        panel.stop_button.click()  # from the main thread, as a click in the browser arrives
        assert "stopping after this step" in panel.status.value
        run.wait(120)
    assert run.state.stop_reason == "stopped" and 3 <= run.state.step < 400
    assert f"stopped at step {run.state.step}/400" in panel.status.value
    assert panel.stop_button.disabled and panel.stop_button.description == "Stopped"
    assert f"stopped at step {run.state.step}/400" in panel.summary
    assert run.state.checkpoint_dir and run.state.checkpoint_dir in panel.summary


def test_terminal_printer_on_a_real_run(tiny_llama, tmp_path, capsys):
    cfg = {
        "model": tiny_llama,
        "method": {"name": "lora", "r": 4},
        "data": {"train": lm_rows(), "eval": 0.2},
        "train": {"max_steps": 4, "logging_steps": 2, "eval_steps": 2, "output_dir": str(tmp_path / "t")},
    }
    run = peft_magic.train(cfg, display="terminal")
    out = capsys.readouterr().out.splitlines()
    steps = [line for line in out if line.startswith("step ")]
    assert [s.split(" · ")[0] for s in steps] == ["step 2/4", "step 4/4"]
    first_loss = next(r["loss"] for r in run.history if "loss" in r)
    assert f"loss {first_loss:.3g}" in steps[0]
    assert any(line.startswith("eval step 2 · loss ") for line in out)
    assert out[-1].startswith("completed 4/4 steps in ")
    assert "status: loading model" in out and "status: evaluating" in out
