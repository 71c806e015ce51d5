"""Checks of a config that need more than its own fields (`schema` checks each field; these look across them or
ask the method registry): the method's parameters and its fit with the task, `train.max_time`, the forgetting
probe's source, and the run's name as a folder name. `parse.parse_config` runs `check_config` on every config."""

from __future__ import annotations

import os

from ..errors import ConfigError


def check_run_name(name: str) -> str:
    """A run name becomes a folder (peft_runs/NAME): refuse separators, '..' and empty names."""
    text = str(name)
    if not text.strip() or text in (".", "..") or any(sep in text for sep in ("/", "\\", os.sep, "\0")):
        raise ConfigError(f"'{text}' cannot be a run name: it would write outside peft_runs/. Fix: use a plain "
                          "name such as my_run.", key="name")  # fmt: skip
    return text


DEFAULT_FORGETTING = "default"  # `data.forgetting: default` (or true): the built-in general text


def check_config(cfg):
    """The cross-checks, after the schema's own (`Config.validate`); returns `cfg`."""
    from ..methods import get_method  # light: the registry imports peft only when a method is applied
    from ..training.deadline import parse_duration

    get_method(cfg.method.name).check_params(cfg.method.params)
    parse_duration(cfg.train.max_time)
    get_method(cfg.method.name).check_compatible(cfg)
    check_forgetting(cfg)
    return cfg


def check_forgetting(cfg) -> None:
    """Normalise ``data.forgetting`` (true -> ``default``, false -> off) and refuse tasks without an LM head."""
    src = cfg.data.forgetting
    if src is True:
        src = cfg.data.forgetting = DEFAULT_FORGETTING
    if src is False or src is None:
        cfg.data.forgetting = None
        return
    if isinstance(src, str) and not src.strip():
        raise ConfigError("is empty. Fix: `forgetting: default` (built-in general text), a file, $variable or hub "
                          "dataset, or remove the key.", key="data.forgetting")  # fmt: skip
    if cfg.task != "causal-lm":
        raise ConfigError(f"forgetting is measured as the language-model loss on general text, and a {cfg.task} "
                          "model has no language-model head to predict text with. Fix: remove `forgetting`, or "
                          "measure it on a causal-lm run of the same base.", key="data.forgetting")  # fmt: skip
