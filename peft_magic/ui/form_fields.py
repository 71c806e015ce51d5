"""The form's fields: one widget per config key, generated from the dataclass field (its type picks the widget,
its ``metadata["help"]`` is the tooltip), the data source picker, and a method's parameters from what the chosen
method accepts. `ui/form.py` lays them out and holds the actions (Start, Stop, Export, Copy as cell)."""

from __future__ import annotations

import dataclasses
import re
from html import escape
from typing import Any

import ipywidgets as widgets

from ..errors import ConfigError

# A method's most-used parameters are shown first; the rest of peft's fields sit in a collapsed "more" section.
PRIMARY_PARAMS = ("r", "lora_alpha", "alpha", "lora_dropout", "target_modules", "bias", "init_r", "target_r",
                  "num_virtual_tokens", "adapter_len", "adapter_layers", "boft_block_size", "feedforward_modules",
                  "prompt_tuning_init", "prompt_tuning_init_text", "encoder_hidden_size", "use_dora", "use_rslora")  # fmt: skip
# Bookkeeping fields peft fills itself when saving; not settings anyone chooses.
HIDDEN_PARAMS = {"auto_mapping", "peft_version"}
FROM_HELP = "Continue training from an adapter folder exported by the same method (%peft_export)."
STYLE = {"description_width": "200px"}
WIDTH = "420px"
NO_FILE = ""  # the data dropdown's "use the path/hub id typed beside me" entry


# ----------------------------------------------------------------------------- fields


class Field:
    """One config value and the widget that edits it.

    Args:
        key: Where the value goes: ``"train.max_steps"``, ``"task"``, or a method parameter's name.
        kind: ``choice`` (Dropdown), ``bool`` (Checkbox), ``int`` (IntText), ``float`` (FloatText), ``str`` (Text),
            ``optstr`` (Text; empty means None) or ``yaml`` (Text read as YAML; empty means the default).
        default: The value shown before the user changes anything.
        help: The tooltip.
        choices: For ``choice``.
        placeholder: Grey text shown in an empty Text.
    """

    def __init__(self, key: str, kind: str, default: Any = None, help: str = "", choices=(), placeholder: str = ""):
        self.key, self.kind, self.default = key, kind, default
        name = key.rsplit(".", 1)[-1]
        common = {"description": name, "tooltip": help or name, "style": STYLE, "layout": widgets.Layout(width=WIDTH)}
        if kind == "choice":
            options = list(choices) if default in choices else [*choices, default]
            self.widget = widgets.Dropdown(options=options, value=default, **common)
        elif kind == "bool":
            self.widget = widgets.Checkbox(value=bool(default), indent=True, **common)
        elif kind == "int":
            self.widget = widgets.IntText(value=default, continuous_update=False, **common)
        elif kind == "float":
            self.widget = widgets.FloatText(value=default, continuous_update=False, **common)
        else:
            if kind == "yaml":
                value, placeholder = "", placeholder or placeholder_text(default)
            else:
                value = "" if default is None else str(default)
            self.widget = widgets.Text(value=value, placeholder=placeholder, continuous_update=False, **common)

    def get(self) -> Any:
        """The Python value (YAML read for ``yaml`` fields); raises `ConfigError` on unreadable YAML."""
        value = self.widget.value
        if self.kind == "optstr":
            return value.strip() or None
        if self.kind != "yaml":
            return value
        text = value.strip()
        if not text:
            return copy_value(self.default)
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"cannot read {text!r} ({problem}). Fix: write a YAML value, e.g. [a, b] for a "
                              "list, 0.1 for a number.", key=self.key) from None  # fmt: skip

    def set(self, value: Any) -> None:
        if self.kind == "choice":
            if isinstance(value, bool):  # an auto/true/false choice holds true and false as bools
                value = str(value).lower()
            if value not in self.widget.options:  # shown (and refused by validation) rather than lost
                self.widget.options = [*self.widget.options, value]
            self.widget.value = value
        elif self.kind in ("str", "optstr"):
            self.widget.value = "" if value is None else str(value)
        elif self.kind == "yaml":
            self.widget.value = "" if value == self.default or value is None else yaml_text(value)
        else:
            self.widget.value = value


class DataField:
    """``data.train``: a notebook variable (``$name``) from a dropdown, or a path / hub id typed beside it."""

    def __init__(self, key: str, help: str, namespace: dict):
        self.key, self.kind, self.default, self.namespace = key, "data", None, namespace
        tip = {"tooltip": help}
        self.variable = widgets.Dropdown(
            description=key.rsplit(".", 1)[-1], style=STYLE, layout=widgets.Layout(width=WIDTH), **tip
        )
        self.path = widgets.Text(placeholder="or a file path / hub dataset id", continuous_update=False,
                                 layout=widgets.Layout(width="300px"), **tip)  # fmt: skip
        self.refresh_button = widgets.Button(icon="refresh", tooltip="List the notebook's data variables again",
                                             layout=widgets.Layout(width="36px"))  # fmt: skip
        self.refresh_button.on_click(lambda _b: self.refresh())
        self.widget = widgets.HBox([self.variable, self.path, self.refresh_button])
        self.refresh()

    def refresh(self) -> None:
        """List the namespace's DataFrames, datasets and lists of dicts again (keeping the choice if still there)."""
        current = self.variable.value
        options = [("(the path or hub id beside)", NO_FILE)] + data_variables(self.namespace)
        self.variable.options = options
        self.variable.value = current if current in [v for _, v in options] else NO_FILE
        self.path.disabled = self.variable.value != NO_FILE

    def get(self):
        if self.variable.value != NO_FILE:
            return self.variable.value
        return self.path.value.strip() or None

    def set(self, value) -> None:
        if value is not None and not isinstance(value, str):  # an object given directly: find its notebook name
            name = next((k for k, v in self.namespace.items() if v is value and not k.startswith("_")), None)
            value = f"${name}" if name else None
        if isinstance(value, str) and value.strip().startswith("$"):
            self.refresh()
            if value.strip() not in [v for _, v in self.variable.options]:  # not (yet) defined: keep it as text
                self.variable.value, self.path.value = NO_FILE, value.strip()
            else:
                self.variable.value = value.strip()
        else:
            self.variable.value, self.path.value = NO_FILE, value or ""
        self.path.disabled = self.variable.value != NO_FILE


class ParamsField:
    """``method.params``: the chosen method's own fields (only those are shown), or free YAML for the generic one."""

    def __init__(self, key: str):
        self.key, self.kind, self.default = key, "params", {}
        self.widget = widgets.VBox()
        self.method: str | None = None
        self.by_method: dict[str, dict[str, Field]] = {}
        self.yaml_areas: dict[str, widgets.Textarea] = {}
        self.boxes: dict[str, widgets.Widget] = {}
        self.on_change = None

    def fields(self, method: str) -> dict[str, Field]:
        """{parameter: Field} of `method` (built on first use; empty for the free-form YAML methods)."""
        self._build(method)
        return self.by_method[method]

    def show(self, method: str) -> None:
        self._build(method)
        self.method = method
        self.widget.children = [self.boxes[method]]

    def get(self) -> dict:
        if self.method is None:
            return {}
        if self.method in self.yaml_areas:
            from ..config.parse import load_mapping

            text = self.yaml_areas[self.method].value
            return load_mapping(text) if text.strip() else {}
        return {k: f.get() for k, f in self.by_method[self.method].items() if differs(f.get(), f.default)}

    def set(self, params: dict) -> None:
        self._build(self.method)
        if self.method in self.yaml_areas:
            self.yaml_areas[self.method].value = yaml_text(params, flow=False) if params else ""
            return
        fields = self.by_method[self.method]
        for name, f in fields.items():
            f.set(params.get(name, f.default))
        unknown = [k for k in params if k not in fields]
        if unknown:  # e.g. `from:` or a misspelt name: refuse now, as the cell would
            get_method_checked(self.method, params)

    def _build(self, method: str) -> None:
        if method in self.boxes:
            return
        from ..methods import get_method

        spec = get_method(method)
        fields, note = method_fields(spec)
        self.by_method[method] = fields
        if fields is None:  # the generic `peft` entry: any peft_type and its parameters, as YAML
            area = widgets.Textarea(placeholder="peft_type: FOURIERFT\nn_frequency: 1000", rows=6,
                                    continuous_update=False, layout=widgets.Layout(width="600px"),
                                    tooltip="The method's parameters as YAML (peft's names), e.g. peft_type: ...")  # fmt: skip
            area.observe(self._changed, "value")
            self.yaml_areas[method], self.by_method[method] = area, {}
            self.boxes[method] = widgets.VBox([widgets.HTML(note), area])
            return
        for f in fields.values():
            f.widget.observe(self._changed, "value")
        few = not getattr(spec, "is_peft", False)  # selective methods have a handful of parameters: all in view
        primary = [f.widget for k, f in fields.items() if few or k in PRIMARY_PARAMS or k in spec.defaults]
        rest = [f.widget for k, f in fields.items() if f.widget not in primary]
        children = [widgets.HTML(note), grid(primary, columns=2)] if primary else [widgets.HTML(note)]
        if rest:
            more = widgets.Accordion(children=[grid(rest, columns=2)], titles=(f"more parameters ({len(rest)})",))
            more.selected_index = None
            children.append(more)
        self.boxes[method] = widgets.VBox(children)

    def _changed(self, _change=None) -> None:
        if self.on_change is not None:
            self.on_change()


def method_fields(spec) -> tuple[dict[str, Field] | None, str]:
    """The fields of a registered method and a note about them (None: parameters are free YAML).

    Args:
        spec: From `peft_magic.methods.get_method`.
    """
    summary = escape(getattr(spec, "summary", "") or "")
    if getattr(spec, "is_peft", False):
        if spec.config_class is None:
            return None, f"<i>{summary}</i>"
        from ..methods.peft_methods import TARGETS_ALL_LINEAR

        out = {}
        for name, f in spec.accepted_params().items():
            if name in HIDDEN_PARAMS:
                continue
            default = spec.defaults.get(name, field_default(f))
            placeholder = "all-linear" if name == "target_modules" and spec.name in TARGETS_ALL_LINEAR else ""
            out[name] = make_field(f"method.{name}", f.type, default, f.metadata, placeholder=placeholder)
        out["from"] = Field("method.from", "optstr", None, FROM_HELP, placeholder="a folder written by %peft_export")
        return out, f"<i>{summary}</i> Parameters are peft's <code>{spec.config_class}</code> fields."
    helps = getattr(spec, "params_help", {}) or {}
    out = {name: Field(f"method.{name}", "yaml", None, text, placeholder="default") for name, text in helps.items()}
    return out, f"<i>{summary}</i>"


def get_method_checked(method: str, params: dict) -> None:
    from ..methods import get_method

    get_method(method).check_params(dict(params))


def make_field(key, typ, default, metadata, placeholder="") -> Field:
    kind, choices = field_kind(typ, metadata)
    if kind in ("choice", "bool", "int", "float") and default is None:  # no "unset" state in those widgets
        kind = "yaml"
    if kind == "choice" and default not in choices:
        kind = "yaml"
    if kind in ("int", "float") and (isinstance(default, bool) or not isinstance(default, (int, float))):
        kind = "yaml"
    return Field(key, kind, default, metadata.get("help", ""), choices, placeholder)


def field_kind(typ, metadata) -> tuple[str, tuple]:
    """Which widget a dataclass field gets: ``(kind, choices)`` (see `Field`)."""
    if metadata.get("choices"):
        return "choice", tuple(metadata["choices"])
    text = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    text = text.replace("typing.", "")
    if text in ("bool", "int", "float", "str"):
        return text, ()
    if text == "Optional[str]":
        return "optstr", ()
    literal = re.fullmatch(r"Literal\[(.*)\]", text)
    if literal:
        items = [s.strip() for s in literal.group(1).split(",")]
        if all(len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"" for s in items):
            return "choice", tuple(s[1:-1] for s in items)
    return "yaml", ()


def field_default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def data_variables(namespace: dict) -> list[tuple[str, str]]:
    """``[(label, "$name")]`` for the DataFrames, datasets and lists of dicts in a notebook namespace."""
    out = []
    for name, value in list(namespace.items()):
        if name.startswith("_") or name in ("In", "Out"):
            continue
        kind = _data_kind(value)
        if kind:
            out.append((f"${name} · {kind}", f"${name}"))
    return sorted(out)


def _data_kind(value) -> str | None:
    module, cls = type(value).__module__.split(".")[0], type(value).__name__
    try:
        if module == "pandas" and cls == "DataFrame":
            return f"DataFrame, {len(value):,} rows"
        if module == "datasets" and cls == "Dataset":
            return f"Dataset, {len(value):,} rows"
        if module == "datasets" and cls == "DatasetDict":
            return f"DatasetDict ({', '.join(value)})"
    except TypeError:  # an unsized (streaming) dataset
        return cls
    if isinstance(value, list) and value and all(isinstance(r, dict) for r in value[:50]):
        return f"list of {len(value):,} dicts"
    return None




# ----------------------------------------------------------------------------- helpers


def yaml_text(value, flow: bool = True) -> str:
    """A value as the YAML a user would type in one line (``[q_proj, v_proj]``, ``0.1``, ``$df``)."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=flow, sort_keys=False, width=10**6).strip()
    return text[:-3].strip() if text.endswith("...") else text


def grid(children, columns: int = 1) -> widgets.Widget:
    if columns == 1:
        return widgets.VBox(list(children))
    # As many columns as fit the output's width (one on a narrow screen), at most `columns`.
    column = f"calc({WIDTH} + 8px)"  # a widget's own margin makes it a little wider than its width
    layout = widgets.Layout(grid_template_columns=f"repeat(auto-fill, {column})", grid_gap="2px 16px",
                            max_width=f"calc({columns} * {column} + {columns - 1} * 16px)")  # fmt: skip
    return widgets.GridBox(list(children), layout=layout)


def placeholder_text(default) -> str:
    if is_empty(default):
        return ""
    try:
        return yaml_text(default)
    except Exception:  # noqa: BLE001 - a peft config object (e.g. LoraRuntimeConfig): show what it is
        return f"{type(default).__name__} (peft's default)"


def copy_value(value):
    return list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else value


def differs(value, default) -> bool:
    return not (value == default and type(value) is type(default))


def is_empty(value) -> bool:
    return value is None or value == [] or value == {} or value == ""
