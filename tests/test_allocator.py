"""The memory allocator (allocator.py): which one a process runs, tcmalloc preloaded for the processes
peft_magic starts (the CLI starts itself over on it), the dry run's hint on glibc's malloc, and the opt-out."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from peft_magic import allocator


def test_active_reads_the_libraries_mapped_into_the_process(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert allocator.active(str(maps)) == "glibc"
    maps.write_text(maps.read_text() + "7f02-7f03 r-xp 0 08:01 2 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4\n")
    assert allocator.active(str(maps)) == "tcmalloc"
    assert allocator.active(str(tmp_path / "absent")) == "unknown"


def test_preload_env_adds_tcmalloc_once_and_only_when_wanted(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "/lib/libtcmalloc_minimal.so.4")
    monkeypatch.delenv("PEFT_MAGIC_MALLOC", raising=False)
    env = allocator.preload_env({"LD_PRELOAD": "/lib/other.so"})
    assert env["LD_PRELOAD"] == "/lib/libtcmalloc_minimal.so.4 /lib/other.so"
    assert allocator.preload_env(env) == env  # already there
    monkeypatch.setenv("PEFT_MAGIC_MALLOC", "system")
    assert "LD_PRELOAD" not in allocator.preload_env({})
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    monkeypatch.delenv("PEFT_MAGIC_MALLOC")
    assert "LD_PRELOAD" not in allocator.preload_env({})


def test_find_tcmalloc_looks_in_the_library_folders(tmp_path):
    assert allocator.find_tcmalloc(dirs=(str(tmp_path),)) is None
    (tmp_path / "libtcmalloc.so.4").write_bytes(b"")
    assert allocator.find_tcmalloc(dirs=(str(tmp_path),)) == str(tmp_path / "libtcmalloc.so.4")


PROBE = "from peft_magic.cli import _restart_on_tcmalloc; _restart_on_tcmalloc(); " \
        "from peft_magic.allocator import active; print(active())"  # fmt: skip


@pytest.mark.skipif(allocator.find_tcmalloc() is None, reason="tcmalloc is not installed (libtcmalloc-minimal4)")
def test_the_command_line_starts_itself_over_on_tcmalloc_unless_told_not_to():
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "PEFT_MAGIC_MALLOC")}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["tcmalloc"]
    env["PEFT_MAGIC_MALLOC"] = "system"
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["glibc"]


def test_a_cpu_dry_run_on_glibc_says_how_to_use_tcmalloc(tiny_llama, monkeypatch):
    from conftest import instruction_rows

    import peft_magic

    config = {"model": tiny_llama, "data": {"train": instruction_rows(8)}}
    monkeypatch.setattr(allocator, "active", lambda: "glibc")
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "/lib/libtcmalloc_minimal.so.4")
    plan = peft_magic.dry_run(config)
    assert "LD_PRELOAD=/lib/libtcmalloc_minimal.so.4" in plan.rows["allocator"]
    monkeypatch.setattr(allocator, "active", lambda: "tcmalloc")
    assert "allocator" not in peft_magic.dry_run(config).rows


def test_the_kernel_spec_starts_this_python_on_tcmalloc(tmp_path, monkeypatch):
    import json

    from peft_magic.errors import ConfigError

    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    with pytest.raises(ConfigError, match="apt install libtcmalloc-minimal4"):
        allocator.install_kernel(data_dir=str(tmp_path))
    monkeypatch.undo()
    if allocator.find_tcmalloc() is None:
        pytest.skip("tcmalloc is not installed (libtcmalloc-minimal4)")
    folder = allocator.install_kernel(data_dir=str(tmp_path))
    spec = json.loads((tmp_path / "kernels" / "peft-magic-tcmalloc" / "kernel.json").read_text())
    assert folder.endswith("peft-magic-tcmalloc") and spec["argv"][:3] == [sys.executable, "-m", "ipykernel_launcher"]
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "PEFT_MAGIC_MALLOC")}
    probe = "from peft_magic.allocator import active; print(active())"
    out = subprocess.run([sys.executable, "-c", probe], env={**env, **spec["env"]}, capture_output=True, text=True,
                         check=True)  # fmt: skip
    assert out.stdout.split() == ["tcmalloc"]
