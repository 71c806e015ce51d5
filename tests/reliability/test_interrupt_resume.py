"""Stop, Ctrl-C and a killed process mid-training lose nothing: the last completed step is saved, and resuming it
ends exactly where an uninterrupted run with the same seed ends (weights and loss curve)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import lm_rows

import peft_magic
from peft_magic import session
from peft_magic.run import Run

from .conftest import StopAt, lora_weights, losses, saved_adapter

MAX_STEPS = 8


def config(model, out, **train):
    """20 rows, batch 4, accumulation 2: 3 optimizer steps per epoch (the last one short), so 8 steps cross two
    epoch boundaries; dropout on, so the RNG state matters too."""
    settings = {"max_steps": MAX_STEPS, "learning_rate": 5e-3, "per_device_train_batch_size": 4,
                "gradient_accumulation_steps": 2, "logging_steps": 2, "eval_steps": 0, "seed": 3}  # fmt: skip
    return {
        "model": model,
        "method": {"name": "lora", "r": 4, "lora_dropout": 0.1},
        "data": {"train": lm_rows(20)},
        "train": {**settings, "output_dir": str(out), **train},
    }


@pytest.fixture(scope="module")
def reference(tiny_llama, tmp_path_factory):
    run = peft_magic.train(config(tiny_llama, tmp_path_factory.mktemp("reference")), display="none")
    assert run.state.stop_reason == "completed"
    return run


@pytest.fixture
def created(monkeypatch):
    """Every Run that `train` creates (a callback needs the run to call `.stop()` on it)."""
    runs = []

    class Recorded(Run):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            runs.append(self)

    monkeypatch.setattr(session, "Run", Recorded)
    return runs


def assert_same_as(reference, run):
    assert run.state.step == MAX_STEPS and run.state.stop_reason == "completed"
    ref_w, w = lora_weights(reference.model), lora_weights(run.model)
    assert ref_w.keys() == w.keys() and ref_w
    for k in ref_w:
        torch.testing.assert_close(w[k], ref_w[k], rtol=1e-5, atol=1e-6, msg=k)
    got, want = losses(run), losses(reference)
    assert [s for s, _ in got] == [s for s, _ in want] == [2, 4, 6, 8]
    for (_, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, rel=1e-5)
    assert run.state.learning_rate == pytest.approx(reference.state.learning_rate)


def test_stop_saves_the_last_step_and_resume_matches_an_uninterrupted_run(tiny_llama, workdir, reference, created):
    cfg = config(tiny_llama, workdir / "stopped")
    run = peft_magic.train(cfg, display="none", callbacks=[StopAt(5, lambda s: created[-1].stop())])
    assert run.state.stop_reason == "stopped" and run.state.step == 5
    ckpt = workdir / "stopped" / "checkpoint-5"
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pt", "trainer_state.json"} <= set(os.listdir(ckpt))  # fmt: skip
    meta = json.loads((ckpt / "trainer_state.json").read_text())
    assert meta["step"] == 5 and meta["pending"]["micro"] == 2  # step 5's loss is not logged yet (logging_steps 2)
    sched = torch.load(ckpt / "scheduler.pt", weights_only=False)
    assert sched["last_epoch"] == 5  # the scheduler position of the last completed step
    saved, live = saved_adapter(ckpt), lora_weights(run.model)  # nothing trained after the last completed step
    assert saved.keys() == live.keys() and all(torch.equal(saved[k], live[k]) for k in saved)
    resumed = peft_magic.train(cfg, display="none", resume=True)
    assert_same_as(reference, resumed)


def test_sigint_in_the_main_thread_stops_gracefully_and_run_resume_continues(tiny_llama, workdir, reference):
    run = peft_magic.train(config(tiny_llama, workdir / "interrupted"), display="none",
                           callbacks=[StopAt(4, lambda s: os.kill(os.getpid(), signal.SIGINT))])  # fmt: skip
    assert run.state.stop_reason == "interrupted" and run.state.step == 4
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler was put back
    assert os.path.isdir(workdir / "interrupted" / "checkpoint-4")
    same = run.resume(display="none")  # in place: same model, data and Run object
    assert same is run
    assert_same_as(reference, run)


def test_magic_resume_in_a_new_kernel_continues_from_the_checkpoint(tiny_llama, workdir, reference, created, shell):
    out = workdir / "cell-run"
    peft_magic.train(config(tiny_llama, out), display="none", callbacks=[StopAt(7, lambda s: created[-1].stop())])
    shell.user_ns["rows"] = lm_rows(20)
    body = config(tiny_llama, out)
    body["data"]["train"] = "$rows"
    import yaml

    result = shell.run_cell(f"%%peft_train run --resume\n{yaml.safe_dump(body)}")
    assert result.error_in_exec is None, result.error_in_exec
    assert_same_as(reference, shell.user_ns["run"])


def test_a_killed_process_resumes_from_the_latest_periodic_checkpoint(tiny_llama, workdir, reference):
    """The kernel dies (SIGKILL at step 5, e.g. Colab disconnects): step 4's checkpoint survives and resuming from
    it in another process ends where the uninterrupted run ends."""
    out = workdir / "killed"
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {os.path.dirname(os.path.dirname(__file__))!r})
        torch.set_num_threads(1)
        import peft_magic
        from reliability.test_interrupt_resume import config
        from reliability.conftest import StopAt
        peft_magic.train(config({tiny_llama!r}, {str(out)!r}, save_steps=2), display="none",
                         callbacks=[StopAt(5, lambda s: os.kill(os.getpid(), signal.SIGKILL))])
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-4"]
    resumed = peft_magic.train(config(tiny_llama, out, save_steps=2), display="none", resume=True)
    assert_same_as(reference, resumed)


def test_resume_explains_what_it_cannot_do(tiny_llama, workdir):
    from peft_magic.errors import ConfigError

    run = peft_magic.train(config(tiny_llama, workdir / "r", max_steps=1), display="none")
    import shutil

    shutil.rmtree(workdir / "r")
    with pytest.raises(ConfigError, match="no checkpoint to resume from"):
        run.resume(display="none")
    run.release()
    with pytest.raises(ConfigError, match="holds no model to continue.*--resume"):
        run.resume(display="none")


def test_adalora_resumes_its_rank_schedule(tiny_llama, workdir, created):
    """AdaLoRA re-allocates ranks from importance averages it accumulates step by step: a resumed run must get
    them (and the step count) back, or it prunes different ranks than the uninterrupted run."""

    def adalora(out):
        cfg = config(tiny_llama, out, max_steps=10)
        cfg["method"] = {"name": "adalora", "init_r": 6, "target_r": 2, "tinit": 2, "tfinal": 3, "deltaT": 1}
        return cfg

    reference = peft_magic.train(adalora(workdir / "ref"), display="none")
    stopped = peft_magic.train(adalora(workdir / "stop"), display="none",
                               callbacks=[StopAt(4, lambda s: created[-1].stop())])  # fmt: skip
    assert stopped.state.step == 4 and os.path.exists(workdir / "stop" / "checkpoint-4" / "method_state.pt")
    resumed = peft_magic.train(adalora(workdir / "stop"), display="none", resume=True)
    assert resumed.model._peft_magic_adalora["step"] == reference.model._peft_magic_adalora["step"] == 10
    ref_w, w = lora_weights(reference.model), lora_weights(resumed.model)
    assert ref_w.keys() == w.keys()
    for k in ref_w:  # lora_E carries the pruned ranks as zeros: the same ones in both
        torch.testing.assert_close(w[k], ref_w[k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_classifier_with_label_mixed_batches_resumes_on_the_same_batches(separable_bert, workdir, created):
    """Classifiers train on label-mixed length groups (`sampling.LabelMixedLengthSampler`); a run stopped
    mid-epoch and resumed sees the batches the uninterrupted run saw: same weights and loss curve."""
    from conftest import sentiment_rows

    rows = [dict(r, text=r["text"] + " really" * (i % 9)) for i, r in enumerate(sentiment_rows(40))]

    def cls_config(out):
        cfg = config(separable_bert, out)
        cfg.update(task="seq-cls", data={"train": rows})
        return cfg

    reference = peft_magic.train(cls_config(workdir / "whole"), display="none")
    assert "labels mixed" in reference.data.grouping
    cfg = cls_config(workdir / "stopped")
    run = peft_magic.train(cfg, display="none", callbacks=[StopAt(4, lambda s: created[-1].stop())])
    assert run.state.stop_reason == "stopped" and run.state.step == 4  # mid-epoch: 5 steps per epoch
    assert_same_as(reference, peft_magic.train(cfg, display="none", resume=True))
