"""Planning a comparison: the variants of one base config (``compare:`` method specs x ``sweep:`` values), their
labels and output folders, and the check of every variant's config before the first one trains."""

from __future__ import annotations

import itertools
import os
import re

from ..errors import ConfigError

# sweep keys that are not config keys: `train_samples: [100, 1000, all]` is data.max_samples, with all = every row
SWEEP_ALIASES = {"train_samples": "data.max_samples"}


class Variant:
    """One configuration to train: its label, what differs from the base config, and the full raw config."""

    def __init__(self, label: str, changes: dict, raw: dict):
        self.label, self.changes, self.raw = label, changes, raw

    def __repr__(self) -> str:
        return f"Variant({self.label!r})"


# ---------------------------------------------------------------- planning


def plan_variants(config=None, methods=None, sweep=None, overrides=None, defaults=None, name="compare") -> list[Variant]:
    """The variants of a comparison, without training: methods x the sweep grid.

    Args:
        config: The base config (dict, YAML text or file, `Config`); may hold ``compare:`` and ``sweep:`` keys.
        methods: Method specs to compare (a name, or a mapping ``{name: lora, r: 16}``), after ``compare:``.
        sweep: ``{dotted key: [values]}``, merged over ``sweep:``; the grid is every combination.
        overrides: ``["train.max_steps=10"]`` or a dict, applied to the base config.
        defaults: Values used where the config is silent (e.g. the `%peft_model` base model).
        name: The comparison's name (default output folders ``peft_runs/NAME/NN-variant``).
    """
    from ..session import default_output_dir
    from ..config.parse import deepcopy_plain, raw_config, set_dotted

    raw = raw_config(config, overrides or (), defaults)
    methods = [*_as_list(raw.pop("compare", None), "compare"), *_as_list(methods, "methods")]
    grid = {**_as_sweep(raw.pop("sweep", None)), **_as_sweep(sweep)}
    for m in methods:
        if not isinstance(m, (str, dict)) or (isinstance(m, dict) and not m.get("name")):
            raise ConfigError(f"each entry must be a method name or a mapping with `name`, got {m!r}. "
                              "Fix: e.g. `compare: [lora, ia3, {name: lora, r: 16}]`.", key="compare")  # fmt: skip
    out_root = (raw.get("train") or {}).get("output_dir") or default_output_dir(name)
    variants = []
    for m in methods or [None]:
        for values in itertools.product(*grid.values()):
            changes = ({"method": m} if m is not None else {}) | dict(zip(grid, values))
            variant_raw = deepcopy_plain(raw)
            for key, value in changes.items():
                set_dotted(variant_raw, *_sweep_target(key, deepcopy_plain(value)))
            variants.append(Variant(_label(changes, grid), changes, variant_raw))
    _dedupe_labels(variants)
    for i, v in enumerate(variants, 1):
        if not (v.changes.keys() & {"train.output_dir"}):
            set_dotted(v.raw, "train.output_dir", os.path.join(out_root, f"{i:02d}-{_slug(v.label)}"))
    return variants


def plan_text(variants, name="compare") -> str:
    """What ``%%peft_compare --dry-run`` prints: one line per variant with what it changes."""
    lines = [f"{len(variants)} variant{'s' if len(variants) != 1 else ''} for '{name}', trained one after another:"]
    for i, v in enumerate(variants, 1):
        changes = ", ".join(f"{k}={_text(val) if not isinstance(val, dict) else _label({'method': val}, {})}"
                            for k, val in v.changes.items()) or "the base config"  # fmt: skip
        lines.append(f"  {i:02d}  {v.label:<40}  {changes}")
    return "\n".join(lines)


def _as_list(value, key) -> list:
    if value is None:
        return []
    if isinstance(value, (str, dict)):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ConfigError(f"expected a list of method specs, got {type(value).__name__}.", key=key)


def _as_sweep(value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError("expected a mapping of dotted keys to lists of values, e.g. "
                          "`sweep: {train.learning_rate: [1e-4, 3e-4], method.r: [8, 16]}`.", key="sweep")  # fmt: skip
    out = {}
    for key, values in value.items():
        if not isinstance(key, str) or ("." not in key and key not in SWEEP_ALIASES):
            raise ConfigError(f"'{key}' is not a dotted key. Fix: name the section too, e.g. train.learning_rate "
                              "(or train_samples for the training-set size).", key="sweep")  # fmt: skip
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"needs a non-empty list of values, got {values!r}. Fix: e.g. `{key}: [{values!r}]`.",
                              key=f"sweep.{key}")  # fmt: skip
        out[key] = list(values)
    return out


def _sweep_target(key: str, value) -> tuple:
    """(config key, value) a sweep entry sets: aliases resolved (``train_samples: all`` -> data.max_samples null)."""
    if key == "train_samples":
        return SWEEP_ALIASES[key], None if value is None or str(value).strip().lower() == "all" else value
    return key, value


def _label(changes: dict, grid: dict) -> str:
    parts = []
    method = changes.get("method")
    if isinstance(method, str):
        parts.append(method)
    elif isinstance(method, dict):
        extra = [f"{k}={_text(v)}" for k, v in method.items() if k != "name"]
        parts.append(" ".join([str(method["name"]), *extra]))
    lasts = [k.rsplit(".", 1)[-1] for k in grid]
    for key in grid:
        last = key.rsplit(".", 1)[-1]
        parts.append(f"{last if lasts.count(last) == 1 else key}={_text(changes[key])}")
    return " · ".join(parts) or "base"


def _text(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(_text, value))
    return str(value)


def _dedupe_labels(variants) -> None:
    seen: dict = {}
    for v in variants:
        seen[v.label] = seen.get(v.label, 0) + 1
        if seen[v.label] > 1:
            v.label = f"{v.label} #{seen[v.label]}"


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", label).strip("_")[:60] or "variant"


def check(variants, name="compare") -> list:
    """Resolve and validate every variant's config before anything trains; a mistake names its variant."""
    from ..session import resolve_config

    configs = []
    for v in variants:
        try:
            configs.append(resolve_config(v.raw, name=name))
        except ConfigError as e:
            text = str(e)
            message = text[len(e.key) + 2:] if e.key and text.startswith(f"{e.key}: ") else text
            raise ConfigError(f"in variant '{v.label}': {message}", key=e.key) from None
    return configs
