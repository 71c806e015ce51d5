"""`train.max_time`: a time budget that ends the run gracefully before the platform does (Colab, Kaggle).

    train: {max_time: 11h30m}     # also 90m, 45s, 1h, 1.5h, 2h15m30s

The budget is counted from the start of training in this process (a resumed run gets a fresh one, as a new
session does). After each optimizer step the loop asks `Deadline.due`: when one more step plus the final
checkpoint and evaluation (as long as the slowest ones measured so far) would cross the budget, the run stops
there, exactly as the Stop button stops it (a checkpoint, the usual result, `--resume` continues it exactly).
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager

from ..errors import ConfigError

_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(d|h|m|s)")
_FIX = "Fix: a duration with units, e.g. `train.max_time: 11h30m` (or 90m, 45s)."


def parse_duration(value, key="train.max_time") -> float | None:
    """``11h30m`` / ``90m`` / ``45s`` / ``1.5h`` -> seconds (None, '' and 0 / off: no budget).

    Raises:
        ConfigError: a bare number (seconds or minutes?) or anything else that is not a duration.
    """
    if value is None or value is False:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value == 0:
            return None
        raise ConfigError(f"{value!r} has no unit. {_FIX}", key=key)
    text = str(value).strip().lower().replace(" ", "")
    if text in ("", "0", "none", "null", "off", "no"):
        return None
    if re.fullmatch(r"\d+(\.\d+)?", text):
        raise ConfigError(f"'{value}' has no unit. {_FIX}", key=key)
    pos, total = 0, 0.0
    for m in _PART.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise ConfigError(f"'{value}' is not a duration. {_FIX}", key=key)
    if total <= 0:
        raise ConfigError(f"'{value}' is no time at all. {_FIX}", key=key)
    return total


def format_budget(seconds: float) -> str:
    """4500 -> ``1h15m``, 45 -> ``45s``: the budget as it would be written in the config."""
    seconds = round(seconds)
    out = ""
    for unit, size in _UNITS.items():
        n, seconds = divmod(seconds, size)
        if n:
            out += f"{n}{unit}"
    return out or "0s"


class Deadline:
    """When to stop so that the run ends, saved, before `budget` seconds have passed since `start`.

    Args:
        budget: Seconds (None: never due).
        start: ``time.time()`` when the budget began (the loop's start).
        clock: The clock (a fake one in tests).
    """

    def __init__(self, budget: float | None, start: float | None = None, clock=time.time):
        self.budget = budget
        self.clock = clock
        self.start = clock() if start is None else start
        self.first_step = None  # (time, step) of the first step this process took: steps timed from there
        self.slowest = {"eval": 0.0, "save": None}  # the longest evaluation and checkpoint so far

    @classmethod
    def from_config(cls, cfg, start=None) -> "Deadline":
        return cls(parse_duration(getattr(cfg.train, "max_time", None)), start)

    @property
    def active(self) -> bool:
        return self.budget is not None

    def step_time(self, step: int) -> float:
        """Mean wall time per optimizer step (evaluations and periodic saves included) since the first step."""
        if self.first_step is None:
            self.first_step = (self.clock(), step)
            return self.clock() - self.start  # the first step (with its warm-up) is all we know
        t0, s0 = self.first_step
        return (self.clock() - t0) / max(step - s0, 1)

    def due(self, step: int) -> bool:
        """After optimizer `step`: would the next step, then the final save and evaluation, cross the budget?

        The final save is reserved as long as the slowest one timed, or one step's time before any was.
        """
        if self.budget is None:
            return False
        per_step = self.step_time(step)
        save = per_step if self.slowest["save"] is None else self.slowest["save"]  # none timed yet: guess a step's
        return self.clock() - self.start + per_step + save + self.slowest["eval"] >= self.budget

    def left(self) -> float | None:
        """Seconds of budget left (None without one)."""
        return None if self.budget is None else max(self.budget - (self.clock() - self.start), 0.0)

    def note(self) -> str:
        return f"the time budget (train.max_time {format_budget(self.budget)}) would run out before another step"

    @contextmanager
    def timing(self, what: str):
        """Time an evaluation (``eval``) or a checkpoint (``save``): the stop keeps room for the longest."""
        t0 = self.clock()
        try:
            yield
        finally:
            self.slowest[what] = max(self.slowest[what] or 0.0, self.clock() - t0)
