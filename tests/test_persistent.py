"""Colab with Drive mounted and Kaggle: checkpoints go to the folder that survives the session when output_dir is
not set, and the panel and the terminal say where (faked platforms: an env variable and temporary folders)."""

from __future__ import annotations

import os

import pytest
from conftest import lm_rows

import peft_magic
from peft_magic.api import resolve_config
from peft_magic.events import TrainState
from peft_magic.training import persistent


@pytest.fixture
def platform(tmp_path, monkeypatch):
    """Neither Colab nor Kaggle until a test says so; Drive and /kaggle/working are temporary folders."""
    for k in persistent.COLAB_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.delitem(__import__("sys").modules, "google.colab", raising=False)
    drive, kaggle = tmp_path / "content" / "drive" / "MyDrive", tmp_path / "kaggle" / "working"
    monkeypatch.setattr(persistent, "DRIVE_ROOT", str(drive))
    monkeypatch.setattr(persistent, "KAGGLE_WORKING", str(kaggle))
    monkeypatch.chdir(tmp_path)
    return drive, kaggle


def cfg(model="m"):
    return resolve_config({"model": model, "data": {"train": "x.csv"}}, name="tuned")


def test_colab_with_drive_mounted_writes_to_drive(platform, monkeypatch):
    drive, _ = platform
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab-test")
    assert cfg().train.output_dir == os.path.join(".", "peft_runs", "tuned")
    assert "lost when the Colab session ends: mount Drive" in persistent.output_note(cfg().train.output_dir)
    drive.mkdir(parents=True)  # drive.mount('/content/drive')
    out = cfg().train.output_dir
    assert out == os.path.join(str(drive), "peft_runs", "tuned")
    assert "Google Drive: kept after the session ends" in persistent.output_note(out)
    given = resolve_config({"model": "m", "data": {"train": "x.csv"}, "train": {"output_dir": "here"}}, name="t")
    assert given.train.output_dir == "here"  # an explicit folder is the user's choice


def test_kaggle_writes_to_kaggle_working(platform):
    _, kaggle = platform
    assert cfg().train.output_dir == os.path.join(".", "peft_runs", "tuned") and persistent.output_note("x") is None
    kaggle.mkdir(parents=True)
    assert cfg().train.output_dir == os.path.join(str(kaggle), "peft_runs", "tuned")
    assert "/kaggle/working: kept" in persistent.output_note(cfg().train.output_dir)


def test_the_panel_and_the_terminal_say_where(platform, monkeypatch, tiny_llama, capsys):
    from peft_magic.ui.panel import LivePanel

    drive, _ = platform
    drive.mkdir(parents=True)
    monkeypatch.setenv("COLAB_GPU", "1")
    run = peft_magic.train({"model": tiny_llama, "method": {"name": "lora", "r": 4}, "data": {"train": lm_rows(8)},
                            "train": {"max_steps": 2}}, name="tuned", display="terminal")  # fmt: skip
    out = capsys.readouterr().out
    where = os.path.join(str(drive), "peft_runs", "tuned")
    assert f"checkpoints: {where} (Google Drive: kept after the session ends" in out
    assert os.path.isdir(os.path.join(where, "checkpoint-2"))
    panel = LivePanel(auto_show=False)
    panel._redraw(run.state, force=True)
    assert "checkpoints" in panel.stats.value and "Google Drive" in panel.stats.value
    panel._redraw(TrainState(), force=True)
    assert "checkpoints" not in panel.stats.value
