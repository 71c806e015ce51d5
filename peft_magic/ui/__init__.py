"""How training shows itself: a live widget panel in notebooks, plain lines elsewhere.

Importing this package imports no ipywidgets (the panel module does, and is imported only when a panel is
made), so scripts and the CLI never pay for it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError, did_you_mean
from .terminal import TerminalPrinter

DISPLAY_MODES = ("auto", "panel", "terminal", "none")

__all__ = ["DISPLAY_MODES", "TerminalPrinter", "in_notebook", "make_display"]


def in_notebook() -> bool:
    """Whether code runs in a kernel with a rich front-end (Jupyter, VS Code, Colab, Kaggle), not a terminal."""
    if "google.colab" in sys.modules:
        return True
    ipython = sys.modules.get("IPython")
    if ipython is None:  # never imported: certainly not a kernel
        return False
    shell = ipython.get_ipython()
    # ZMQInteractiveShell is the kernel's shell (Colab's and Kaggle's subclass it); the terminal's is
    # TerminalInteractiveShell. Names, not isinstance, so ipykernel need not be imported to answer.
    return shell is not None and any(cls.__name__ == "ZMQInteractiveShell" for cls in type(shell).__mro__)


def make_display(stop: Callable[[], Any] | None = None, mode: str = "auto"):
    """The display subscriber for a run.

    Args:
        stop: What the panel's Stop button calls (e.g. ``run.stop``).
        mode: ``auto`` (panel in a notebook, terminal lines elsewhere), ``panel``, ``terminal`` or ``none``.

    Returns:
        A `LivePanel`, a `TerminalPrinter`, or None for ``mode="none"``.
    """
    if mode not in DISPLAY_MODES:
        raise ConfigError(
            f"unknown display mode {mode!r}; use one of {', '.join(DISPLAY_MODES)}.{did_you_mean(mode, DISPLAY_MODES)}",
            key="display",
        )
    if mode == "none":
        return None
    if mode == "panel" or (mode == "auto" and in_notebook()):
        from .panel import LivePanel

        return LivePanel(stop=stop)
    return TerminalPrinter()
