"""`%peft_ui`: a form over the config dataclasses that sets up, starts, stops and exports a run.

Every widget is generated from a dataclass field of `peft_magic.config.schema` (its type picks the widget, its
``metadata["help"]`` is the tooltip), and the method's parameters from what the chosen method accepts (peft's
config dataclass fields, or a selective method's ``params_help``). The form never holds a second idea of the
config: `Form.values` is the same mapping a ``%%peft_train`` cell body gives, `Form.config` is `parse_config` of it,
and "Copy as cell" writes ``Config.to_yaml(minimal=True)``, so the cell trains exactly what the form would.

Only ipywidgets' core widgets are used (no front-end extension), as for the live panel.
"""

from __future__ import annotations

import dataclasses
import threading
from html import escape

import ipywidgets as widgets

from ..config.parse import build_method, build_section, parse_config, raw_config
from ..config.schema import SECTIONS, Config, MethodConfig
from ..errors import ConfigError, TrainingFailed
from .form_fields import NO_FILE, STYLE, WIDTH, DataField, Field, ParamsField, field_default, grid, make_field
from .format import format_count, format_params

__all__ = ["Form"]

TABS = (("Model", "model"), ("Method", "method"), ("Data", "data"), ("Training", "train"), ("Export", None))
SECTION_TAB = {"model": "Model", "task": "Model", "method": "Method", "data": "Data", "train": "Training"}
ERROR_COLOR, WARN_COLOR, OK_COLOR = "#c62828", "#b26a00", "#2e7d32"


# ----------------------------------------------------------------------------- the form


class Form:
    """A widget form for one training run: every config field, Start / Stop / Export / Copy as cell.

    Args:
        config: Values to start from: a dict, YAML text or file, or a `Config` (e.g. an earlier run's).
        name: The run's name: Start stores the `Run` in the namespace under it, and the cell is ``%%peft_train NAME``.
        shell: The IPython shell (default: the running one); its ``user_ns`` is where data and runs live.
        namespace: Overrides ``shell.user_ns``.
        defaults: Values where `config` is silent, e.g. ``{"model": {...}}`` from ``%peft_model``.
        preflight_delay: Seconds after the last change before the pre-flight line is recomputed in a thread
            (it reads the model's config); None: only on the "Check" button or `update_preflight`.
    """

    def __init__(self, config=None, *, name: str = "run", shell=None, namespace=None, defaults=None,
                 preflight_delay: float | None = 1.0):  # fmt: skip
        if shell is None:
            from IPython import get_ipython

            shell = get_ipython()
        self.shell = shell
        self.namespace = namespace if namespace is not None else (shell.user_ns if shell is not None else {})
        self.run = None
        self.panel = None
        self.preflight_delay = preflight_delay
        self._quiet = False
        self._generation = 0
        self._timer: threading.Timer | None = None
        self.fields: dict[str, Field | DataField | ParamsField] = {}
        self._build(name)
        self._quiet = True
        try:
            self.set_config(config, defaults)
        finally:
            self._quiet = False
        self._changed()

    # ------------------------------------------------------------------ building
    def _build(self, name: str) -> None:
        self.tabs = widgets.Tab()
        pages = []
        # A config section added later gets a tab of its own, before Export.
        tabs = [*TABS[:-1], *((s.upper() if s in ("dpo", "orpo", "grpo") else s.title(), s)
                              for s in SECTIONS if s not in dict(TABS).values()), TABS[-1]]  # fmt: skip
        for title, section in tabs:
            pages.append(self._export_page() if section is None else self._section_page(section))
        self.tabs.children, self.tabs.titles = pages, tuple(t for t, _ in tabs)
        self.error = widgets.HTML()
        self.preflight_line = widgets.HTML()
        self.check_button = widgets.Button(description="Check fit", icon="tachometer", tooltip="Estimate the "
                                           "trainable parameters and peak memory now",
                                           layout=widgets.Layout(width="auto"))  # fmt: skip
        self.check_button.on_click(lambda _b: self.update_preflight())
        self.name_text = widgets.Text(value=name, description="run name", continuous_update=False,
                                      tooltip="The notebook variable that will hold the Run",
                                      style={"description_width": "70px"}, layout=widgets.Layout(width="220px"))  # fmt: skip
        self.name_text.observe(self._changed, "value")
        button = lambda text, icon, style, tip: widgets.Button(description=text, icon=icon, button_style=style,
                                                               tooltip=tip, layout=widgets.Layout(width="auto"))  # fmt: skip
        self.start_button = button("Start", "play", "success", "Train in the background with a live panel below")
        self.stop_button = button("Stop", "stop", "danger", "Stop after the current step; the work so far is kept")
        self.export_button = button("Export", "download", "", "Write the adapter to the Export tab's folder")
        self.copy_button = button("Copy as cell", "copy", "", "The %%peft_train cell that trains exactly this")
        self.stop_button.disabled = self.export_button.disabled = True
        self.start_button.on_click(lambda _b: self.start())
        self.stop_button.on_click(lambda _b: self.stop())
        self.export_button.on_click(lambda _b: self.export())
        self.copy_button.on_click(lambda _b: self.copy_as_cell())
        self.message = widgets.HTML()
        self.cell_area = widgets.Textarea(rows=12, layout=widgets.Layout(width="100%", display="none"),
                                          tooltip="Select all and copy; paste into a new cell")  # fmt: skip
        self.panel_box = widgets.VBox()
        buttons = widgets.HBox([self.name_text, self.start_button, self.stop_button, self.export_button,
                                self.copy_button], layout=widgets.Layout(align_items="center", margin="6px 0"))  # fmt: skip
        self.widget = widgets.VBox(
            [self.tabs, self.error, widgets.HBox([self.check_button, self.preflight_line],
                                                 layout=widgets.Layout(align_items="center")),
             buttons, self.message, self.cell_area, self.panel_box],
            layout=widgets.Layout(width="100%"),
        )  # fmt: skip

    def _section_page(self, section: str) -> widgets.Widget:
        cls = SECTIONS[section]
        rows = []
        if section == "model":  # the task is a top-level key, but it is decided with the model
            rows.append(self._add_field("model.name_or_path", cls))
            task = next(f for f in dataclasses.fields(Config) if f.name == "task")
            self.fields["task"] = make_field("task", task.type, task.default, task.metadata)
            self.fields["task"].widget.observe(self._changed, "value")
            rows.append(self.fields["task"].widget)
        if section == "method":
            return self._method_page()
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            if key in self.fields:
                continue
            if key == "data.train":
                self.fields[key] = DataField(key, f.metadata.get("help", ""), self.namespace)
                self.fields[key].variable.observe(self._data_changed, "value")
                self.fields[key].path.observe(self._changed, "value")
                rows.append(self.fields[key].widget)
                continue
            rows.append(self._add_field(key, cls))
        if section == "train":
            return grid(rows, columns=2)
        return widgets.VBox(rows)

    def _add_field(self, key: str, cls) -> widgets.Widget:
        name = key.split(".", 1)[1]
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        placeholder = {"data.eval": "e.g. 0.1 (a held-out fraction), $val_df, a file", "train.output_dir":
                       "peft_runs/<run name>", "model.name_or_path": "hub id, model folder or .gguf file"}.get(key, "")  # fmt: skip
        field = make_field(key, f.type, field_default(f), f.metadata, placeholder=placeholder)
        self.fields[key] = field
        field.widget.observe(self._changed, "value")
        return field.widget

    def _method_page(self) -> widgets.Widget:
        from ..methods import available

        f = next(f for f in dataclasses.fields(MethodConfig) if f.name == "name")
        names = sorted(available())
        self.fields["method.name"] = Field("method.name", "choice", f.default, f.metadata.get("help", ""), names)
        self.fields["method.name"].widget.observe(self._method_changed, "value")
        params = ParamsField("method.params")
        params.on_change = self._changed
        params.show(f.default)
        self.fields["method.params"] = params
        return widgets.VBox([self.fields["method.name"].widget, params.widget])

    def _export_page(self) -> widgets.Widget:
        self.export_dir = widgets.Text(description="folder", placeholder="./<run name>-adapter", style=STYLE,
                                       layout=widgets.Layout(width=WIDTH), continuous_update=False,
                                       tooltip="Where Export writes the adapter (or the merged model)")  # fmt: skip
        self.export_merge = widgets.Checkbox(description="merge", indent=True, style=STYLE,
                                             tooltip="Write a full model with the adapter merged in")  # fmt: skip
        self.export_overwrite = widgets.Checkbox(description="overwrite", indent=True, style=STYLE,
                                                 tooltip="Replace the folder if it already holds files")  # fmt: skip
        from ..gguf.quant import QUANTS

        self.export_gguf = widgets.Dropdown(description="GGUF", options=["none", *QUANTS], value="none", style=STYLE,
                                            tooltip="Also write the merged model as GGUF (llama.cpp, Ollama)")  # fmt: skip
        self.export_gguf_adapter = widgets.Checkbox(description="GGUF adapter", indent=True, style=STYLE,
                                                    tooltip="Also write the LoRA as a GGUF adapter (llama.cpp --lora)")  # fmt: skip
        note = widgets.HTML("<i>After a run (finished or stopped), press <b>Export</b> below.</i>")
        return widgets.VBox([self.export_dir, self.export_merge, self.export_overwrite, self.export_gguf,
                             self.export_gguf_adapter, note])  # fmt: skip

    # ------------------------------------------------------------------ values
    def method_fields(self, method: str | None = None) -> dict[str, Field]:
        """{parameter: Field} of a method (default: the chosen one); empty for free-YAML methods."""
        return self.fields["method.params"].fields(method or self.fields["method.name"].get())

    def shown_params(self) -> list[str]:
        """Names of the method parameters whose widgets are in the form now (those of the chosen method only;
        the less-used ones sit in a collapsed "more parameters" section)."""
        params, shown = self.fields["method.params"], []
        for fields in params.by_method.values():
            shown += [name for name, f in fields.items() if _contains(self.widget, f.widget)]
        return shown

    def values(self) -> dict:
        """The mapping a ``%%peft_train`` cell body would hold (before validation)."""
        raw: dict = {section: {} for section in SECTIONS}
        for key, field in self.fields.items():
            if key == "task":
                raw["task"] = field.get()
            elif key == "method.params":
                raw["method"].update(field.get())
            else:
                section, name = key.split(".", 1)
                raw[section][name] = field.get()
        return raw

    @property
    def config(self) -> Config:
        """`parse_config` of the form's values; raises `ConfigError` like the cell would."""
        return parse_config(self.values())

    @property
    def name(self) -> str:
        return self.name_text.value.strip()

    def set_config(self, config=None, defaults=None) -> None:
        """Fill the form from a dict, YAML text or file, or a `Config` (keys it does not give keep their values)."""
        raw = raw_config(config, defaults=defaults)
        unknown = set(raw) - {"task", *SECTIONS}
        if unknown:
            parse_config(raw)  # raises the cell's own "unknown key" error
        if "task" in raw:
            self.fields["task"].set(raw["task"])
        for section, cls in SECTIONS.items():
            value = raw.get(section)
            if value is None:
                continue
            if section == "method":
                method = build_method(value)
                self.fields["method.name"].set(method.name.strip().lower().replace("_", "-"))
                self.fields["method.params"].show(self.fields["method.name"].get())
                self.fields["method.params"].set(method.params)
                continue
            if section == "model" and isinstance(value, str):
                value = {"name_or_path": value}
            data = dict(value)
            # Data sources may be objects (a DataFrame given to `train()`): shown by their notebook name.
            sources = [f.name for f in dataclasses.fields(cls) if section == "data" and f.type == "Any"]
            objects = {k: data.pop(k) for k in sources if k in data}
            built = build_section(cls, data, section)
            given = {_canonical(section, k) for k in data}
            for f in dataclasses.fields(cls):
                if f.name in given:
                    self.fields[f"{section}.{f.name}"].set(getattr(built, f.name))
            for k, v in objects.items():
                self.fields[f"data.{k}"].set(
                    v if k == "train" or not _is_object(v) else _namespace_ref(v, self.namespace)
                )

    # ------------------------------------------------------------------ reactions
    def _method_changed(self, change) -> None:
        self.fields["method.params"].show(change["new"])
        self._changed()

    def _data_changed(self, _change=None) -> None:
        field = self.fields["data.train"]
        field.path.disabled = field.variable.value != NO_FILE
        self._changed()

    def _changed(self, _change=None) -> None:
        if self._quiet:
            return
        cfg = self.validate()
        if self.cell_area.layout.display != "none" and cfg is not None:
            self.cell_area.value = self._cell_text(cfg)
        if self.preflight_delay is not None:
            if cfg is not None:
                self._schedule_preflight()
            else:  # an estimate of a config that no longer holds must not show up later
                self._generation += 1
                self.preflight_line.value = ""

    def validate(self) -> Config | None:
        """Parse the form; shows the `ConfigError` under the form in red (and clears it once fixed)."""
        try:
            cfg = self.config
        except ConfigError as e:
            tab = SECTION_TAB.get(str(e.key or "").split(".", 1)[0].lstrip("-"))
            where = f' <span style="color:#666">({tab} tab)</span>' if tab else ""
            # A required field not filled in yet is a next step, not a mistake: grey, not red.
            color = (
                "#666"
                if e.key in ("model", "data.train") and str(e).split(": ", 1)[-1].startswith("no ")
                else ERROR_COLOR
            )
            self.error.value = f'<div style="color:{color}">{escape(str(e), quote=False)}{where}</div>'
            self.start_button.disabled = True
            return None
        self.error.value = ""
        self.start_button.disabled = False
        return cfg

    # ------------------------------------------------------------------ pre-flight
    def preflight(self) -> tuple[str, str]:
        """``(text, color)`` of the pre-flight line: trainable parameters and whether the peak memory fits.

        Reads only the model's config (the architecture is built on the meta device), so it is quick after the
        first call, but it imports transformers and peft.
        """
        try:
            cfg = self.config
        except ConfigError as e:
            return f"pre-flight: fix the form first ({e.key})", WARN_COLOR
        from ..devices import device_info
        from ..preflight import resolve_checkpointing

        try:
            info = device_info()
            choice = resolve_checkpointing(cfg, info)  # `gradient_checkpointing: auto` as the run would decide it
            estimate, fit = choice.estimate, choice.fit
        except ConfigError as e:
            return f"pre-flight: {e}", WARN_COLOR
        except Exception as e:  # noqa: BLE001 - e.g. a .gguf or remote-code model whose config cannot be built here
            return f"pre-flight unavailable: {type(e).__name__}: {e}"[:300], "#666"
        from ..methods import get_method

        if getattr(get_method(cfg.method.name), "is_peft", False):  # peft counted its adapter on the meta model
            total = estimate.params + estimate.trainable_params  # the adapter adds to the base, as in the panel
            params = format_params(estimate.trainable_params, total) or "0 trainable"
        else:  # which entries a selective method trains is decided on the loaded weights
            params = "trainable count known after loading"
        peak = estimate.summary().split(" (")[0]
        text = f"pre-flight: {params} · base {format_count(estimate.params)} params · {peak} · {fit.message}"
        if choice.auto and choice.on:
            text += " · gradient checkpointing on (auto: fits only with it)"
        return text, OK_COLOR if fit.fits else ERROR_COLOR

    def update_preflight(self) -> str:
        """Recompute the pre-flight line now (in this thread) and return its text."""
        self._generation += 1
        self.preflight_line.value = '<span style="color:#666">pre-flight: estimating…</span>'
        text, color = self.preflight()
        self.preflight_line.value = f'<span style="color:{color}">{escape(text)}</span>'
        return text

    def _schedule_preflight(self) -> None:
        # Debounced: typing in a field must not rebuild the meta model at every change; and never during a run,
        # whose CPU/GPU it would slow down.
        if self.run is not None and self.run.running:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._generation += 1
        generation = self._generation
        self.preflight_line.value = '<span style="color:#666">pre-flight: estimating…</span>'
        self._timer = threading.Timer(self.preflight_delay, self._preflight_later, args=(generation,))
        self._timer.daemon = True
        self._timer.start()

    def _preflight_later(self, generation: int) -> None:
        if generation != self._generation:
            return
        text, color = self.preflight()
        if generation == self._generation:  # nothing changed meanwhile
            self.preflight_line.value = f'<span style="color:{color}">{escape(text)}</span>'

    # ------------------------------------------------------------------ actions
    def cell_text(self) -> str:
        """The ``%%peft_train NAME`` cell that trains exactly this form's config; raises `ConfigError`."""
        return self._cell_text(self.config)

    def _cell_text(self, cfg: Config) -> str:
        return f"%%peft_train {self.name or 'run'}\n{cfg.to_yaml(minimal=True)}"

    def copy_as_cell(self) -> str | None:
        """Show the cell text under the buttons and, when the shell can (a cell is executing, or a terminal),
        put it in the next input cell. Returns the text, or None when the form has an error."""
        cfg = self.validate()
        if cfg is None:
            return None
        text = self._cell_text(cfg)
        self.cell_area.value = text
        self.cell_area.layout.display = None
        if _can_insert_cell(self.shell):
            self.shell.set_next_input(text)
            self._say("the cell is below the form: select it and copy, or run the new cell")
        else:
            self._say("the cell is below: select all (Ctrl-A) and copy it into a new cell")
        return text

    def start(self):
        """Start training in the background with the live panel under the form; returns the `Run` (or None and
        an inline message when the form or the data has a mistake)."""
        from .. import api
        from ..run import Run
        from .panel import LivePanel

        cfg = self.validate()
        if cfg is None:
            return None
        name = self.name
        if not name.isidentifier():
            return self._fail(f"'{name}' is not a valid variable name. Fix: e.g. my_run.")
        previous = self.namespace.get(name)
        if isinstance(previous, Run) and previous.running:
            return self._fail(f"'{name}' is still training. Fix: Stop it (or wait) first, or use another run name.")
        panel = LivePanel(stop=self._stop_run, auto_show=False,
                          summary_extra={"export": f"%peft_export {name} ./{name}-adapter"})  # fmt: skip
        summary = widgets.HTML()
        self.panel, self.run = panel, None
        self.panel_box.children = [panel.embed(summary), summary]  # on screen before anything loads
        if self._timer is not None:
            self._timer.cancel()
        self._say("")
        try:
            run = api.train(cfg, namespace=self.namespace, background=True, name=name, display=panel,
                            callbacks=[self], cell=self._cell_text(cfg),
                            replaces=previous if isinstance(previous, Run) else None)  # fmt: skip
        except (ConfigError, TrainingFailed) as e:
            panel.status.value = f'<span style="color:{ERROR_COLOR}">status: failed: {escape(str(e))}</span>'
            return self._fail(str(e))
        self.run = run
        self.namespace[name] = run
        magics = _peft_magics(self.shell)
        if magics is not None:
            magics.last_run_name = name  # so `%peft_export DIR` and `%peft_eval` find it
        self.stop_button.disabled, self.export_button.disabled = False, False
        self._say(f"training in the background as <code>{escape(name)}</code>: {escape(name)}.wait(), "
                  f"{escape(name)}.stop(), {escape(name)}.status")  # fmt: skip
        return run

    def stop(self) -> None:
        """Stop the run after its current step (like the panel's Stop button)."""
        if self.panel is not None and not self.panel.stop_button.disabled:
            self.panel.stop_button.click()  # the panel says "stopping…" and calls `_stop_run`
        else:
            self._stop_run()

    def on_train_end(self, state) -> None:
        """Subscribed to the run's events: once it ended there is nothing left to stop."""
        self.stop_button.disabled = True

    def _stop_run(self) -> None:
        if self.run is not None:
            self.run.stop()

    def export(self, folder: str | None = None):
        """Export the run's adapter (or merged model) to `folder` (default: the Export tab's, else
        ``./NAME-adapter``); returns the folder, or None with an inline message."""
        if self.run is None:
            return self._fail("no run to export yet. Fix: press Start first.")
        folder = folder or self.export_dir.value.strip() or f"./{self.run.name}-adapter"
        try:
            gguf = None if self.export_gguf.value == "none" else self.export_gguf.value
            path = self.run.export(folder, merge=self.export_merge.value, overwrite=self.export_overwrite.value,
                                   gguf=gguf, gguf_adapter=self.export_gguf_adapter.value, display="none")  # fmt: skip
        except ConfigError as e:
            return self._fail(str(e))
        what = "merged model" if self.export_merge.value else "adapter"
        self.error.value = ""
        ggufs = [n for n in self.run.last_export.files if n.endswith(".gguf")]
        also = f" (+ {escape(', '.join(ggufs))})" if ggufs else ""
        self._say(f"exported the {what} of <code>{escape(self.run.name)}</code> to <code>{escape(str(path))}</code>"
                  f"{also}{self.run.last_export.parity._repr_html_()}")  # fmt: skip
        return path

    def _fail(self, text: str) -> None:
        self.error.value = f'<div style="color:{ERROR_COLOR}">{escape(text, quote=False)}</div>'

    def _say(self, html: str) -> None:
        self.message.value = f'<span style="color:#444">{html}</span>' if html else ""

    # ------------------------------------------------------------------ display
    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def __repr__(self) -> str:
        return f"<peft_magic Form for run '{self.name}'>"


# ----------------------------------------------------------------------------- helpers


def _contains(root, target) -> bool:
    if root is target:
        return True
    return any(_contains(child, target) for child in getattr(root, "children", ()))


def _canonical(section: str, key: str) -> str:
    from ..config.schema import ALIASES

    return ALIASES.get(section, {}).get(key, key)


def _is_object(value) -> bool:
    return value is not None and not isinstance(value, (str, int, float, bool))


def _namespace_ref(value, namespace):
    name = next((k for k, v in namespace.items() if v is value and not k.startswith("_")), None)
    return f"${name}" if name else None


def _can_insert_cell(shell) -> bool:
    """`set_next_input` reaches the front-end only with the reply to an executing cell; from a button click (a
    comm message) the text would pop up after whichever cell runs next, so it is not used then."""
    if shell is None:
        return False
    header = getattr(shell, "parent_header", None)
    if header is None:
        return hasattr(shell, "set_next_input")  # a terminal or a plain InteractiveShell
    return (header.get("header") or {}).get("msg_type") == "execute_request"


def _peft_magics(shell):
    if shell is None or not hasattr(shell, "magics_manager"):
        return None
    return shell.magics_manager.registry.get("PeftMagics")
