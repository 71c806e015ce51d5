"""The live panel driven by synthetic training events, and its static end-of-run summary."""

import base64
import re
import xml.etree.ElementTree as ET

import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from peft_magic.events import EventBus, TrainState
from peft_magic.ui.panel import STOPPING, LivePanel
from peft_magic.ui.summary import summary_html

ipywidgets = pytest.importorskip("ipywidgets")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def new_state(**kw):
    defaults = {
        "max_steps": 100,
        "num_epochs": 2,
        "title": "tiny-llama · LoRA r=8",
        "trainable_params": 12_000,
        "total_params": 1_000_000,
        "lr_scheduler_type": "linear",
        "warmup_steps": 10,
        "memory": {"rss_gb": 1.2},
    }
    return TrainState(**{**defaults, **kw})


def drive(bus, state, clock, steps, log_every=10, eval_every=50, step_time=0.05):
    """What the engine does: step events, log rows, eval rows, with the clock moving like training."""
    for _ in range(steps):
        state.step += 1
        state.epoch = state.step / 50
        state.samples_seen += 8
        state.tokens_seen += 8 * 64
        state.learning_rate = 2e-4 * (1 - state.step / state.max_steps)
        clock.now += step_time
        bus.emit("on_step_end", state)
        if state.step % log_every == 0:
            row = {
                "step": state.step,
                "epoch": state.epoch,
                "loss": 3.0 / (1 + state.step / 20),
                "learning_rate": state.learning_rate,
            }
            state.log_history.append(row)
            bus.emit("on_log", state, {k: v for k, v in row.items() if k != "step"})
        if eval_every and state.step % eval_every == 0:
            metrics = {
                "eval_loss": 2.5 - state.step / 100,
                "eval_accuracy": 0.5 + state.step / 300,
                "eval_f1": 0.4 + state.step / 300,
                "eval_runtime": 0.3,
            }
            state.log_history.append({"step": state.step, **metrics})
            bus.emit("on_evaluate", state, metrics)


def test_progress_chart_stats_and_metrics_follow_the_run():
    clock, state = FakeClock(), new_state()
    panel = LivePanel(auto_show=False, clock=clock, max_redraws_per_second=4)
    bus = EventBus([panel])
    bus.emit("on_status", state, "loading model")
    assert "loading model" in panel.status.value
    state.status = "training"
    bus.emit("on_train_begin", state)
    assert panel.progress.value == 0 and panel.progress.max == 100
    assert "tiny-llama" in panel.header.value and "12.0k trainable (1.2%)" in panel.header.value

    drive(bus, state, clock, 30)
    assert 25 <= panel.progress.value <= 30  # throttled: at most 0.25 s behind
    clock.now += 1
    bus.emit("on_step_end", state)
    assert panel.progress.value == 30
    assert "30/100 steps" in panel.progress_label.value
    assert len(panel.chart.value.split("points=")[1].split()) >= 3  # the raw polyline has the 3 logged losses
    assert "eval" not in panel.metrics.value  # no evaluation yet: no table
    assert panel.metrics.value == ""
    assert "1.2 GB RSS" in panel.stats.value and "samples/s" in panel.stats.value and "tokens/s" in panel.stats.value

    drive(bus, state, clock, 70)
    assert panel.progress.value == 100  # the evaluation at step 100 forced a redraw
    ET.fromstring(panel.chart.value)
    assert panel.chart.value.count('class="eval-point"') == 2
    table = ET.fromstring(panel.metrics.value)
    rows = table.findall("tr")
    assert [r.findtext("td") for r in rows[1:]] == ["50", "100"]  # grows with each evaluation
    assert "F1" in panel.metrics.value and "runtime" not in panel.metrics.value
    assert "accuracy 0.833" in panel.stats.value and "(step 100)" in panel.stats.value
    assert bus.subscribers == [panel]  # no hook raised


def test_redraws_are_throttled_but_forced_after_eval_and_at_end():
    clock, state = FakeClock(), new_state(max_steps=1000)
    panel = LivePanel(auto_show=False, clock=clock, max_redraws_per_second=2)
    bus = EventBus([panel])
    bus.emit("on_train_begin", state)
    drive(bus, state, clock, 1000, log_every=10, eval_every=500, step_time=0.01)  # 10 s of training
    # ~2 per second for 10 s, plus the begin and the two evaluations; not one per step or per log.
    assert 20 <= panel.redraws <= 24
    state.stop_reason, state.status = "completed", "done"
    before = panel.redraws
    panel.on_train_end(state)
    assert panel.redraws == before + 1
    assert panel.progress.value == 1000 and panel.progress.bar_style == "success"


def test_a_long_run_keeps_the_live_chart_small():
    clock, state = FakeClock(), new_state(max_steps=5000)
    panel = LivePanel(auto_show=False, clock=clock)
    bus = EventBus([panel])
    bus.emit("on_train_begin", state)
    drive(bus, state, clock, 5000, log_every=1, eval_every=0, step_time=0.01)
    panel.on_train_end(state)
    root = ET.fromstring(panel.chart.value)
    (raw,) = [el for el in root.iter() if el.get("class") == "train-raw"]
    assert 100 <= len(raw.get("points").split()) <= 300
    # The chart is redrawn at most once a simulated second (plus begin and end), the progress up to 4 times.
    assert panel.redraws > 150


def test_stop_button_calls_stop_and_says_so():
    calls = []
    clock, state = FakeClock(), new_state()
    panel = LivePanel(stop=lambda: calls.append(state.step), auto_show=False, clock=clock)
    bus = EventBus([panel])
    state.status = "training"
    bus.emit("on_train_begin", state)
    drive(bus, state, clock, 12)
    assert not panel.stop_button.disabled
    panel.stop_button.click()
    assert calls == [12]
    assert STOPPING in panel.status.value
    assert panel.stop_button.disabled
    panel.stop_button.click()  # a second click does not stop twice
    assert calls == [12]
    drive(bus, state, clock, 1)
    assert STOPPING in panel.status.value  # later redraws keep saying so until the end
    state.stop_reason, state.status, state.checkpoint_dir = "stopped", "stopped", "out/checkpoint-13"
    panel.on_train_end(state)
    assert "stopped at step 13/100" in panel.status.value and "out/checkpoint-13" in panel.status.value
    assert panel.stop_button.description == "Stopped"


def test_without_stop_the_button_says_to_interrupt():
    panel = LivePanel(auto_show=False)
    assert panel.stop_button.disabled
    assert "Interrupt the kernel" in panel.stop_button.tooltip


def test_failure_shows_the_reason_in_red():
    state = new_state(status="failed", error="loss is NaN at step 7: lower learning_rate")
    panel = LivePanel(auto_show=False)
    panel.on_status(state, "failed")
    assert "#c62828" in panel.status.value and "lower learning_rate" in panel.status.value
    state.stop_reason = "failed"
    panel.on_train_end(state)
    assert "#c62828" in panel.status.value
    assert "failed at step 0/100: loss is NaN" in panel.summary
    assert panel.progress.bar_style == "danger"


@pytest.fixture
def shell():
    return InteractiveShell.instance()


def test_show_and_summary_in_a_shell(shell):
    clock, state = FakeClock(), new_state()
    panel = LivePanel(clock=clock, summary_extra={"export": "%peft_export run ./adapter"})
    bus = EventBus([panel])
    with capture_output() as captured:
        bus.emit("on_status", state, "loading model")  # first event shows the panel
        bus.emit("on_train_begin", state)
        drive(bus, state, clock, 100)
        state.stop_reason, state.status, state.output_dir = "completed", "done", "runs/tiny"
        bus.emit("on_train_end", state)
    outputs = captured.outputs
    assert "application/vnd.jupyter.widget-view+json" in outputs[0].data  # the panel, shown once
    assert outputs[0].data["application/vnd.jupyter.widget-view+json"]["model_id"] == panel.widget.model_id
    shown, final = outputs[0], outputs[-1]
    assert len(outputs) == 2
    # One copy of the result: the summary replaces the panel (an update of the panel's own display id).
    assert not shown.update and final.update and final.transient["display_id"] == shown.transient["display_id"]
    assert "application/vnd.jupyter.widget-view+json" not in final.data
    html = final.data["text/html"]
    assert html == panel.summary
    assert "runs/tiny" in html and "%peft_export run ./adapter" in html and "completed 100/100 steps" in html


def test_summary_html_holds_curve_metrics_and_location():
    state = new_state(
        step=100,
        stop_reason="completed",
        status="done",
        output_dir="runs/a&b",
        checkpoint_dir="runs/a&b/checkpoint-100",
    )
    rows = [{"step": s, "loss": 3.0 / (1 + s / 20), "learning_rate": 1e-4} for s in range(10, 101, 10)]
    rows += [
        {"step": 50, "eval_loss": 2.0, "eval_accuracy": 0.75},
        {"step": 100, "eval_loss": 1.5, "eval_accuracy": 0.875},
    ]
    html = summary_html(state, rows, extra={"export": "%peft_export r <dir>"})
    root = ET.fromstring(html)  # well-formed: every value is escaped
    (img,) = [el for el in root.iter("img")]
    svg = base64.b64decode(img.get("src").split("base64,")[1]).decode()
    chart = ET.fromstring(svg)
    lines = [el for el in chart.iter() if el.get("class") == "train-raw"]
    assert len(lines[0].get("points").split()) == 10
    assert len([el for el in chart.iter() if el.get("class") == "eval-point"]) == 2
    metrics = root.find(".//table[@class='peft-metrics']")
    assert [tr.findall("td")[2].text for tr in metrics.findall("tr")[1:]] == ["0.75", "0.875"]
    text = "".join(root.itertext())
    assert "runs/a&b/checkpoint-100" in text and "%peft_export r <dir>" in text
    assert "completed 100/100 steps" in text and "eval loss1.5 (best 1.5)" in text
    assert "12.0k trainable (1.2%)" in text


def test_summary_without_history_or_evaluation():
    state = new_state(stop_reason="interrupted", status="interrupted")
    html = summary_html(state, [])
    root = ET.fromstring(html)
    assert root.find(".//table[@class='peft-metrics']") is None
    assert "interrupted at step 0/100" in "".join(root.itertext())
    assert re.search(
        r"waiting for the first loss", base64.b64decode(root.find(".//img").get("src").split(",")[1]).decode()
    )


def test_summary_embeds_html_extras():
    from IPython.display import HTML

    from peft_magic.ui.chart import confusion_matrix_svg

    cm = confusion_matrix_svg([[3, 1], [0, 4]], ["no", "yes"])
    html = summary_html(new_state(stop_reason="completed"), [], extra={"confusion matrix": HTML(cm)})
    root = ET.fromstring(html)
    assert len([el for el in root.iter() if el.get("class") == "cm-cell"]) == 4
