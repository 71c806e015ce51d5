"""Choosing the display: panel in a notebook kernel, lines elsewhere, nothing on request."""

import subprocess
import sys
import types
from pathlib import Path

import IPython
import pytest

from peft_magic.errors import ConfigError
from peft_magic.ui import in_notebook, make_display
from peft_magic.ui.terminal import TerminalPrinter


class ZMQInteractiveShell:  # the name is what in_notebook looks for
    pass


class ColabShell(ZMQInteractiveShell):
    pass


class TerminalInteractiveShell:
    pass


@pytest.mark.parametrize(
    "shell, expected",
    [(None, False), (TerminalInteractiveShell(), False), (ZMQInteractiveShell(), True), (ColabShell(), True)],
)
def test_in_notebook(monkeypatch, shell, expected):
    monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
    assert in_notebook() is expected


def test_colab_counts_as_a_notebook(monkeypatch):
    monkeypatch.setattr(IPython, "get_ipython", lambda: None)
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    assert in_notebook()


def test_make_display_modes(monkeypatch):
    from peft_magic.ui.panel import LivePanel

    monkeypatch.setattr(IPython, "get_ipython", lambda: None)
    assert make_display(mode="none") is None
    assert isinstance(make_display(), TerminalPrinter)
    assert isinstance(make_display(mode="terminal"), TerminalPrinter)
    calls = []
    panel = make_display(stop=lambda: calls.append(1), mode="panel")
    assert isinstance(panel, LivePanel)
    panel.stop_button.click()
    assert calls == [1]
    monkeypatch.setattr(IPython, "get_ipython", lambda: ZMQInteractiveShell())
    assert isinstance(make_display(), LivePanel)


def test_unknown_mode_names_the_key_and_the_fix():
    with pytest.raises(ConfigError, match="display: unknown display mode 'panle'.*Did you mean 'panel'") as err:
        make_display(mode="panle")
    assert err.value.key == "display"


def test_importing_the_ui_imports_no_widgets_and_no_torch():
    code = (
        "import sys, peft_magic.ui, peft_magic.ui.summary, peft_magic.ui.terminal, peft_magic.ui.chart\n"
        "heavy = [m for m in ('ipywidgets', 'torch', 'transformers', 'peft') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
