"""Two runs at once: while one trains in the background, starting another is refused with a clear message."""

from __future__ import annotations

import threading

import pytest
from conftest import lm_rows
from IPython.core.error import UsageError

import peft_magic
from peft_magic import api, models, session
from peft_magic.errors import ConfigError


@pytest.fixture
def gate(monkeypatch):
    """Training blocks in its first forward pass until `gate.set()`: the background run is surely still running."""
    event, event.entered = threading.Event(), threading.Event()
    real = models.load_model

    def block(*_):
        event.entered.set()
        event.wait(60)

    def load_model(*a, **kw):
        model = real(*a, **kw)
        model.register_forward_pre_hook(block)
        return model

    monkeypatch.setattr(models, "load_model", load_model)
    yield event
    event.set()
    for run in list(session.BACKGROUND_RUNS):
        run.stop()
        run.wait(60)


def config(model, out):
    return {"model": model, "data": {"train": lm_rows(8)},
            "train": {"max_steps": 3, "per_device_train_batch_size": 4, "output_dir": str(out)}}  # fmt: skip


def test_a_second_run_is_refused_while_one_trains_in_the_background(tiny_llama, workdir, gate):
    cfg = config(tiny_llama, workdir / "a")
    first = peft_magic.train(cfg, display="none", background=True, name="first")
    assert gate.entered.wait(60) and first.running
    for background in (True, False):
        with pytest.raises(ConfigError, match="'first' is still training in the background.*stop.*wait"):
            peft_magic.train(cfg, display="none", background=background, name="second")
    with pytest.raises(ConfigError, match="still training"):
        first.export(workdir / "export")
    gate.set()
    first.wait(60)
    assert first.state.stop_reason == "completed" and not session.BACKGROUND_RUNS
    second = peft_magic.train(cfg, display="none", name="second")  # now it may start
    assert second.state.stop_reason == "completed"


def test_background_cells_refuse_a_second_run_and_keep_the_first(tiny_llama, shell, gate):
    shell.user_ns["rows"] = lm_rows(8)
    body = f"model: {tiny_llama}\ndata: {{train: $rows}}\ntrain: {{max_steps: 3, per_device_train_batch_size: 4}}\n"
    assert shell.run_cell(f"%%peft_train a --background\n{body}").error_in_exec is None
    first = shell.user_ns["a"]
    assert gate.entered.wait(60) and first.running  # blocked inside its first step
    result = shell.run_cell(f"%%peft_train b --background\n{body}")
    assert type(result.error_in_exec) is UsageError
    assert "'a' is still training in the background" in str(result.error_in_exec) and "b" not in shell.user_ns
    result = shell.run_cell(f"%%peft_train a\n{body}")
    assert type(result.error_in_exec) is UsageError and "'a' is still training" in str(result.error_in_exec)
    assert shell.user_ns["a"] is first and first.running
    shell.run_cell("a.stop()")
    gate.set()
    first.wait(60)
    assert first.state.stop_reason == "stopped" and first.model is not None
    assert first.state.checkpoint_dir is not None  # a stop keeps a checkpoint of the last completed step
