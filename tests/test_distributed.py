"""Several processes for one run: the config key, the kernel-side checks, the cluster script, and real 2-process
runs on CPU (gloo): under `accelerate launch` (via the exported launch.sh and the plain `--multi_gpu` command,
resume included) and through the notebook launcher from an IPython shell.

The 2-process runs start real processes, so they take tens of seconds on a loaded 2-core machine (marked slow).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import lm_rows

import peft_magic
from peft_magic.config.parse import parse_config, requested_processes
from peft_magic.errors import ConfigError
from peft_magic.distributed.cluster import export_script
from peft_magic.distributed.notebook import make_job
from peft_magic.run import Run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_ENV = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "ACCELERATE_DYNAMO_BACKEND")
TRAIN = {"max_steps": 8, "learning_rate": 5e-3, "logging_steps": 2, "per_device_train_batch_size": 4,
         "save_steps": 4, "save_total_limit": 3, "eval_steps": 0}  # fmt: skip


@pytest.fixture
def not_launched(monkeypatch):
    for key in LAUNCH_ENV:
        monkeypatch.delenv(key, raising=False)


def child_env(*first_on_path):
    """A launched process's environment: no launcher variables of this one, offline, and this checkout's peft_magic
    (after `first_on_path`) ahead of any installed copy."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([*first_on_path, ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env


# ---------------------------------------------------------------- config and kernel-side checks (fast)


def test_num_processes_is_a_checked_train_key():
    base = {"model": "org/model", "data": {"train": "rows.jsonl"}}
    assert parse_config(base).train.num_processes == 1
    assert parse_config({**base, "train": {"num_processes": 2}}).train.num_processes == 2
    assert "num_processes: 2" in parse_config(base, ["train.num_processes=2"]).to_yaml()
    with pytest.raises(ConfigError) as e:
        parse_config({**base, "train": {"num_processes": 0}})
    assert e.value.key == "train.num_processes"


def test_requested_processes_reads_overrides_and_defers_to_a_launcher(not_launched, monkeypatch):
    assert requested_processes({"model": "m"}) == 1
    assert requested_processes("train: {num_processes: 2}\n") == 2
    assert requested_processes({"train": {"num_processes": 2}}, ["train.num_processes=3"]) == 3
    with pytest.raises(ConfigError) as e:
        requested_processes({"train": {"num_processes": "two"}})
    assert e.value.key == "train.num_processes"
    monkeypatch.setenv("LOCAL_RANK", "0")  # inside `accelerate launch` / torchrun: the launcher decides
    assert requested_processes({"train": {"num_processes": 4}}) == 1


def test_the_job_carries_only_the_named_variables_and_pickles():
    import pandas as pd

    df = pd.DataFrame(lm_rows(8))
    ns = {"df": df, "lock": threading.Lock(), "gen": (r for r in lm_rows(2)), "unrelated": list(range(5))}
    job = make_job({"model": "m", "data": {"train": "$df"}}, overrides=["train.num_processes=2"], namespace=ns)
    assert set(job.namespace) == {"df"}  # the lock and the generator in the namespace are never sent
    back = pickle.loads(pickle.dumps(job))
    assert back.namespace["df"].equals(df) and back.config["train"]["num_processes"] == 2
    with pytest.raises(ConfigError) as e:
        make_job({"data": {"train": "$dff"}}, namespace=ns)
    assert e.value.key == "data.train" and "'df'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        make_job({"data": {"train": "$gen"}}, namespace=ns)
    assert e.value.key == "data" and "cannot be sent" in str(e.value)


def test_launch_is_refused_once_the_kernel_touched_cuda_or_bitsandbytes(tiny_llama, not_launched, monkeypatch):
    import torch

    cfg = {"model": tiny_llama, "data": {"train": lm_rows(8)}, "train": {"num_processes": 2}}
    with monkeypatch.context() as m:  # no GPU here: pretend the kernel initialised CUDA, which spoils a fork
        m.setattr(torch.cuda, "is_initialized", lambda: True)
        with pytest.raises(ConfigError, match="restart the kernel") as e:
            peft_magic.train(cfg, display="none")
    assert e.value.key == "train.num_processes"
    import bitsandbytes  # noqa: F401  (real: what peft imports as soon as a model was trained in the kernel)

    with pytest.raises(ConfigError, match="bitsandbytes.*restart the kernel"):
        peft_magic.train(cfg, display="none")


def test_peft_export_script_writes_a_job_that_reads_back(tiny_llama, tmp_path, monkeypatch):
    import pandas as pd
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file
    from IPython.core.interactiveshell import InteractiveShell

    from peft_magic.api import resolve_config

    df = pd.DataFrame(lm_rows(16))
    cfg = resolve_config({"model": tiny_llama, "data": {"train": "$df", "eval": 0.25}, "train": TRAIN}, name="job")
    shell = InteractiveShell.instance()
    shell.extension_manager.load_extension("peft_magic")
    shell.user_ns.update(df=df, job=Run("job", cfg))  # the config is all a script needs, trained or not
    out = tmp_path / "cluster"
    shell.run_line_magic("peft_export", f"job --script {out} --processes 2")

    assert sorted(os.listdir(out)) == ["accelerate_config.yaml", "config.yaml", "launch.sh", "train.jsonl"]
    with open(out / "train.jsonl") as fh:
        assert [json.loads(line) for line in fh] == lm_rows(16)
    monkeypatch.chdir(out)  # launch.sh runs from its own folder
    back = parse_config("config.yaml")
    assert (back.data.train, back.data.eval) == ("train.jsonl", 0.25)
    assert back.model.name_or_path == os.path.abspath(tiny_llama) and back.train.output_dir == "peft_runs/job"
    assert back.train.num_processes == 1 and back.train.max_steps == 8  # the launcher decides the processes
    script = (out / "launch.sh").read_text()
    assert os.access(out / "launch.sh", os.X_OK) and 'NUM_PROCESSES="${NUM_PROCESSES:-2}"' in script
    assert ('accelerate launch --config_file accelerate_config.yaml --num_processes "$NUM_PROCESSES" \\\n'
            "    -m peft_magic train config.yaml --name job --export adapter --overwrite") in script  # fmt: skip
    assert subprocess.run(["bash", "-n", "launch.sh"], check=False).returncode == 0
    assert load_config_from_file("accelerate_config.yaml").distributed_type == "MULTI_GPU"
    template = (out / "accelerate_config.yaml").read_text()
    assert "fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer" in template and "zero_stage: 2" in template
    assert yaml.safe_load(template)["use_cpu"] is False
    with pytest.raises(Exception, match="already holds files"):  # the magic turns the ConfigError into one line
        shell.run_line_magic("peft_export", f"job --script {out}")


# ---------------------------------------------------------------- real processes (slow)


@pytest.fixture(scope="module")
def cluster_job(tiny_llama, tmp_path_factory):
    """The exported launch.sh of a notebook run, run as is with NUM_PROCESSES=2: 2 gloo ranks x batch 4."""
    from peft_magic.api import resolve_config

    out = tmp_path_factory.mktemp("job")
    cfg = resolve_config({"model": tiny_llama, "data": {"train": "$rows"}, "method": {"name": "lora", "r": 4},
                          "train": TRAIN}, name="job")  # fmt: skip
    export_script(Run("job", cfg), str(out / "job"), namespace={"rows": lm_rows(64)}, num_processes=2)
    started = time.time()
    proc = subprocess.run(["bash", str(out / "job" / "launch.sh")], check=False, capture_output=True, text=True, timeout=500,
                          env=child_env())  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"dir": out / "job", "stdout": proc.stdout, "seconds": time.time() - started}


def adapter_tensors(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def loss_rows(history):
    return [(r["step"], r["loss"], r["learning_rate"]) for r in history if "loss" in r]


def assert_trains_like_one(history, single_history) -> tuple[float, float]:
    """The same logged steps and learning rates as a one-process run with the same global batch, losses within 2%
    (the same batches, summed in another order) and going down. Returns both final losses."""
    rows2, rows1 = loss_rows(history), loss_rows(single_history)
    assert [(s, lr) for s, _, lr in rows2] == [(s, lr) for s, _, lr in rows1]
    for (_, loss2, _), (_, loss1, _) in zip(rows2, rows1):
        assert loss2 == pytest.approx(loss1, rel=0.02)
    assert rows2[-1][1] < rows2[0][1]
    return rows2[-1][1], rows1[-1][1]


def assert_resumed_exactly(again, straight, adapter, straight_adapter) -> None:
    """A run resumed from step 4 logged (with the history before step 4 restored) and saved what the uninterrupted
    run did."""
    assert [s for s, _, _ in loss_rows(again)] == [2, 4, 6, 8]
    for (s2, loss2, _), (s1, loss1, _) in zip(loss_rows(again), loss_rows(straight)):
        assert s2 == s1 and loss2 == pytest.approx(loss1, rel=1e-4)
    a, b = adapter_tensors(adapter), adapter_tensors(straight_adapter)
    assert set(a) == set(b) and all(float((a[k] - b[k]).abs().max()) < 1e-5 for k in b)


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(cluster_job, tmp_path, monkeypatch):
    job = cluster_job["dir"]
    monkeypatch.chdir(job)
    started = time.time()
    single = peft_magic.train("config.yaml", overrides=["train.per_device_train_batch_size=8",
                              f"train.output_dir={tmp_path / 'single'}"], display="none")  # fmt: skip
    single_seconds = time.time() - started
    single.export(str(tmp_path / "single-adapter"))

    # the same files, tensor names and shapes as a one-process run
    assert sorted(os.listdir(job / "adapter")) == sorted(os.listdir(tmp_path / "single-adapter"))
    two, one = adapter_tensors(job / "adapter"), adapter_tensors(tmp_path / "single-adapter")
    assert {k: v.shape for k, v in two.items()} == {k: v.shape for k, v in one.items()}
    # rank 0 alone logged: one row per logging step, and the learning-rate schedule of one process
    with open(job / "peft_runs" / "job" / "checkpoint-8" / "trainer_state.json") as fh:
        history = json.load(fh)["log_history"]
    assert [(s, lr) for s, _, lr in loss_rows(history)] == [(2, 3.75e-3), (4, 2.5e-3), (6, 1.25e-3), (8, 0.0)]
    assert cluster_job["stdout"].count("step 8/8 ·") == 1  # printed once, by rank 0
    # the same global batches (accelerate deals rank 0 and 1 consecutive batches of one shuffled order)
    two, one = assert_trains_like_one(history, single.history)
    print(f"\nfinal loss: 2 processes x batch 4 = {two:.4f} ({cluster_job['seconds']:.0f} s with start-up), "
          f"1 process x batch 8 = {one:.4f} ({single_seconds:.1f} s in-process)")  # fmt: skip


@pytest.mark.slow
def test_resume_with_the_same_number_of_processes(cluster_job, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 -m peft_magic train ... --resume` from step 4 ends where the
    uninterrupted 2-process run did."""
    job = cluster_job["dir"]
    resumed = tmp_path / "resumed"
    shutil.copytree(job / "peft_runs" / "job" / "checkpoint-4", resumed / "checkpoint-4")
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "peft_magic", "train", "config.yaml",
           "--resume", "--set", f"train.output_dir={resumed}", "--export", str(tmp_path / "adapter")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=job, check=False, capture_output=True, text=True, timeout=500, env=child_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    with open(job / "peft_runs" / "job" / "checkpoint-8" / "trainer_state.json") as fh:
        straight = json.load(fh)["log_history"]
    with open(resumed / "checkpoint-8" / "trainer_state.json") as fh:
        again = json.load(fh)["log_history"]
    assert_resumed_exactly(again, straight, tmp_path / "adapter", job / "adapter")


NOTEBOOK = textwrap.dedent(
    """
    import contextlib, io, json, os, sys, time
    from IPython.core.interactiveshell import InteractiveShell
    import peft_magic

    model, out, rows = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    shell = InteractiveShell.instance()
    shell.extension_manager.load_extension("peft_magic")
    shell.run_line_magic("config", "PeftMagics.display = 'terminal'")
    shell.user_ns["rows"] = rows
    cell = (f"model: {model}\\ndata: {{train: $rows}}\\nmethod: {{name: lora, r: 4}}\\n"
            f"train: {{max_steps: 8, learning_rate: 0.005, logging_steps: 2, per_device_train_batch_size: 4, "
            f"output_dir: {out}/nb}}\\n")
    report = {}
    try:  # a mistake the kernel cannot see without importing peft: the workers report it, as one line
        shell.run_cell_magic("peft_train", "bad --processes 2", cell.replace("0.005", "fast"))
        report["bad"] = None
    except Exception as e:
        report["bad"] = f"{type(e).__name__}: {e}"
    report["bad_stored"] = "bad" in shell.user_ns
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        shell.run_cell_magic("peft_train", "nb --processes 2", cell)
    run = shell.user_ns["nb"]
    report["printed"] = printed.getvalue()
    report["history"] = run.history
    report["status"], report["adapter_dir"] = run.state.status, run.adapter_dir
    report["kernel_clean"] = [m for m in ("peft", "bitsandbytes") if m in sys.modules]
    report["cuda"] = __import__("torch").cuda.is_initialized()

    # the Stop button's path: run.stop() in the kernel stops both workers after the same step
    holder = {}
    class StopAtThree:
        def on_step_end(self, state):
            if state.step >= 3 and "run" in holder:
                holder["run"].stop()
    cfg = {"model": model, "data": {"train": "$rows"}, "method": {"name": "lora", "r": 4},
           "train": {"max_steps": 400, "learning_rate": 0.005, "logging_steps": 5, "per_device_train_batch_size": 4,
                     "num_processes": 2, "output_dir": out + "/stopped"}}
    holder["run"] = stopped = peft_magic.train(cfg, namespace={"rows": rows}, callbacks=[StopAtThree()],
                                               display="none", background=True)
    stopped.wait()
    ckpt = stopped.state.checkpoint_dir
    with open(os.path.join(ckpt, "trainer_state.json")) as fh:
        report["stopped"] = {"reason": stopped.state.stop_reason, "step": stopped.state.step,
                             "ckpt_step": json.load(fh)["step"], "running": stopped.running}

    # the result is usable in the kernel: the model is read from the final checkpoint on first use
    from safetensors.torch import load_file
    from peft.utils import get_peft_model_state_dict
    saved = load_file(os.path.join(run.adapter_dir, "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(run.model)
    report["model"] = type(run.model).__name__
    report["same_weights"] = sorted(saved) == sorted(loaded) and all(
        bool((saved[k] == loaded[k]).all()) for k in saved)
    report["generated"] = run.generate("the cat", max_new_tokens=4)
    try:  # now that peft (and bitsandbytes) are imported here, another launch is refused with the fix
        shell.run_cell_magic("peft_train", "again --processes 2", cell)
        report["refused"] = None
    except Exception as e:
        report["refused"] = f"{type(e).__name__}: {e}"
    print("REPORT " + json.dumps(report))
    """
)


@pytest.mark.slow
def test_notebook_processes_relay_rank_zero_and_hand_back_the_run(tiny_llama, tmp_path):
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", NOTEBOOK, tiny_llama, str(tmp_path), json.dumps(lm_rows(64))],
                          check=False, capture_output=True, text=True, timeout=500, env=child_env())  # fmt: skip
    lines = [x for x in proc.stdout.splitlines() if x.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(lines[-1][len("REPORT ") :])

    # live: rank 0's events were printed by the kernel's own display, once per log, as training went
    printed = [x for x in report["printed"].splitlines() if x.startswith("step ")]
    assert [x.split(" ·")[0] for x in printed] == ["step 2/8", "step 4/8", "step 6/8", "step 8/8"]
    losses = [r["loss"] for r in report["history"] if "loss" in r]
    assert [f"loss {loss:.3g}" in line for loss, line in zip(losses, printed)] == [True] * 4
    assert report["status"] == "done" and report["adapter_dir"].endswith("checkpoint-8")
    assert report["kernel_clean"] == [] and report["cuda"] is False  # the kernel stayed fork-safe while training
    stopped = report["stopped"]
    assert stopped["reason"] == "stopped" and 3 <= stopped["step"] < 400 and not stopped["running"]
    assert stopped["ckpt_step"] == stopped["step"]  # both ranks stopped after the same step and saved it
    assert report["model"] == "PeftModelForCausalLM" and report["same_weights"]
    assert isinstance(report["generated"], str)
    assert "restart the kernel" in report["refused"]
    assert report["bad"].startswith("UsageError: train.learning_rate: expected a") and "'fast'" in report["bad"]
    assert not report["bad_stored"]
    print(f"\nnotebook launcher, 2 processes: {time.time() - started:.0f} s for two launches (start-up included)")
