"""glibc's free heap pages given back at each block of a CPU run (training/heap_trim.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import lm_rows

import peft_magic
from peft_magic.training import heap_trim


def tiny_lm(layers=3):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return tf.LlamaForCausalLM(cfg)


def counting(monkeypatch):
    calls = []
    monkeypatch.setattr(heap_trim, "_malloc_trim", lambda: lambda pad: calls.append(pad) or 1)
    return calls


def test_trims_as_each_block_starts_its_forward_and_its_backward(monkeypatch):
    monkeypatch.setenv("PEFT_MAGIC_TRIM_EVERY", "1")
    calls = counting(monkeypatch)
    model = tiny_lm(layers=3)
    ids = torch.randint(1, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    release = heap_trim.trim_between_blocks(model, torch.device("cpu"))
    loss = model(input_ids=ids, labels=ids).loss
    assert len(calls) == 3  # one per block's forward
    loss.backward()
    assert len(calls) == 6  # and one per block's backward
    with torch.no_grad():
        model(input_ids=ids)
    assert len(calls) == 9  # an evaluation forward trims too, and leaves no backward hook behind
    release()
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == 9, "release() must remove every hook"


def test_nothing_on_other_devices_allocators_or_when_turned_off(monkeypatch):
    calls = counting(monkeypatch)
    model = tiny_lm(layers=2)
    heap_trim.trim_between_blocks(model, torch.device("meta"))
    model(input_ids=torch.tensor([[1, 2, 3]]))
    assert calls == []
    monkeypatch.undo()
    monkeypatch.setenv("PEFT_MAGIC_TRIM", "0")
    assert heap_trim._malloc_trim() is None
    monkeypatch.delenv("PEFT_MAGIC_TRIM")
    monkeypatch.setattr("peft_magic.allocator.active", lambda: "tcmalloc")
    assert heap_trim._malloc_trim() is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim is Linux's")
def test_malloc_trim_gives_back_the_holes_tensors_leave_in_glibcs_heap():
    """The mechanism itself, in a fresh process on glibc's malloc: 1 MB tensors served from the heap (the mmap
    threshold raised, as glibc raises it itself once big blocks are freed), every other one freed, the last kept
    (so the holes cannot be returned by shrinking the heap's top): resident memory stays until the trim."""
    script = textwrap.dedent("""
        import ctypes, os, torch
        from peft_magic.allocator import active
        from peft_magic.training.heap_trim import _malloc_trim
        if active() != "glibc":
            print("SKIP", active()); raise SystemExit
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD
        def rss():
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        kept = [torch.ones(1 << 18) for _ in range(400)]  # 400 x 1 MB
        del kept[::2]
        before = rss()
        _malloc_trim()(0)
        print("FREED", (before - rss()) / 2**20)
    """)
    env = {"PYTHONPATH": ".", "LD_PRELOAD": "", "PEFT_MAGIC_TRIM": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True,
                         cwd=str(__import__("pathlib").Path(peft_magic.__file__).parents[1])).stdout  # fmt: skip
    if out.startswith("SKIP"):
        pytest.skip(f"this Python runs {out.split()[1]}, not glibc's malloc")
    assert float(out.split("FREED")[1]) > 150, out  # ~200 MB of holes


def test_by_default_every_fourth_boundary_counting_forward_and_backward_together(monkeypatch):
    monkeypatch.delenv("PEFT_MAGIC_TRIM_EVERY", raising=False)
    calls = counting(monkeypatch)
    model = tiny_lm(layers=3)
    ids = torch.randint(1, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    heap_trim.trim_between_blocks(model, torch.device("cpu"))
    loss = model(input_ids=ids, labels=ids).loss
    assert calls == []  # 3 boundaries: none trimmed yet
    loss.backward()
    assert len(calls) == 1  # the 4th boundary (the last block's backward) trims; the 5th and 6th do not
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == 3  # boundaries 8 and 12


def test_a_cpu_run_trims_and_removes_its_hooks(tiny_llama, workdir, monkeypatch):
    monkeypatch.setenv("PEFT_MAGIC_TRIM_EVERY", "1")
    calls = counting(monkeypatch)
    config = {"model": {"name_or_path": tiny_llama}, "task": "causal-lm", "data": {"train": lm_rows(16)},
              "train": {"max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1,
                        "output_dir": str(workdir / "t")}}  # fmt: skip
    run = peft_magic.train(config, display="none")
    assert len(calls) >= 2 * 2 * 2  # 2 steps x 2 blocks x forward and backward
    blocks = run.model.get_base_model().model.layers
    assert all(not b._forward_pre_hooks and not b._forward_hooks for b in blocks)
    n = len(calls)
    config["train"]["kernels"] = "none"
    config["train"]["output_dir"] = str(workdir / "none")
    peft_magic.train(config, display="none")
    assert len(calls) == n, "train.kernels: none runs without peft_magic's CPU kernels, trimming included"


def test_the_preflight_counts_a_trimmed_heap_like_tcmallocs(monkeypatch):
    """A CPU run with the kernels on glibc trims between blocks, so the pre-flight expects tcmalloc's small excess;
    with trimming off (or kernels off) it expects glibc's held blocks."""
    import transformers as tf

    from peft_magic.preflight import estimate_memory

    cfg = tf.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    monkeypatch.setattr(sys, "platform", "linux")

    def slack(**kw):
        return estimate_memory(cfg, batch_size=4, seq_len=128, **kw).slack

    assert slack(kernels=True, allocator="glibc") == slack(kernels=True, allocator="tcmalloc")
    assert slack(kernels=False, allocator="glibc") > slack(kernels=False, allocator="tcmalloc")
    monkeypatch.setenv("PEFT_MAGIC_TRIM", "0")
    assert slack(kernels=True, allocator="glibc") > 2 * slack(kernels=True, allocator="tcmalloc")
