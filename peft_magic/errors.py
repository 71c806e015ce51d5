"""User-facing errors.

A `ConfigError` is a user mistake (a bad key, a missing column, a path that does not exist). Where IPython runs
(a notebook's kernel, an IPython shell, the magics) it subclasses IPython's `UsageError`, so it shows as one red
line with no traceback and `except UsageError` catches it; in scripts and the CLI it is an ordinary exception
whose message says what is wrong and how to fix it. Bugs keep their tracebacks.

IPython is not imported here for the error's sake: that costs ~0.35 s of a script's start (its terminal shell,
prompt_toolkit, jedi), and every process where IPython runs has imported it long before this module.
"""

from __future__ import annotations

import difflib
import functools
import sys


def _base() -> type:
    """IPython's `UsageError` when IPython is loaded in this process, else `Exception`."""
    if "IPython" in sys.modules:  # a kernel, an IPython shell, or code that imported it: the notebook setting
        try:
            from IPython.core.error import UsageError

            return UsageError
        except ImportError:  # pragma: no cover - a broken install: the plain exception still says what to fix
            pass
    return Exception


_Base = _base()


class ConfigError(_Base):
    """A mistake in the user's config, cell or data, with the key it concerns and the fix."""

    def __init__(self, message: str, key: str | None = None):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)

    def _render_traceback_(self):
        # IPython shows a full traceback for subclasses of UsageError; this hook makes it one line, even when
        # the error comes from peft_magic.train(...) called in a cell rather than from a magic.
        return [f"UsageError: {self}"]


class TrainingFailed(RuntimeError):
    """Training stopped on a problem in the run itself (NaN loss, out of memory). Work so far is kept."""

    def _render_traceback_(self):
        return [f"TrainingFailed: {self}"]


def did_you_mean(word: str, choices) -> str:
    """A ' Did you mean X?' suffix when `word` is close to one of `choices`, else ''."""
    match = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" Did you mean '{match[0]}'?" if match else ""


def usage_errors(magic):
    """Show a user mistake or a failed run as IPython does a `UsageError`: one line, no traceback.

    IPython prints a traceback for every exception whose type is not exactly `UsageError` (subclasses included),
    so `ConfigError` and `TrainingFailed` are re-raised as a plain one. The new error is raised outside the
    `except` block so it carries no chained traceback that would keep a failed run's tensors alive.
    """
    from IPython.core.error import UsageError

    @functools.wraps(magic)
    def wrapper(*args, **kw):
        try:
            return magic(*args, **kw)
        except ConfigError as e:
            message = str(e)
        except TrainingFailed as e:
            message = f"training failed: {e}"
        raise UsageError(message)

    return wrapper
