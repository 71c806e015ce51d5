"""From text to a `Config`: YAML (safe_load only), ``--set key=value`` overrides, defaults, and the coercion of
each value to its field's type; then the schema's own checks and the cross-checks (`config/checks.py`).

Parsing never evaluates anything: YAML is loaded with `yaml.safe_load`, and `$name` strings are looked up (not
evaluated) in the notebook's namespace when the data is loaded.
"""

from __future__ import annotations

import os
from dataclasses import fields

from ..errors import ConfigError, did_you_mean
from .checks import check_config
from .coerce import coerce
from .schema import ALIASES, QUANT_ALIASES, SECTIONS, Config, MethodConfig, checkpointing_choice


def parse_config(source=None, overrides=(), defaults: dict | None = None) -> Config:
    """Build and validate a `Config`.

    Args:
        source: A dict, a YAML string, a path to a YAML file, an existing `Config`, or None.
        overrides: ``"section.key=value"`` strings (the value is read as YAML) or a dict of them.
        defaults: Values used where the source says nothing, e.g. ``{"model": "org/name"}`` from `%peft_model`.

    Raises:
        ConfigError: naming the key and the fix, for any mistake.
    """
    return build_config(raw_config(source, overrides, defaults))


def raw_config(source=None, overrides=(), defaults: dict | None = None) -> dict:
    """`parse_config` before validation: the merged mapping (validating a method imports peft; a notebook that
    forks worker processes must not, see `distributed/notebook.py`)."""
    if isinstance(source, Config):
        raw = source.to_dict()
        raw["data"].update({"train": source.data.train, "eval": source.data.eval, "forgetting": source.data.forgetting})
        if "grpo" in raw:
            raw["grpo"]["rewards"] = list(source.grpo.rewards)  # functions, not their placeholders
    else:
        raw = load_mapping(source)
    for key, value in (defaults or {}).items():
        raw.setdefault(key, value)
    for key, value in iter_overrides(overrides):
        set_dotted(raw, key, value)
    return raw


def load_mapping(source) -> dict:
    """YAML text, a YAML file path, a dict or None -> dict (safe YAML only)."""
    import yaml

    if source is None:
        return {}
    if isinstance(source, dict):
        _check_acyclic(source, "config")
        return deepcopy_plain(source)
    if isinstance(source, os.PathLike) or (isinstance(source, str) and "\n" not in source and source.strip().endswith((".yaml", ".yml", ".json"))):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ConfigError(f"config file '{path}' does not exist. Fix: check the path.", key="--config")
        with open(path, encoding="utf-8") as fh:
            source = fh.read()
    if not isinstance(source, str):
        raise ConfigError(f"a config must be a dict, YAML text or a file path, not {type(source).__name__}.")
    try:
        data = yaml.safe_load(source)
    except yaml.YAMLError as e:
        mark, ctx = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        if ctx is not None and (mark is None or ctx.line != mark.line):
            where += f" (in the value that starts at line {ctx.line + 1})"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(
            f"the YAML cannot be read{where}: {problem}. Fix: check indentation and that `key: value` pairs use "
            "a space after the colon.",
            key="yaml",
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"the cell must be a YAML mapping of keys (model, task, method, data, train), got {type(data).__name__}.",
            key="yaml",
        )
    return data


def build_config(raw: dict) -> Config:
    """dict -> validated Config; unknown keys and wrong types raise ConfigError with a 'did you mean'."""
    _check_acyclic(raw, "yaml")
    raw = dict(raw)
    if "eval" in raw:
        raw = fold_eval_section(raw)  # `eval: {forgetting: SOURCE}` is `data: {forgetting: SOURCE}`
    top = {f.name for f in fields(Config)}
    for key in raw:
        if key in ("compare", "sweep"):
            raise ConfigError("trains several variants: use a `%%peft_compare NAME` cell, or peft_magic.compare(config), "
                              "instead of %%peft_train / train().", key=key)  # fmt: skip
        if not isinstance(key, str) or key not in top:
            raise ConfigError(
                f"unknown key.{did_you_mean(key, top)} Valid top-level keys: {', '.join(sorted(top))}.", key=str(key)
            )
    cfg = Config()
    if "task" in raw:
        cfg.task = coerce(raw["task"], str, "task")
    for name, cls in SECTIONS.items():
        if name not in raw or raw[name] is None:
            continue
        value = raw[name]
        if name == "model" and isinstance(value, str):
            value = {"name_or_path": value}
        if name == "method":
            setattr(cfg, name, build_method(value))
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping of keys, got {type(value).__name__} ({value!r}).", key=name)
        setattr(cfg, name, build_section(cls, value, name))
    return check_config(cfg.validate())


EVAL_KEYS = {"forgetting": ("data", "forgetting"), "samples": ("train", "eval_samples"),
             "max_new_tokens": ("train", "eval_max_new_tokens")}  # fmt: skip


def fold_eval_section(raw: dict) -> dict:
    """A top-level ``eval:`` section, spelled where it is read: ``eval: {forgetting: SOURCE}`` -> ``data:
    {forgetting: SOURCE}``, ``eval: {samples: N, max_new_tokens: M}`` -> ``train: {eval_samples: N,
    eval_max_new_tokens: M}``."""
    raw = dict(raw)
    section = raw.pop("eval")
    if section is None:
        return raw
    if not isinstance(section, dict) or set(section) - set(EVAL_KEYS):
        unknown = sorted(map(str, set(section) - set(EVAL_KEYS))) if isinstance(section, dict) else []
        hint = did_you_mean(unknown[0], EVAL_KEYS) if unknown else ""
        raise ConfigError("a top-level `eval:` takes `forgetting: SOURCE` (general text to measure forgetting on), "
                          f"`samples: N` and `max_new_tokens: N` (greedy answers at each evaluation).{hint} Fix: "
                          "held-out task data goes under `data: {eval: ...}`.", key="eval")  # fmt: skip
    for key in ("samples", "max_new_tokens"):
        if key in section:
            raw = _fold(raw, "eval", key, *EVAL_KEYS[key], section[key])
    data = raw.get("data")
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of keys, got {type(data).__name__} ({data!r}).", key="data")
    if "forgetting" in section:
        if data.get("forgetting") is not None and data["forgetting"] is not section["forgetting"]:
            raise ConfigError("given twice, as `eval.forgetting` and `data.forgetting`. Fix: keep one.",
                              key="data.forgetting")  # fmt: skip
        data = {**data, "forgetting": section["forgetting"]}
    raw["data"] = data
    return raw


def _fold(raw: dict, section: str, key: str, into: str, field: str, value) -> dict:
    """``raw`` with ``raw[into][field] = value`` (given as ``section.key``), refused when given both ways."""
    target = raw.get(into)
    target = {} if target is None else target
    if not isinstance(target, dict):
        raise ConfigError(f"expected a mapping of keys, got {type(target).__name__} ({target!r}).", key=into)
    if target.get(field) is not None and target[field] != value:
        raise ConfigError(f"given twice, as `{section}.{key}` and `{into}.{field}`. Fix: keep one.",
                          key=f"{into}.{field}")  # fmt: skip
    return {**raw, into: {**target, field: value}}


def build_method(value) -> MethodConfig:
    if isinstance(value, str):
        return MethodConfig(name=value)
    if not isinstance(value, dict):
        raise ConfigError(f"expected a method name or a mapping, got {type(value).__name__}.", key="method")
    value = dict(value)
    name = value.pop("name", None)
    if "params" in value and isinstance(value["params"], dict):
        value.update(value.pop("params"))
    if not name:
        raise ConfigError("a method mapping needs `name`, e.g. `method: {name: lora, r: 8}`.", key="method.name")
    return MethodConfig(name=coerce(name, str, "method.name"), params=value)


def build_section(cls, values: dict, section: str):
    known = {f.name: f for f in fields(cls)}
    aliases = ALIASES.get(section, {})
    kwargs = {}
    for key, value in values.items():
        key = aliases.get(key, key)
        if key not in known:
            raise ConfigError(
                f"unknown key.{did_you_mean(key, list(known) + list(aliases))} Valid keys: {', '.join(known)}.",
                key=f"{section}.{key}",
            )
        if section == "model" and key == "quantization" and value is not None:
            value = QUANT_ALIASES.get(str(value), str(value))
        if section == "train" and key == "group_by_length" and isinstance(value, bool):
            value = str(value).lower()  # YAML true/false for the auto/true/false choice
        if section == "train" and key == "gradient_checkpointing":
            kwargs[key] = checkpointing_choice(value)  # auto, or true/false (yes/no/on/off) kept as a bool
            continue
        kwargs[key] = coerce(value, known[key].type, f"{section}.{key}")
    return cls(**kwargs)


def _check_acyclic(node, key, _parents=()) -> None:
    """Refuse values that contain themselves (a YAML anchor used inside itself: `a: &x [*x]`) or that nest
    absurdly deep: both would otherwise crash later with a RecursionError instead of a message."""
    if not isinstance(node, (dict, list, tuple)):
        return
    if id(node) in _parents:
        raise ConfigError("a value contains itself (a YAML alias *name used inside its own &name). Fix: write the "
                          "value out instead of the alias.", key=key)  # fmt: skip
    if len(_parents) > 50:
        raise ConfigError("values are nested more than 50 levels deep. Fix: check the brackets and indentation.",
                          key=key)  # fmt: skip
    for child in node.values() if isinstance(node, dict) else node:
        _check_acyclic(child, key, (*_parents, id(node)))


def iter_overrides(overrides):
    import yaml

    if isinstance(overrides, dict):
        yield from overrides.items()
        return
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"'{item}' is not key=value. Fix: e.g. --set train.max_steps=10.", key="--set")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        yield key.strip(), value


def set_dotted(raw: dict, key: str, value) -> None:
    parts = [p for p in key.split(".") if p]
    if not parts:
        raise ConfigError("empty key. Fix: e.g. --set train.max_steps=10.", key="--set")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if isinstance(child, str) and i == 0 and part == "model":
            child = {"name_or_path": child}
        elif isinstance(child, str) and i == 0 and part == "method":
            child = {"name": child}
        elif child is None:
            child = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"cannot set '{key}': '{part}' is not a mapping.", key=key)
        node[part] = child
        node = child
    node[parts[-1]] = value


def deepcopy_plain(d):
    """Copy nested dicts/lists, keeping leaf objects (DataFrames, Datasets) as they are."""
    if isinstance(d, dict):
        return {k: deepcopy_plain(v) for k, v in d.items()}
    if isinstance(d, list):
        return [deepcopy_plain(v) for v in d]
    return d


def requested_processes(config=None, overrides=(), defaults=None) -> int:
    """`train.num_processes` of a config (without validating the rest: that would import peft); 1 under a launcher.

    Args:
        config: What `train()` accepts (dict, YAML text or path, `Config`).
        overrides: ``--set`` style overrides.
        defaults: Config defaults (e.g. from `%peft_model`).
    """
    from ..distributed.ranks import launched

    if launched():
        return 1
    section = raw_config(config, overrides, defaults).get("train")
    value = section.get("num_processes", 1) if isinstance(section, dict) else 1
    n = coerce(value, int, "train.num_processes")
    if n < 1:
        raise ConfigError(f"must be 1 or more, got {n}.", key="train.num_processes")
    return n
