"""What the libraries print while a run loads and trains, kept out of the cell and the terminal's progress lines.

transformers, peft, accelerate, datasets, DeepSpeed and torch warn (``warnings.warn``), log (``logging``) and draw
progress bars (tqdm) on their own. The user did not cause those messages and cannot act on them, and in a notebook
they land as red boxes around the live panel. While a run is set up and trained, `routed` sends them to a list (the
run's ``details``, shown collapsed under the panel and the summary, kept for someone debugging) and hides the
libraries' progress bars. Warnings that peft_magic itself raises for the user (``peft_magic: ...``) and warnings
from the user's own code are shown as usual.

The hooks are process-wide while a run lasts (warnings and logging have no per-thread switch), so a cell running
next to a background run routes its library chatter to that run's details too; its own warnings still show.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading

LIBRARY_LOGGERS = ("transformers", "peft", "accelerate", "datasets", "huggingface_hub", "bitsandbytes", "trl",
                   "DeepSpeed", "deepspeed", "torch", "torchao")  # fmt: skip
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_LIBRARY_DIRS = tuple({os.path.join(p, "") for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)})
_lock = threading.Lock()
_depth = 0  # nested runs (a comparison's variants, a resume inside a cell) install the hooks once


class _Record(logging.Handler):
    def __init__(self, record: list):
        super().__init__(logging.DEBUG)
        self.record = record

    def emit(self, rec: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.record.append(f"{rec.levelname.lower()} ({rec.name}): {rec.getMessage()}")


def is_library_file(filename: str) -> bool:
    """A file of an installed library (not peft_magic's, not the user's notebook or script)."""
    path = os.path.abspath(filename or "")
    if path.startswith(os.path.join(_PACKAGE_DIR, "")):
        return False
    return "site-packages" in path or "dist-packages" in path or path.startswith(_LIBRARY_DIRS)


def for_the_user(message, category, filename: str) -> bool:
    """Whether a warning is one to show: peft_magic's own (they say what to do), or the user's code's. A
    deprecation that a library raises with its `stacklevel` pointing at peft_magic's call is the library's."""
    if str(message).startswith("peft_magic"):
        return True
    if os.path.abspath(filename or "").startswith(os.path.join(_PACKAGE_DIR, "")):
        return not issubclass(category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning))
    return not is_library_file(filename)


@contextlib.contextmanager
def routed(record: list):
    """Within the block: library warnings and log records go to `record` (one line each), library tqdm bars are
    not drawn. peft_magic's own warnings for the user and the user's warnings show as usual."""
    global _depth
    import warnings

    with _lock:
        _depth += 1
        outer = _depth == 1
    if not outer:
        try:
            yield record
        finally:
            with _lock:
                _depth -= 1
        return
    _configure_library_loggers()
    shown = warnings.showwarning
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    saved = [(lg.handlers[:], lg.propagate) for lg in loggers]
    handler = _Record(record)

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if for_the_user(message, category, filename):
            shown(message, category, filename, lineno, file, line)
        else:
            record.append(f"{category.__name__}: {message} ({os.path.basename(filename)}:{lineno})")

    warnings.showwarning = showwarning
    for lg in loggers:
        lg.handlers, lg.propagate = [handler], False
    restore_bars = _hide_library_bars()
    try:
        yield record
    finally:
        restore_bars()
        for lg, (handlers, propagate) in zip(loggers, saved):
            lg.handlers, lg.propagate = handlers, propagate
        if warnings.showwarning is showwarning:
            warnings.showwarning = shown
        with _lock:
            _depth -= 1


def _configure_library_loggers() -> None:
    """transformers and datasets add their own stderr handler the first time they log; have them do it now, so
    that the handlers swapped for the run's record are the ones they use."""
    for module in ("transformers.utils.logging", "datasets.utils.logging"):
        with contextlib.suppress(ImportError):
            __import__(module, fromlist=["get_logger"]).get_logger()


def _hide_library_bars():
    """tqdm bars created by library code are disabled (the environment variable TQDM_DISABLE is read once, when
    tqdm is imported, so it cannot do this); peft_magic's own bars (export progress) and the user's still draw."""
    try:
        from tqdm import std
    except ImportError:  # pragma: no cover
        return lambda: None
    original = std.tqdm.__init__

    def __init__(self, *args, **kwargs):
        if _called_from_library():
            kwargs["disable"] = True
        original(self, *args, **kwargs)

    std.tqdm.__init__ = __init__

    def restore():
        if std.tqdm.__init__ is __init__:
            std.tqdm.__init__ = original

    return restore


def _called_from_library() -> bool:
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__", "").startswith("tqdm"):
        frame = frame.f_back  # tqdm.auto / tqdm.notebook subclasses call the base __init__
    if frame is None:
        return False
    return is_library_file(frame.f_code.co_filename)  # peft_magic's own bars (export progress) still draw
