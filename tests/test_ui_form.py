"""The `%peft_ui` form (every config field, method fields, inline errors, the cell round trip, Start/Stop/Export on a
tiny model) and background cells (`%%peft_train NAME --background`) driven through a real InteractiveShell."""

from __future__ import annotations

import dataclasses
import os
import re
import time

import ipywidgets as widgets
import yaml
from conftest import lm_rows, sentiment_rows
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from IPython.utils.capture import capture_output

from peft_magic import api, session, ui
from peft_magic.config.parse import parse_config
from peft_magic.config.schema import SCHEDULERS, SECTIONS, Config
from peft_magic.methods import get_method
from peft_magic.ui.form import Form
from peft_magic.ui.form_fields import data_variables
from peft_magic.ui.format import format_params

WIDGET_OF_KIND = {"choice": widgets.Dropdown, "bool": widgets.Checkbox, "int": widgets.IntText,
                  "float": widgets.FloatText, "str": widgets.Text, "optstr": widgets.Text, "yaml": widgets.Text}  # fmt: skip



def form_for(model, shell=None, **values) -> Form:
    ns = shell.user_ns if shell is not None else {"rows": lm_rows(16)}
    ns.setdefault("rows", lm_rows(16))
    form = Form({"model": model, "data": {"train": "$rows"}, **values}, shell=shell, namespace=ns,
                preflight_delay=None)  # fmt: skip
    return form


def descendants(widget):
    yield widget
    for child in getattr(widget, "children", ()):
        yield from descendants(child)


def wait_for(predicate, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


# ----------------------------------------------------------------------------- fields


def test_every_config_field_has_a_widget_with_its_help_as_tooltip(tiny_llama):
    form = form_for(tiny_llama)
    in_form = {id(w) for w in descendants(form.widget)}
    keys = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)] + ["task"]
    assert sorted(form.fields) == sorted(keys)
    for key in keys:
        field = form.fields[key]
        assert id(field.widget) in in_form, key
        if key in ("data.train", "method.params"):
            continue
        cls = Config if key == "task" else SECTIONS[key.split(".")[0]]
        spec = next(f for f in dataclasses.fields(cls) if f.name == key.rsplit(".", 1)[-1])
        assert field.widget.tooltip == spec.metadata["help"], key
        assert isinstance(field.widget, WIDGET_OF_KIND[field.kind]), key
        if spec.metadata.get("choices"):
            assert tuple(field.widget.options) == tuple(spec.metadata["choices"]), key
    assert form.fields["train.gradient_checkpointing"].widget.options == ("auto", "true", "false")
    assert isinstance(form.fields["train.max_steps"].widget, widgets.IntText)
    assert isinstance(form.fields["train.learning_rate"].widget, widgets.FloatText)
    assert form.fields["train.lr_scheduler_type"].widget.options == SCHEDULERS
    # Sections are tabs in the order a person decides, each field under its own section's tab.
    assert form.tabs.titles == ("Model", "Method", "Data", "Training", "DPO", "ORPO", "GRPO", "Export")
    for index, section in enumerate(("model", "method", "data", "train")):
        page = {id(w) for w in descendants(form.tabs.children[index])}
        assert all(id(f.widget) in page for k, f in form.fields.items() if k.startswith(section + "."))
    assert id(form.fields["task"].widget) in {id(w) for w in descendants(form.tabs.children[0])}


def test_choosing_a_method_shows_only_its_own_fields(tiny_llama):
    form = form_for(tiny_llama)
    method = form.fields["method.name"].widget
    for name in ("lora", "ia3", "prompt-tuning", "bitfit", "sparse", "lora"):
        method.value = name
        spec = get_method(name)
        expected = (
            set(spec.accepted_params()) - {"auto_mapping", "peft_version"} | {"from"}
            if spec.is_peft
            else set(spec.params_help)
        )
        assert set(form.shown_params()) == expected, name
    assert "lora_alpha" in form.shown_params() and "feedforward_modules" not in form.shown_params()
    form.fields["method.name"].widget.value = "ia3"
    assert "feedforward_modules" in form.shown_params() and "lora_alpha" not in form.shown_params()
    # peft's own help is the tooltip; a method's defaults are what the widgets show first.
    form.fields["method.name"].widget.value = "dora"
    fields = form.method_fields()
    assert fields["use_dora"].widget.value is True and fields["r"].widget.value == get_method("dora").defaults["r"]
    assert (
        fields["lora_dropout"].widget.tooltip == get_method("lora").accepted_params()["lora_dropout"].metadata["help"]
    )
    assert form.config.method.params == {}  # nothing changed from the defaults: nothing written
    fields["r"].widget.value = 4
    assert form.config.method.params == {"r": 4}
    # Going back to lora keeps what was typed for dora apart.
    form.fields["method.name"].widget.value = "lora"
    assert form.config.method.params == {} and form.config.method.name == "lora"


def test_the_generic_peft_method_takes_its_parameters_as_yaml(tiny_llama):
    form = form_for(tiny_llama)
    form.fields["method.name"].widget.value = "peft"
    (area,) = [w for w in descendants(form.fields["method.params"].widget) if isinstance(w, widgets.Textarea)]
    assert "peft_type" in form.error.value  # the generic entry needs a peft_type
    area.value = "peft_type: LORA\nr: 2"
    assert form.error.value == ""
    assert form.config.method.params == {"peft_type": "LORA", "r": 2}


def test_bad_values_show_the_config_error_inline(tiny_llama):
    form = form_for(tiny_llama)
    assert form.error.value == "" and not form.start_button.disabled
    form.fields["train.max_steps"].widget.value = 0
    assert "train.max_steps: must be a positive number of steps" in form.error.value
    assert "#c62828" in form.error.value and "(Training tab)" in form.error.value
    assert form.start_button.disabled
    form.fields["train.max_steps"].widget.value = 5
    assert form.error.value == "" and not form.start_button.disabled
    form.method_fields()["r"].widget.value = 0
    assert "method.r: must be a positive whole number" in form.error.value
    form.method_fields()["r"].widget.value = 4
    form.method_fields()["target_modules"].widget.value = "[q_proj, v_proj"
    assert "method.target_modules: cannot read" in form.error.value
    form.method_fields()["target_modules"].widget.value = "[q_proj, v_proj]"
    assert form.error.value == "" and form.config.method.params == {"r": 4, "target_modules": ["q_proj", "v_proj"]}
    form.fields["data.eval"].widget.value = "1.5"
    assert "data.eval: a held-out fraction must be between 0 and 1" in form.error.value
    form.fields["data.eval"].widget.value = ""
    form.fields["method.name"].widget.value = "sparse"
    form.fields["train.weight_decay"].widget.value = 0.1  # a cross-field rule of the method
    assert "train.weight_decay" in form.error.value and "sparse" in form.error.value
    # A missing model is the next step to take, said in grey rather than red.
    form.fields["train.weight_decay"].widget.value = 0.0
    form.fields["model.name_or_path"].widget.value = ""
    assert "model: no base model given" in form.error.value and "#c62828" not in form.error.value


def test_data_can_be_a_notebook_variable_or_a_path(tiny_llama, sentiment):
    import datasets

    ns = {"df": sentiment, "ds": datasets.Dataset.from_list(lm_rows(4)), "rows": lm_rows(16), "n": 3, "words": ["a"],
          "_hidden": lm_rows(2)}  # fmt: skip
    assert [v for _, v in data_variables(ns)] == ["$df", "$ds", "$rows"]
    form = Form({"model": tiny_llama}, namespace=ns, preflight_delay=None)
    train = form.fields["data.train"]
    labels = {v: k for k, v in train.variable.options}
    assert "64 rows" in labels["$df"] and "list of 16 dicts" in labels["$rows"]
    train.variable.value = "$df"
    assert form.config.data.train == "$df" and train.path.disabled
    train.variable.value = ""
    train.path.value = "data/train.jsonl"
    assert form.config.data.train == "data/train.jsonl"
    ns["late"] = lm_rows(3)  # made after the form: listed once refreshed
    train.refresh_button.click()
    train.variable.value = "$late"
    assert form.config.data.train == "$late"


# ----------------------------------------------------------------------------- the cell round trip


def cell_body(text: str, name: str) -> str:
    head, body = text.split("\n", 1)
    assert head == f"%%peft_train {name}"
    return body


def test_the_cell_round_trips_to_the_same_config(tiny_llama, shell):
    form = form_for(tiny_llama, shell)
    f, m = form.fields, form.method_fields()
    f["task"].widget.value = "causal-lm"
    f["data.eval"].widget.value = "0.2"
    f["data.max_length"].widget.value = 64
    f["train.max_steps"].widget.value = 30
    f["train.learning_rate"].widget.value = 3e-3
    f["train.lr_scheduler_type"].widget.value = "cosine"
    f["train.report_to"].widget.value = "tensorboard"
    f["train.gradient_checkpointing"].widget.value = "true"
    m["r"].widget.value, m["lora_dropout"].widget.value = 4, 0.0
    m["target_modules"].widget.value = "[q_proj, v_proj]"
    form.name_text.value = "tuned"
    text = form.copy_as_cell()
    assert text == form.cell_area.value and form.cell_area.layout.display != "none"
    assert shell.rl_next_input == text  # a shell outside a kernel takes it as its next input
    cfg = parse_config(cell_body(text, "tuned"))
    assert cfg == form.config
    assert cfg.data.train == "$rows" and cfg.data.eval == 0.2 and cfg.train.report_to == ["tensorboard"]
    assert cfg.method.params == {"r": 4, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    # ...and the cell trains what the form shows: run it through the magic (dry run: no weights loaded).
    with capture_output() as out:
        shell.run_cell(text.replace("%%peft_train tuned", "%%peft_train tuned --dry-run"))
    assert "4 trainable" not in out.stdout and "lora r=4 on q_proj,v_proj" in out.stdout.replace("LoRA", "lora")
    # The form opened on that cell shows the same config again.
    assert Form(cell_body(text, "tuned"), shell=shell, preflight_delay=None).config == cfg


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=st.sampled_from(["lora", "dora", "ia3", "bitfit", "layers", "prompt-tuning"]),
    steps=st.integers(-1, 10_000).filter(lambda n: n != 0),
    lr=st.floats(1e-7, 1.0, allow_nan=False),
    eval_=st.one_of(st.none(), st.floats(0.01, 0.99), st.just("$rows")),
    scheduler=st.sampled_from(SCHEDULERS),
    r=st.integers(1, 64),
    packing=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_property(tiny_llama, method, steps, lr, eval_, scheduler, r, packing, seed):
    form = _shared_form(tiny_llama)
    f = form.fields
    f["method.name"].widget.value = method
    f["train.max_steps"].widget.value = steps
    f["train.learning_rate"].widget.value = lr
    f["data.eval"].widget.value = "" if eval_ is None else yaml.safe_dump(eval_).replace("\n...", "").strip()
    f["train.lr_scheduler_type"].widget.value = scheduler
    f["data.packing"].widget.value = packing
    f["train.seed"].widget.value = seed
    fields = form.method_fields()
    if "r" in fields:
        fields["r"].widget.value = r
    if "last_n" in fields:
        fields["last_n"].widget.value = str(r % 3 + 1)
    assert form.error.value == "", form.error.value
    assert parse_config(cell_body(form.cell_text(), "run")) == form.config


_FORMS: dict = {}


def _shared_form(model) -> Form:  # one form for every example: building one per example is the slow part
    if model not in _FORMS:
        _FORMS[model] = form_for(model)
    return _FORMS[model]


def test_a_form_opened_on_a_cell_or_a_run_config_shows_it(tiny_llama, sentiment):
    body = (f"model: {tiny_llama}\ntask: seq-cls\nmethod: {{name: lora, r: 2, lora_alpha: 4}}\n"
            "data: {train: $rows, eval: 0.25, max_length: 32}\ntrain: {lr: 0.01, steps: 7, batch_size: 4}\n")  # fmt: skip
    form = Form(body, namespace={"rows": sentiment_rows(8)}, preflight_delay=None)
    assert form.config == parse_config(body)
    assert form.fields["train.learning_rate"].widget.value == 0.01  # aliases land on their field
    assert form.method_fields()["lora_alpha"].widget.value == 4
    assert form.fields["data.train"].variable.value == "$rows"
    # A config given as an object (a run's), data given as the object itself: shown by its notebook name.
    cfg = parse_config({"model": tiny_llama, "task": "seq-cls", "data": {"train": sentiment}})
    form = Form(cfg, namespace={"mine": sentiment}, preflight_delay=None)
    assert form.config.data.train == "$mine"


# ----------------------------------------------------------------------------- pre-flight


def test_preflight_line_counts_what_peft_will_train(tiny_llama):
    from peft_magic.devices import device_info
    from peft_magic.preflight import check_fit, estimate_for_config

    form = form_for(tiny_llama)
    form.method_fields()["r"].widget.value = 4
    text = form.update_preflight()
    estimate = estimate_for_config(form.config)
    total = estimate.params + estimate.trainable_params
    assert text.startswith(f"pre-flight: {format_params(estimate.trainable_params, total)} · base ")
    free = re.compile(r"\(\d+(\.\d+)? GB free\)")  # free RAM moves between two readings (21 vs 22 GB)
    assert free.sub("(N GB free)", check_fit(estimate, device_info()).message) in free.sub("(N GB free)", text)
    assert "fits" in text and "#2e7d32" in form.preflight_line.value
    form.method_fields()["r"].widget.value = 8
    assert form.update_preflight() != text  # twice the rank, twice the adapter
    form.fields["method.name"].widget.value = "bitfit"  # chosen on the loaded weights: no guess is shown
    assert "trainable count known after loading" in form.update_preflight()
    form.fields["train.max_steps"].widget.value = 0
    assert "fix the form first (train.max_steps)" in form.update_preflight()


def test_preflight_is_debounced_into_a_thread(tiny_llama):
    form = Form({"model": tiny_llama, "data": {"train": "$rows"}}, namespace={"rows": lm_rows(4)},
                preflight_delay=0.3)  # fmt: skip
    assert wait_for(lambda: "trainable" in form.preflight_line.value)
    calls, real, before = [], form.preflight, form.preflight_line.value
    form.preflight = lambda: (calls.append(form.method_fields()["r"].widget.value), real())[1]
    for r in (2, 3, 4):  # a burst of changes within the delay: one estimate, for the last value
        form.method_fields()["r"].widget.value = r
    assert wait_for(lambda: form.preflight_line.value != before and "trainable" in form.preflight_line.value)
    time.sleep(0.5)  # room for a (wrong) second estimate to show up
    assert calls == [4]
    shown = form.preflight_line.value
    free = re.compile(r"\(\d+(\.\d+)? GB free\)")  # the machine's free memory may move between the two readings
    assert free.sub("", form.update_preflight()) in free.sub("", shown)  # the thread showed the estimate for r=4


# ----------------------------------------------------------------------------- Start / Stop / Export


def test_start_trains_in_the_background_and_stop_stops_it(tiny_llama, shell, workdir):
    form = form_for(tiny_llama, shell, method={"name": "lora", "r": 4},
                    train={"max_steps": 300, "logging_steps": 2, "learning_rate": 5e-3})  # fmt: skip
    form.name_text.value = "tuned"
    preflight = form.update_preflight()
    assert form.stop_button.disabled and form.export_button.disabled
    form.start_button.click()
    run = shell.user_ns["tuned"]
    assert form.run is run and form.error.value == ""
    assert form.panel is not None and form.panel.widget in form.panel_box.children  # the panel under the form
    assert not form.panel.stop_button.disabled  # the kernel is free: the panel's Stop works too
    assert wait_for(lambda: run.state.step >= 4)
    assert run.running and run.status == "training" and not form.stop_button.disabled
    assert "tuned.wait()" in form.message.value
    form.stop_button.click()
    assert "stopping after this step" in form.panel.status.value
    run.wait(60)
    assert run.state.stop_reason == "stopped" and 4 <= run.state.step < 300 and form.stop_button.disabled
    assert f"stopped at step {run.state.step}/300" in form.panel.status.value
    summary = form.panel_box.children[1]
    assert f"stopped at step {run.state.step}/300" in summary.value and "%peft_export tuned" in summary.value
    assert [r for r in run.history if "loss" in r]
    # The pre-flight counted exactly the parameters peft made trainable.
    assert preflight.startswith(f"pre-flight: {format_params(run.state.trainable_params, run.state.total_params)}")
    # The cell text was kept for the model card; Export writes it.
    form.export_dir.value = str(workdir / "adapter")
    form.export_button.click()
    assert os.path.isfile(workdir / "adapter" / "adapter_config.json")
    assert "exported the adapter of <code>tuned</code>" in form.message.value
    assert "%%peft_train tuned" in (workdir / "adapter" / "README.md").read_text()
    form.export_button.click()  # again: the folder is not empty now
    assert "overwrite" in form.error.value
    assert shell.peft.last_run_name == "tuned"


def test_start_with_a_data_mistake_says_so_and_keeps_the_previous_run(tiny_llama, shell):
    shell.user_ns["rows"] = [{"words": "no text column"}] * 4
    form = form_for(tiny_llama, shell, train={"max_steps": 2})
    shell.user_ns["run"] = previous = object()
    assert form.start() is None
    assert "text" in form.error.value and "#c62828" in form.error.value
    assert shell.user_ns["run"] is previous and form.run is None and not session.BACKGROUND_RUNS
    form.name_text.value = "not a name"
    assert form.start() is None and "not a valid variable name" in form.error.value


# ----------------------------------------------------------------------------- %peft_ui and background cells


def test_peft_ui_magic_shows_a_form_filled_from_peft_model_or_a_file(tiny_llama, shell, workdir, monkeypatch):
    made = []
    import peft_magic.ui.form as form_module

    original = form_module.Form

    def recording(*a, **kw):
        made.append(original(*a, **kw, preflight_delay=None))
        return made[-1]

    monkeypatch.setattr(form_module, "Form", recording)
    shell.run_cell(f"%peft_model {tiny_llama}")
    with capture_output() as out:
        result = shell.run_cell("%peft_ui tuned")
    assert result.error_in_exec is None
    (form,) = made
    assert out.outputs[0].data["application/vnd.jupyter.widget-view+json"]["model_id"] == form.widget.model_id
    assert form.fields["model.name_or_path"].widget.value == tiny_llama and form.name == "tuned"
    (workdir / "c.yaml").write_text("method: {name: ia3}\ntrain: {max_steps: 9}\n")
    with capture_output():
        shell.run_cell("%peft_ui other --config c.yaml")
    assert made[-1].fields["method.name"].get() == "ia3" and made[-1].fields["train.max_steps"].get() == 9
    result = shell.run_cell("%peft_ui --config missing.yaml")
    assert "missing.yaml' does not exist" in str(result.error_in_exec)


def test_background_cell_returns_at_once_and_is_steered_from_the_namespace(tiny_llama, shell, panels):
    shell.user_ns["rows"] = lm_rows(16)
    shell.run_cell("%config PeftMagics.display = 'panel'")
    body = f"model: {tiny_llama}\nmethod: {{name: lora, r: 4}}\ndata: {{train: $rows}}\ntrain: {{max_steps: 300, logging_steps: 2}}\n"
    with capture_output() as out:
        result = shell.run_cell(f"%%peft_train bg --background\n{body}")
        assert result.error_in_exec is None
        bg = shell.user_ns["bg"]
        assert bg.running and bg.state.step < 300  # the cell returned while training goes on
        (panel,) = panels
        # The panel was on screen before the thread started: shown by the setup's first status, in this cell.
        assert out.outputs[0].data["application/vnd.jupyter.widget-view+json"]["model_id"] == panel.widget.model_id
        assert not panel.stop_button.disabled and panel.stop_hint.value == ""
        assert wait_for(lambda: bg.state.step >= 3)
        assert shell.run_cell("bg.status").result == "training"
        shell.run_cell("bg.stop()")
        assert shell.run_cell("bg.wait()").error_in_exec is None
    assert not bg.running and bg.status == "stopped" and bg.state.stop_reason == "stopped"
    assert f"stopped at step {bg.state.step}/300" in panel.status.value


def test_background_cell_stop_button(tiny_llama, shell, panels):
    shell.user_ns["rows"] = lm_rows(16)
    shell.peft.display = "panel"
    body = f"model: {tiny_llama}\ndata: {{train: $rows}}\ntrain: {{max_steps: 300, logging_steps: 2}}\n"
    with capture_output():
        shell.run_cell(f"%%peft_train bg --background\n{body}")
        bg, (panel,) = shell.user_ns["bg"], panels
        assert wait_for(lambda: bg.state.step >= 2)
        panel.stop_button.click()
        bg.wait(60)
    assert bg.state.stop_reason == "stopped" and panel.stop_button.description == "Stopped"


def test_blocking_cell_panel_says_the_interrupt_button_is_the_stop(tiny_llama, shell, monkeypatch):
    seen = []  # (hint text, Stop disabled) at each step, read by the panel's own step hook
    original = ui.make_display

    def recording(*args, **kwargs):
        panel = original(*args, **kwargs)
        step_end = panel.on_step_end
        panel.on_step_end = lambda state: (seen.append((panel.stop_hint.value, panel.stop_button.disabled)),
                                           step_end(state))  # fmt: skip
        seen.append(panel)
        return panel

    monkeypatch.setattr(ui, "make_display", recording)
    shell.user_ns["rows"] = lm_rows(8)
    shell.peft.display = "panel"
    with capture_output():
        result = shell.run_cell(
            f"%%peft_train blocking\nmodel: {tiny_llama}\ndata: {{train: $rows}}\ntrain: {{max_steps: 2}}\n"
        )
    assert result.error_in_exec is None
    panel, steps = seen[0], seen[1:]
    assert panel.stop is None and len(steps) == 2  # a blocking cell: the widget's click could not arrive
    assert all("to stop: interrupt the kernel (■)" in hint and disabled for hint, disabled in steps)
    assert panel.stop_hint.value == ""  # gone once the run ended
    assert "Interrupt the kernel" in panel.stop_button.tooltip
