"""Sharded runs and failures agreed across ranks, with real processes on CPU (gloo).

- FSDP2 on 2 ranks through the exported launch.sh, with the FSDP block of its accelerate_config.yaml switched on:
  the adapter and optimizer state are gathered for rank 0, the export matches a one-process run, and a resume
  continues exactly. Accelerate enables FSDP only on GPUs, so these processes start with tests/fsdp_on_cpu on
  their path, which lifts that one gate (see its docstring); the sharding, training and gathering are real.
- A checkpoint that rank 0 cannot write fails on every rank with rank 0's message, promptly, in processes started
  without an elastic agent (as `srun` starts them), where a rank left waiting would otherwise hang.

The 2-process runs take tens of seconds on a loaded 2-core machine (marked slow).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import lm_rows
from test_distributed import ROOT, TRAIN, adapter_tensors, assert_resumed_exactly, assert_trains_like_one, child_env

import peft_magic
from peft_magic.errors import ConfigError
from peft_magic.distributed.cluster import export_script
from peft_magic.run import Run

FSDP_ON_CPU = os.path.join(ROOT, "tests", "fsdp_on_cpu")


# ---------------------------------------------------------------- without processes (fast)


def test_resume_refuses_a_checkpoint_of_another_layout():
    from accelerate import Accelerator

    from peft_magic.distributed import sharding
    from peft_magic.methods import get_method

    accelerator = Accelerator(cpu=True)  # one process: each rank would hold the whole model
    lora = get_method("lora")
    sharding.check(accelerator, lora, None, resume={"path": "ckpt", "per_process": []})  # written like this one
    with pytest.raises(ConfigError, match="written by an FSDP run, and this is a one-process or DDP run") as e:
        sharding.check(accelerator, lora, None, resume={"path": "ckpt", "sharded": "fsdp"})
    assert e.value.key == "--resume"


@pytest.mark.parametrize("name", ["adalora", "prompt-tuning", "bitfit", "full"])
def test_methods_that_cannot_run_sharded_are_refused_before_training(name, tiny_llama, monkeypatch):
    from accelerate import Accelerator

    from peft_magic.distributed import sharding
    from peft_magic.methods import get_method

    monkeypatch.setattr(sharding, "kind", lambda accelerator: "fsdp")  # as under FSDP on GPUs
    model = None
    if name in ("adalora", "prompt-tuning"):
        from peft import AdaLoraConfig, PromptTuningConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        config = AdaLoraConfig(total_step=10) if name == "adalora" else PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM")  # fmt: skip
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), config)
    with pytest.raises(ConfigError, match="DDP") as e:
        sharding.check(Accelerator(cpu=True), get_method(name), model)
    assert e.value.key == "method.name"
    sharding.check(Accelerator(cpu=True), get_method("lora"), None)  # LoRA is fine


def test_a_4bit_base_stores_its_blocks_in_the_compute_dtype_only_when_sharded(monkeypatch):
    import torch
    from transformers import BitsAndBytesConfig

    from peft_magic.distributed.sharding import quant_storage

    for key in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(key, raising=False)
    assert quant_storage(torch.bfloat16) == torch.uint8  # bitsandbytes' default: one GPU, DDP
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert quant_storage(torch.bfloat16) == torch.uint8  # ZeRO-2 keeps the weights whole
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert quant_storage(torch.float16) == torch.float16
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16,
                                bnb_4bit_quant_storage=quant_storage(torch.bfloat16))  # fmt: skip
    assert config.bnb_4bit_quant_storage == torch.bfloat16


# ---------------------------------------------------------------- FSDP on 2 ranks (slow)


def with_block(template: str, first_line: str) -> str:
    """accelerate_config.yaml with one commented alternative switched on, as the file tells its reader to do."""
    lines = template.splitlines()
    start = lines.index(f"# {first_line}")
    block = []
    for line in lines[start:]:
        if line == "#" or not line.startswith("# "):
            break
        block.append(line[2:])
    switched = []
    for line in lines:
        switched.extend(block if line == "distributed_type: MULTI_GPU" else [line])
    return "\n".join(switched) + "\n"


@pytest.fixture(scope="module")
def fsdp_job(tiny_llama, tmp_path_factory):
    """The exported launch.sh, run with NUM_PROCESSES=2 and its FSDP block on: 2 gloo ranks x batch 4."""
    from accelerate.commands.config.config_args import load_config_from_file

    from peft_magic.api import resolve_config

    job = tmp_path_factory.mktemp("fsdp") / "job"
    cfg = resolve_config({"model": tiny_llama, "data": {"train": "$rows"}, "method": {"name": "lora", "r": 4},
                          "train": TRAIN}, name="job")  # fmt: skip
    export_script(Run("job", cfg), str(job), namespace={"rows": lm_rows(64)}, num_processes=2)
    config = job / "accelerate_config.yaml"
    config.write_text(with_block(config.read_text(), "distributed_type: FSDP"))
    loaded = load_config_from_file(str(config))
    assert loaded.distributed_type == "FSDP" and loaded.fsdp_config["fsdp_version"] == 2
    started = time.time()
    proc = launch(job)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"dir": job, "stdout": proc.stdout, "seconds": time.time() - started}


def launch(job, *args):
    env = {**child_env(FSDP_ON_CPU), "PEFT_MAGIC_TEST_FSDP_ON_CPU": "1", "NUM_PROCESSES": "2"}
    return subprocess.run(["bash", str(job / "launch.sh"), *args], check=False, capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip


def trainer_state(folder):
    with open(os.path.join(folder, "trainer_state.json")) as fh:
        return json.load(fh)


@pytest.mark.slow
def test_fsdp_gathers_an_adapter_like_a_one_process_run(fsdp_job, tmp_path, monkeypatch):
    import torch
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    job = fsdp_job["dir"]
    final = job / "peft_runs" / "job" / "checkpoint-8"
    state = trainer_state(final)
    assert state["sharded"] == "fsdp"  # written only when Accelerate really prepared the model with FSDP
    monkeypatch.chdir(job)
    single = peft_magic.train("config.yaml", overrides=["train.per_device_train_batch_size=8",
                              f"train.output_dir={tmp_path / 'single'}"], display="none")  # fmt: skip
    single.export(str(tmp_path / "single-adapter"))

    # the export (rank 0 alone, after training) is the whole adapter: the final checkpoint's, in peft's format
    assert sorted(os.listdir(job / "adapter")) == sorted(os.listdir(tmp_path / "single-adapter"))
    two, one, ckpt = (adapter_tensors(d) for d in (job / "adapter", tmp_path / "single-adapter", final))
    assert {k: v.shape for k, v in two.items()} == {k: v.shape for k, v in one.items()}
    assert all(torch.equal(two[k], ckpt[k]) for k in ckpt) and set(two) == set(ckpt)
    assert fsdp_job["stdout"].count("exported to") == 1
    base = AutoModelForCausalLM.from_pretrained(single.config.model.name_or_path)
    loaded = get_peft_model_state_dict(PeftModel.from_pretrained(base, str(job / "adapter")))
    assert all(torch.equal(loaded[k], two[k]) for k in two)
    # the optimizer state was gathered whole too: Adam's moments, by parameter name, at the adapter's full shapes
    moments = torch.load(final / "optimizer.pt", weights_only=False)["state"]
    shapes = {k.replace(".default", ""): v["exp_avg"].shape for k, v in moments.items()}
    assert shapes == {k: v.shape for k, v in two.items()}

    # the same schedule and, up to FSDP's reduction order, the same losses as one process with the same global batch
    two, one = assert_trains_like_one(state["log_history"], single.history)
    print(f"\nFSDP final loss: 2 ranks x batch 4 = {two:.4f} ({fsdp_job['seconds']:.0f} s with start-up), "
          f"1 process x batch 8 = {one:.4f}")  # fmt: skip


@pytest.mark.slow
def test_fsdp_resumes_where_the_uninterrupted_run_ended(fsdp_job, tmp_path):
    straight = fsdp_job["dir"]
    job = tmp_path / "job"
    shutil.copytree(straight, job, ignore=shutil.ignore_patterns("peft_runs", "adapter"))
    shutil.copytree(straight / "peft_runs" / "job" / "checkpoint-4", job / "resumed" / "checkpoint-4")
    proc = launch(job, "--resume", "--set", "train.output_dir=resumed")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # exact only if each rank got its slice of the optimizer's moments back, and the adapter went in before sharding
    again = trainer_state(job / "resumed" / "checkpoint-8")["log_history"]
    before = trainer_state(straight / "peft_runs" / "job" / "checkpoint-8")["log_history"]
    assert_resumed_exactly(again, before, job / "adapter", straight / "adapter")


# ---------------------------------------------------------------- DeepSpeed ZeRO on 2 ranks (slow)


def deepspeed_launch(job, *args):
    env = {**child_env(FSDP_ON_CPU), "PEFT_MAGIC_TEST_DEEPSPEED_ON_CPU": "1", "DS_ACCELERATOR": "cpu",
           "NUM_PROCESSES": "2"}  # fmt: skip
    return subprocess.run(["bash", str(job / "launch.sh"), *args], check=False, capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="deepspeed is not installed (scripts/setup_extra.sh installs it)")  # fmt: skip
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_trains_and_exports_like_one_process(stage, tiny_llama, tmp_path, monkeypatch):
    """The exported launch.sh with its DeepSpeed block switched on (ZeRO-2, or ZeRO-3 which shards the weights and
    gathers the adapter with zero3_save_16bit_model), 2 CPU ranks x batch 4, against one process x batch 8."""
    import torch
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from peft_magic.api import resolve_config

    job = tmp_path / "job"
    cfg = resolve_config({"model": tiny_llama, "data": {"train": "$rows"}, "method": {"name": "lora", "r": 4},
                          "train": TRAIN}, name="job")  # fmt: skip
    export_script(Run("job", cfg), str(job), namespace={"rows": lm_rows(64)}, num_processes=2)
    config = job / "accelerate_config.yaml"
    block = with_block(config.read_text(), "distributed_type: DEEPSPEED")
    config.write_text(block.replace("zero_stage: 2", f"zero_stage: {stage}"))
    proc = deepspeed_launch(job)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    final = job / "peft_runs" / "job" / "checkpoint-8"
    state = trainer_state(final)
    assert state["sharded"] == "deepspeed" and not (final / "optimizer.pt").exists()  # ZeRO keeps it partitioned

    monkeypatch.chdir(job)
    single = peft_magic.train("config.yaml", overrides=["train.per_device_train_batch_size=8",
                              f"train.output_dir={tmp_path / 'single'}"], display="none")  # fmt: skip
    single.export(str(tmp_path / "single-adapter"))
    two, one = adapter_tensors(job / "adapter"), adapter_tensors(tmp_path / "single-adapter")
    assert {k: v.shape for k, v in two.items()} == {k: v.shape for k, v in one.items()}  # whole, even under ZeRO-3
    base = AutoModelForCausalLM.from_pretrained(single.config.model.name_or_path)
    loaded = get_peft_model_state_dict(PeftModel.from_pretrained(base, str(job / "adapter")))
    assert all(torch.equal(loaded[k], two[k]) for k in two)
    last2, last1 = assert_trains_like_one(state["log_history"], single.history)
    print(f"\nDeepSpeed ZeRO-{stage} final loss: 2 ranks x batch 4 = {last2:.4f}, 1 process x batch 8 = {last1:.4f}")

    if stage == 2:  # resume is refused with the fix, before anything trains
        proc = deepspeed_launch(job, "--resume")
        assert proc.returncode != 0 and "resuming under DeepSpeed is not supported" in proc.stdout + proc.stderr


# ---------------------------------------------------------------- a failed save, agreed (slow)


WORKER = textwrap.dedent(
    """
    import atexit, errno, json, os, sys, time
    import torch.distributed as dist
    # registered first, so it runs last: was the process group ended while Python was whole (not left to
    # interpreter teardown, where gloo's threads can abort the process after the run)?
    atexit.register(lambda: print("AT EXIT process group " + ("alive" if dist.is_initialized() else "ended"),
                                  flush=True))
    import peft_magic
    from peft_magic.training import checkpoint
    from peft_magic.errors import TrainingFailed

    model, out, rows = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    rank = int(os.environ["RANK"])
    if rank == 0:  # the disk fills up while rank 0 writes checkpoint-4
        write = checkpoint.Checkpointer._write
        def write_then_full(self, tmp, *args):
            write(self, tmp, *args)
            raise OSError(errno.ENOSPC, "No space left on device")
        checkpoint.Checkpointer._write = write_then_full
    cfg = {"model": model, "data": {"train": rows}, "method": {"name": "lora", "r": 4},
           "train": {"max_steps": 8, "per_device_train_batch_size": 4, "save_steps": 4, "output_dir": out}}
    report = {"rank": rank}
    try:
        run = peft_magic.train(cfg, display="none")
        report["error"] = None
    except Exception as e:
        report.update(error=type(e).__name__, message=str(e), step=e.run.state.step if hasattr(e, "run") else None)
    report["at"] = time.time()
    print("REPORT " + json.dumps(report), flush=True)
    """
)


@pytest.mark.slow
def test_a_checkpoint_rank_0_cannot_write_fails_every_rank_with_its_message(tiny_llama, tmp_path):
    from peft_magic.distributed.notebook import free_port

    out = tmp_path / "out"
    base = {**child_env(), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port())}  # fmt: skip
    argv = [sys.executable, "-c", WORKER, tiny_llama, str(out), json.dumps(lm_rows(64))]
    procs = [subprocess.Popen(argv, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]  # fmt: skip
    try:
        outputs = [p.communicate(timeout=180) for p in procs]  # a rank left waiting would hang past this
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    reports = []
    for p, (stdout, stderr) in zip(procs, outputs):
        lines = [x for x in stdout.splitlines() if x.startswith("REPORT ")]
        assert p.returncode == 0 and lines, stdout[-2000:] + stderr[-3000:]
        assert "AT EXIT process group ended" in stdout, stdout[-2000:]
        reports.append(json.loads(lines[-1][len("REPORT ") :]))

    zero, one = reports
    assert zero["error"] == one["error"] == "TrainingFailed"
    assert zero["message"] == one["message"]  # rank 1 learned rank 0's reason, not a broken connection
    assert f"could not write {out / 'checkpoint-4'} (No space left on device)" in one["message"]
    assert "Fix:" in one["message"] and zero["step"] == one["step"] == 4
    assert abs(zero["at"] - one["at"]) < 30  # both gave up at that save, neither waited for the other
    assert not os.path.exists(out / "checkpoint-4") and not [n for n in os.listdir(out) if n.startswith(".tmp")]
