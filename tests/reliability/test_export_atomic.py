"""Export is all or nothing: a failure mid-write leaves the old folder intact or nothing at all, a non-empty
folder needs --overwrite, and a file path is refused."""

from __future__ import annotations

import errno
import os

import pytest
from conftest import lm_rows
from IPython.core.error import UsageError

import peft_magic
from peft_magic.export import folder as export
from peft_magic.errors import ConfigError


@pytest.fixture(scope="module")
def run(tiny_llama, tmp_path_factory):
    cfg = {"model": tiny_llama, "data": {"train": lm_rows(8)},
           "train": {"max_steps": 2, "output_dir": str(tmp_path_factory.mktemp("out"))}}  # fmt: skip
    return peft_magic.train(cfg, display="none")


def snapshot(folder) -> dict:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


@pytest.fixture
def disk_full(run, monkeypatch):
    """The tokenizer write (after the adapter is already in the temp folder) fails as on a full disk."""

    def save_pretrained(folder, *a, **kw):
        with open(os.path.join(folder, "tokenizer.json"), "w") as fh:
            fh.write('{"half": ')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run.tokenizer, "save_pretrained", save_pretrained)


def test_a_failure_mid_write_into_a_new_folder_leaves_nothing(run, workdir, disk_full):
    with pytest.raises(ConfigError, match="No space left on device.*nothing was written"):
        run.export(workdir / "adapter")
    assert os.listdir(workdir) == []  # no folder, no temporary sibling


def test_a_failure_mid_write_over_an_old_export_leaves_it_intact(run, workdir, monkeypatch):
    path = run.export(workdir / "adapter")
    before = snapshot(workdir / "adapter")
    assert "adapter_model.safetensors" in before

    def save_pretrained(folder, *a, **kw):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(run.tokenizer, "save_pretrained", save_pretrained)
    with pytest.raises(ConfigError, match="previous export there is intact"):
        run.export(path, overwrite=True)
    assert snapshot(workdir / "adapter") == before and os.listdir(workdir) == ["adapter"]


def test_an_interrupt_mid_write_leaves_the_old_export_and_no_temp_folder(run, workdir, monkeypatch):
    run.export(workdir / "adapter")
    before = snapshot(workdir / "adapter")

    def save_pretrained(folder, *a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(run.tokenizer, "save_pretrained", save_pretrained)
    with pytest.raises(KeyboardInterrupt):
        run.export(workdir / "adapter", overwrite=True)
    assert snapshot(workdir / "adapter") == before and os.listdir(workdir) == ["adapter"]


def test_a_failed_final_rename_puts_the_old_export_back(run, workdir, monkeypatch):
    run.export(workdir / "adapter")
    before = snapshot(workdir / "adapter")
    real, failed = os.replace, []

    def replace(src, dst):  # the new folder's rename into place fails (once), after the old one moved aside
        new = os.path.basename(str(src)).startswith(".peft_magic-export-") and not str(src).endswith(".old")
        if new and str(dst) == str(workdir / "adapter") and not failed:
            failed.append(src)
            raise OSError(errno.EIO, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(export.os, "replace", replace)
    with pytest.raises(ConfigError, match="Input/output error"):
        run.export(workdir / "adapter", overwrite=True)
    assert failed and snapshot(workdir / "adapter") == before and os.listdir(workdir) == ["adapter"]


def test_a_non_empty_folder_needs_overwrite(run, workdir):
    (workdir / "taken").mkdir()
    (workdir / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already holds files.*--overwrite"):
        run.export(workdir / "taken")
    assert snapshot(workdir / "taken") == {"notes.txt": b"mine"}
    run.export(workdir / "taken", overwrite=True)
    files = snapshot(workdir / "taken")
    assert "notes.txt" not in files and "adapter_config.json" in files  # replaced as a whole, nothing stale
    (workdir / "empty").mkdir()
    run.export(workdir / "empty")  # an empty folder is fine


@pytest.mark.parametrize("target", ["weights.bin", "weights.bin/sub"])
def test_export_into_a_file_path_is_refused(run, workdir, target):
    (workdir / "weights.bin").write_bytes(b"precious")
    with pytest.raises(ConfigError, match="key|file|folder"):
        run.export(workdir / target)
    assert (workdir / "weights.bin").read_bytes() == b"precious" and os.listdir(workdir) == ["weights.bin"]


def test_export_mistakes_in_a_cell_are_one_line(run, shell, workdir):
    shell.user_ns["run"] = run
    (workdir / "file.txt").write_text("x")
    (workdir / "full").mkdir()
    (workdir / "full" / "a").write_text("x")
    for line, expected in [
        ("run file.txt", "is a file"),
        ("run full", "--overwrite"),
        ("nope ./x", "not a training run"),
    ]:
        result = shell.run_cell(f"%peft_export {line}")
        assert type(result.error_in_exec) is UsageError and expected in str(result.error_in_exec), line
    assert shell.run_cell("%peft_export run full --overwrite").error_in_exec is None
