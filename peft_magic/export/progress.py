"""A progress bar for the long steps of an export (writing GGUF tensors, the parity prompts): the live panel's
bar (an ipywidgets `IntProgress` with a label) in a notebook, tqdm in a terminal, nothing with ``display="none"``.

Each step is a `stage(label, total)`; the writers call the bar as ``progress(done, total, what)``.
"""

from __future__ import annotations


class NoProgress:
    def stage(self, label: str, total: int = 0) -> NoProgress:
        return self

    def __call__(self, done: int, total: int, what: str = "") -> None:
        pass

    def close(self) -> None:
        pass


class TerminalProgress(NoProgress):
    """tqdm on stderr, one bar per stage."""

    def __init__(self):
        self._bar = None

    def stage(self, label: str, total: int = 0) -> TerminalProgress:
        from tqdm.auto import tqdm

        self.close()
        self._bar = tqdm(total=total or None, desc=label, unit="step", leave=True, dynamic_ncols=True)
        return self

    def __call__(self, done: int, total: int, what: str = "") -> None:
        if self._bar is None:
            return
        if self._bar.total != total:
            self._bar.total = total
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class WidgetProgress(NoProgress):
    """The panel's bar: one `IntProgress` and a label, displayed once and reused by every stage."""

    def __init__(self):
        import ipywidgets as widgets
        from IPython.display import display

        layout = widgets.Layout
        self.bar = widgets.IntProgress(value=0, min=0, max=1, layout=layout(flex="1 1 auto", width="auto"))
        self.label = widgets.HTML(layout=layout(flex="0 0 auto", margin="0 0 0 8px"))
        self.widget = widgets.HBox([self.bar, self.label], layout=layout(align_items="center", width="100%"))
        display(self.widget)
        self._stage = ""

    def stage(self, label: str, total: int = 0) -> WidgetProgress:
        self._stage = label
        self.bar.max, self.bar.value = max(1, total), 0
        self.label.value = _label(label, 0, total)
        return self

    def __call__(self, done: int, total: int, what: str = "") -> None:
        self.bar.max, self.bar.value = max(1, total), done
        self.label.value = _label(self._stage, done, total)

    def close(self) -> None:
        self.bar.bar_style = "success"


def _label(stage: str, done: int, total: int) -> str:
    from html import escape

    return f"{escape(stage)} · {done}/{total}" if total else escape(stage)


def make_progress(display: str = "auto"):
    """The bar for `display` (``auto``: widgets in a notebook, tqdm elsewhere; ``none``: no bar)."""
    if display == "none":
        return NoProgress()
    from ..ui import in_notebook

    if display == "panel" or (display == "auto" and in_notebook()):
        return WidgetProgress()
    return TerminalProgress()
