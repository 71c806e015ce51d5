"""Checks of a config that need more than its own fields: the run's name as a folder name (and, in time, the
method registry's and the forgetting probe's cross-checks)."""

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
