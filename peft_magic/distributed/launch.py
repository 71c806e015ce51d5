"""One run on several processes: the notebook launcher, rank-0-only helpers, and scripts for a cluster.

A run gets several processes in one of three ways:

- Under a launcher (``accelerate launch -m peft_magic train CONFIG.yaml``, torchrun, a cluster scheduler), which
  starts N copies of the ordinary `train()`. `Accelerator()` reads the launch environment (DDP, multi-node, FSDP,
  DeepSpeed); this module only makes sure that rank 0 alone prints and writes, and that all ranks stop together.
- ``train.num_processes: N`` (``%%peft_train NAME --processes N``) in a notebook or a script: `train_processes`
  forks N workers with `accelerate.notebook_launcher`. Rank 0 forwards its events over a queue and the kernel
  re-emits them on its own `EventBus`, so the live panel and Stop button work as for one process; the adapter
  comes back through the final checkpoint and is loaded on first use of ``run.model``.
- ``%peft_export NAME --script DIR`` (`export_script`): the run's config, its in-memory data saved as JSONL and a
  ``launch.sh`` with the exact ``accelerate launch`` command, so a notebook experiment becomes a cluster job.

The kernel side of `train_processes` never imports peft: peft imports bitsandbytes, which can start CUDA, and a
process that started CUDA cannot fork workers that use it. The config is therefore validated in the workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, TrainingFailed, did_you_mean
from ..run import Run

# torchrun, accelerate launch (multi-process), deepspeed and notebook_launcher's workers set LOCAL_RANK/RANK;
# a single-process `accelerate launch` sets only its ACCELERATE_* variables.
_LAUNCH_ENV = ("LOCAL_RANK", "RANK", "ACCELERATE_DYNAMO_BACKEND")
_DONE = ("done",)
_RESTART = (
    "Fix: restart the kernel and run this cell before any cell that trains, loads or evaluates a model in it; or "
    "make it a cluster job: %peft_export NAME --script DIR, then `bash DIR/launch.sh` in a terminal."
)


# ---------------------------------------------------------------- where am I


def launched() -> bool:
    """Whether a launcher started this process (then it, not `train.num_processes`, decides the process count)."""
    return any(k in os.environ for k in _LAUNCH_ENV)


def process_index() -> int:
    """Global rank of this process (0 when not launched)."""
    return int(os.environ.get("RANK") or 0)


def is_main_process() -> bool:
    return process_index() == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE") or 1)


def needs_cpu() -> bool:
    """Several processes and no GPU: ask Accelerate for gloo ranks on CPU. Without it, a GPU-less launch gives N
    unconnected copies that each train alone and overwrite each other's checkpoints."""
    if world_size() <= 1:
        return False
    import torch

    return not torch.cuda.is_available()


@contextlib.contextmanager
def main_process_first():
    """Rank 0 runs the block first, then the others (they read what it cached: downloads, tokenized data)."""
    if world_size() <= 1:
        yield
        return
    from accelerate import PartialState

    with PartialState(cpu=needs_cpu()).main_process_first():
        yield


class StopSignal:
    """The stop flag (and a checkpoint due by wall-clock time) as every process sees it.

    One process reads its event and its clock. With several, a stop asked on any rank (the kernel's Stop button
    reaches the workers' shared event; Ctrl-C in a terminal reaches every rank, not always between the same
    steps) and a timed checkpoint due on any rank's clock are agreed on with one tiny all-reduce per optimizer step,
    so every rank leaves the loop (or saves) after the same step instead of one waiting forever in the next
    collective. The all-reduce is asynchronous and its result is read one step later: on GPUs the host never
    waits for the device to drain (the read waits on an event recorded a whole step earlier), at the price of
    acting one step later than a single process would.

    Args:
        event: The run's stop event (`threading.Event` or `multiprocessing.Event`).
        accelerator: The run's Accelerator.
    """

    def __init__(self, event, accelerator):
        self.event = event
        self.accelerator = accelerator
        self.agreed = False
        self._pending = None  # (work, device flags, host copy, cuda event) of the exchange started last step

    @property
    def requested(self) -> bool:
        """Between micro-batches: no communication (several processes: what was agreed so far)."""
        return self.event.is_set() if self.accelerator.num_processes == 1 else self.agreed

    def check(self, time_due: bool = False) -> tuple[bool, bool]:
        """At every optimizer-step boundary (with several processes every rank calls it at the same points).

        Args:
            time_due: Whether this rank's clock says a timed checkpoint is due.

        Returns:
            (stop, save): stop after this step; save a timed checkpoint now. With several processes these are
            the flags all ranks raised one step earlier.
        """
        if self.accelerator.num_processes == 1:
            return self.event.is_set(), time_due
        stop, save = self._collect()
        self.agreed = self.agreed or stop
        self._start(int(self.event.is_set()), int(time_due))
        return self.agreed, save

    def close(self) -> None:
        """Finish the exchange still in flight (every rank, when the loop ends)."""
        self._collect()

    def _start(self, *flags) -> None:
        import torch
        import torch.distributed as dist

        device = self.accelerator.device
        values = torch.tensor(flags, dtype=torch.int32, device=device)
        work = dist.all_reduce(values, op=dist.ReduceOp.MAX, async_op=True)
        host = ready = None
        if device.type == "cuda":
            work.wait()  # on CUDA this only orders the current stream after the all-reduce; the host goes on
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        self._pending = (work, values, host, ready)

    def _collect(self) -> tuple[bool, bool]:
        if self._pending is None:
            return False, False
        work, values, host, ready = self._pending
        self._pending = None
        if ready is not None:
            ready.synchronize()  # recorded a step ago: long done, the newer kernels keep running
            stop, save = host.tolist()
        else:
            work.wait()
            stop, save = values.tolist()
        return bool(stop), bool(save)


# ---------------------------------------------------------------- how many processes


def requested_processes(config=None, overrides=(), defaults=None) -> int:
    """`train.num_processes` of a config (without validating the rest: that would import peft); 1 under a launcher.

    Args:
        config: What `train()` accepts (dict, YAML text or path, `Config`).
        overrides: ``--set`` style overrides.
        defaults: Config defaults (e.g. from `%peft_model`).
    """
    if launched():
        return 1
    from ..config.schema import _coerce, raw_config

    section = raw_config(config, overrides, defaults).get("train")
    value = section.get("num_processes", 1) if isinstance(section, dict) else 1
    n = _coerce(value, int, "train.num_processes")
    if n < 1:
        raise ConfigError(f"must be 1 or more, got {n}.", key="train.num_processes")
    return n


def check_fork_safe(n: int) -> None:
    """What accelerate's notebook_launcher needs of the kernel before it forks, as ConfigErrors that say what to do.

    Nothing here may touch CUDA itself: `torch.cuda.is_available()` would already spoil the fork, so GPUs are
    counted with nvidia-smi, as accelerate does.
    """
    import shutil
    import sys

    import torch

    if torch.cuda.is_initialized():
        raise ConfigError(f"this kernel already uses the GPU, and processes forked from it cannot (CUDA does not "
                          f"survive a fork), so {n} processes cannot start from here. {_RESTART}",
                          key="train.num_processes")  # fmt: skip
    if "bitsandbytes" in sys.modules:
        raise ConfigError("this kernel already imported bitsandbytes (peft imports it whenever a model was trained "
                          "or loaded in this kernel), which can start CUDA, so accelerate's notebook_launcher will "
                          f"not fork. {_RESTART}", key="train.num_processes")  # fmt: skip
    if shutil.which("nvidia-smi"):
        from accelerate.utils import get_gpu_info

        try:
            gpus = get_gpu_info()[1]
        except Exception:  # noqa: BLE001 - nvidia-smi present but no usable GPU: let the workers say so
            gpus = n
        if n > gpus:
            raise ConfigError(f"{n} processes need {n} GPUs; this machine has {gpus}. Fix: --processes {gpus} "
                              f"(or train.num_processes: {gpus}).", key="train.num_processes")  # fmt: skip


# ---------------------------------------------------------------- the notebook launcher


@dataclass
class Job:
    """What every worker receives (picklable, so a spawn-based launch works as well as fork).

    Args:
        config: The merged config mapping (overrides and defaults applied, not yet validated).
        name: The run's name.
        namespace: Only the notebook variables the data section names (``$name``), not the whole namespace.
        resume: As `train(resume=...)`.
        cell: The %%peft_train cell text, for the model card.
    """

    config: dict
    name: str = "run"
    namespace: dict = field(default_factory=dict)
    resume: Any = False
    cell: str | None = None


def make_job(config=None, *, overrides=(), defaults=None, namespace=None, name="run", resume=False,
             cell=None) -> Job:  # fmt: skip
    """Build the workers' `Job`, checking in the kernel what can be checked without peft: the ``$name``s exist
    and everything pickles."""
    import pickle

    from ..config.schema import raw_config

    mapping = raw_config(config, overrides, defaults)
    ns = namespace or {}
    picked = {}
    for key, ref in _data_refs(mapping):
        if ref not in ns:
            visible = [k for k in ns if not k.startswith("_")]
            raise ConfigError(f"'${ref}' is not defined in the notebook.{did_you_mean(ref, visible)} Fix: run the "
                              f"cell that creates `{ref}` first.", key=key)  # fmt: skip
        picked[ref] = ns[ref]
    job = Job(config=mapping, name=name, namespace=picked, resume=resume, cell=cell)
    try:
        pickle.dumps(job)
    except Exception as e:  # noqa: BLE001 - whatever pickle raises, the fix is the same
        raise ConfigError(f"the data cannot be sent to the worker processes ({type(e).__name__}: {e}). Fix: give "
                          "a DataFrame, a list of dicts, a datasets.Dataset or a file path.", key="data") from None  # fmt: skip
    return job


def _data_refs(mapping):
    data = mapping.get("data")
    if not isinstance(data, dict):
        return []
    return [(f"data.{split}", src.strip()[1:]) for split in ("train", "eval", "forgetting")
            if isinstance(src := data.get(split), str) and src.strip().startswith("$")]  # fmt: skip


def train_processes(config=None, n=None, *, overrides=(), defaults=None, namespace=None, callbacks=(), name="run",
                    display="auto", resume=False, cell=None, background=False, replaces=None):  # fmt: skip
    """Train on `n` processes forked with `accelerate.notebook_launcher`; returns a `LaunchedRun`.

    Called by `train()` when `train.num_processes` > 1 outside a launcher. The workers validate the config, load
    the data and model, and train; this process relays rank 0's events to `callbacks` and the display, and fills
    the Run (config, history, metrics, state) as they arrive. The model is read from the final checkpoint on first
    use of ``run.model``.

    Args:
        config, overrides, defaults, namespace, callbacks, name, display, resume, cell, background: As `train()`.
        n: Number of processes (default: `requested_processes(config, overrides, defaults)`).
        replaces: A previous Run to release once the checks passed.
    """
    from ..api import _ACTIVE, _make_display, default_output_dir
    from ..config.schema import Config
    from ..events import EventBus

    n = n or requested_processes(config, overrides, defaults)
    if _ACTIVE:
        raise ConfigError(f"run '{next(iter(_ACTIVE)).name}' is still training in the background. Fix: "
                          "`.stop()` or `.wait()` it first; one run trains at a time.", key="--background")  # fmt: skip
    check_fork_safe(n)
    job = make_job(config, overrides=overrides, defaults=defaults, namespace=namespace, name=name, resume=resume,
                   cell=cell)  # fmt: skip
    if replaces is not None:
        replaces.release()
    provisional = Config()  # replaced by the workers' validated config as soon as rank 0 sends it
    provisional.train.output_dir = (job.config.get("train") or {}).get("output_dir") or default_output_dir(name)
    run = LaunchedRun(name, provisional)
    run.cell = cell
    bus = EventBus(list(callbacks))
    if display is not None and display != "none":
        sub = _make_display(display, run, background)
        if sub is not None:
            bus.add(sub)
    launch = _Launch(run, bus, job, n)
    launch.start()
    if background:
        _ACTIVE.add(run)
        run._thread = threading.Thread(target=launch.follow_safely, daemon=True, name=f"peft_magic:{name}")
        run._thread.start()
        return run
    from ..training.engine import SigintAsStop

    try:
        with SigintAsStop(run._stop):  # first Ctrl-C: a graceful stop of every worker, like the Stop button
            launch.follow()
    except KeyboardInterrupt:  # second Ctrl-C: give the cell back; keep relaying so the workers can finish
        run._thread = threading.Thread(target=launch.follow_safely, daemon=True, name=f"peft_magic:{name}")
        run._thread.start()
        raise
    return run


class _Launch:
    """The kernel's side of one multi-process run: the launcher thread and the relay of rank 0's messages."""

    def __init__(self, run, bus, job, n):
        import multiprocessing

        ctx = multiprocessing.get_context("fork")  # what notebook_launcher uses on CUDA and CPU machines
        self.events, self.stop = ctx.Queue(), ctx.Event()
        run._stop = self.stop  # Run.stop(), the panel's Stop button and Ctrl-C all set the workers' event
        self.run, self.bus, self.job, self.n = run, bus, job, n
        self.failure: BaseException | None = None  # what notebook_launcher raised
        self.worker_error: dict | None = None  # what a worker reported before dying
        self.result: dict | None = None
        self.thread = threading.Thread(target=self._launch, daemon=True, name=f"peft_magic:{run.name}:launcher")

    def start(self):
        from accelerate.state import AcceleratorState

        if AcceleratorState._shared_state:  # a single-process state left by an earlier run; the launcher refuses it
            AcceleratorState._reset_state(reset_partial_state=True)
        self.thread.start()

    def _launch(self):
        # In a thread on purpose: torch's elastic agent installs its SIGINT handler (kill the workers) only in the
        # main thread, so here Ctrl-C stays a graceful stop.
        import logging

        from accelerate import notebook_launcher

        # the elastic agent logs each worker's exit with a traceback of its own; the kernel reports the worker's
        # error itself (one line for a mistake, the worker's traceback for a bug)
        elastic = logging.getLogger("torch.distributed.elastic")
        level = elastic.level
        elastic.setLevel(logging.CRITICAL)
        try:
            notebook_launcher(_worker, args=(self.job, self.events, self.stop), num_processes=self.n,
                              use_port=str(_free_port()))  # fmt: skip
        except BaseException as e:  # noqa: BLE001 - reported by `follow` in the caller's thread
            self.failure = e
        finally:
            elastic.setLevel(level)
            self.events.put(_DONE)

    def follow(self):
        """Relay the workers' messages until they are done, then finish the Run (or raise what failed)."""
        while True:
            msg = self.events.get()
            if msg == _DONE:
                break
            self._handle(msg)
        self.thread.join()
        self._finish()

    def follow_safely(self):
        from ..api import _ACTIVE

        try:
            self.follow()
        except BaseException as e:  # noqa: BLE001 - a background run records its error (run.wait() re-raises)
            self.run.error = e
        finally:
            _ACTIVE.discard(self.run)

    def _handle(self, msg):
        kind = msg[0]
        if kind == "event":
            self._relay(*msg[1:])
        elif kind == "config":
            self.run.config = self._with_data(msg[1])
        elif kind == "result":
            self.result = msg[1]
        elif kind == "error" and (self.worker_error is None or msg[1]["type"] in ("ConfigError", "TrainingFailed")):
            self.worker_error = msg[1]  # the first report is the cause; the others are peers losing it

    def _relay(self, hook, snapshot, args):
        run = self.run
        _copy_state(run.state, snapshot)
        if snapshot.log_history:  # sent at begin and end only (a resumed run starts with its history)
            run.history[:] = snapshot.log_history
        if hook == "on_log":
            run.history.append(dict(args[0]))
        elif hook == "on_evaluate":
            run.history.append({k: v for k, v in args[0].items() if k != "_full"})
        run.state.log_history = run.history
        self.bus.emit(hook, run.state, *args)

    def _with_data(self, cfg):
        """The workers' config, with data objects (sent as None) put back from the kernel's own mapping."""
        data = self.job.config.get("data") or {}
        for split in ("train", "eval"):
            if getattr(cfg.data, split) is None and data.get(split) is not None:
                setattr(cfg.data, split, data[split])
        return cfg

    def _finish(self):
        run = self.run
        run.adapter_dir = run.state.checkpoint_dir  # at least the last checkpoint, if training got that far
        if self.result is not None:
            res = self.result
            run.config = self._with_data(res["config"])
            run.history[:] = res["history"]
            run.metrics, run.labels = res["metrics"], res["labels"]
            run.warnings.extend(res["warnings"])
            _copy_state(run.state, res["state"])
            run.state.log_history = run.history
            run.adapter_dir = res["adapter_dir"]
        if self.worker_error is not None:
            run.error = _rebuild_error(self.worker_error)
            if isinstance(run.error, TrainingFailed):
                run.error.run = run  # as in one process: the cell keeps the run and its last good checkpoint
            raise run.error
        if self.failure is not None:
            run.error = self.failure
            raise self.failure


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _copy_state(state, snapshot) -> None:
    for f in dataclasses.fields(snapshot):
        if f.name != "log_history":
            setattr(state, f.name, getattr(snapshot, f.name))


# ---------------------------------------------------------------- inside each worker


def _worker(job: Job, events, stop) -> None:
    """What every forked process runs: the ordinary setup + fit; rank 0 also reports to the kernel."""
    from .. import api
    from ..events import EventBus
    from ..run import Run

    rank = process_index()
    try:
        cfg = api.resolve_config(job.config, None, None, job.name)
        if rank == 0:
            events.put(("config", _portable_config(cfg)))
        run = Run(job.name, cfg)
        run.cell, run._stop = job.cell, stop
        bus = EventBus([_Forwarder(events)] if rank == 0 else [])
        resume_meta = api._find_resume(job.resume, cfg)
        api.setup(run, job.namespace, bus)
        if resume_meta is not None:
            resume_meta["method"] = run.method
        api._fit(run, bus, resume_meta)
        if rank == 0:
            events.put(("result", _result(run)))
    except BaseException as e:
        events.put(("error", _error_report(rank, e)))
        # the launcher must see it fail, or the other ranks wait forever in their next collective; a user mistake
        # exits without a traceback per worker (the kernel shows it as one line)
        if isinstance(e, (ConfigError, TrainingFailed)):
            raise SystemExit(1) from None
        raise
    finally:
        events.close()
        events.join_thread()  # everything sent is in the pipe before this process exits


class _Forwarder:
    """Rank 0's subscriber in a worker: every event goes to the kernel as (hook, state snapshot, args).

    The history travels only with on_train_begin/on_train_end (the kernel appends each logged row itself), so a
    long run does not resend its whole history at every step.
    """

    def __init__(self, events):
        self.events = events

    def _send(self, hook, state, *args, full=False):
        snapshot = dataclasses.replace(state, log_history=list(state.log_history) if full else [])
        self.events.put(("event", hook, snapshot, args))

    def on_status(self, state, status):
        self._send("on_status", state, status)

    def on_train_begin(self, state):
        self._send("on_train_begin", state, full=True)

    def on_step_end(self, state):
        self._send("on_step_end", state)

    def on_log(self, state, logs):
        self._send("on_log", state, dict(logs))

    def on_evaluate(self, state, metrics):
        self._send("on_evaluate", state, dict(metrics))

    def on_train_end(self, state):
        self._send("on_train_end", state, full=True)


def _portable_config(cfg):
    """The config without data objects (the kernel has them; no need to send a DataFrame back)."""
    keep = (str, int, float, type(None))
    data = dataclasses.replace(cfg.data, **{s: None for s in ("train", "eval") if not isinstance(getattr(cfg.data, s), keep)})  # fmt: skip
    return dataclasses.replace(cfg, data=data)


def _result(run) -> dict:
    ckpt = run.state.checkpoint_dir
    return {
        "config": _portable_config(run.config),
        "history": list(run.history),
        "metrics": run.metrics,
        "labels": run.labels,
        "warnings": list(run.warnings),
        "state": dataclasses.replace(run.state, log_history=[]),
        "adapter_dir": os.path.abspath(ckpt) if ckpt else None,
    }


def _error_report(rank, e) -> dict:
    import traceback

    message = str(e)
    key = getattr(e, "key", None)
    if isinstance(e, ConfigError) and key and message.startswith(f"{key}: "):
        message = message[len(key) + 2 :]
    return {"rank": rank, "type": type(e).__name__, "message": message, "key": key,
            "traceback": "".join(traceback.format_exception(e))[-4000:]}  # fmt: skip


def _rebuild_error(report: dict) -> BaseException:
    if report["type"] == "ConfigError":
        return ConfigError(report["message"], key=report["key"])
    if report["type"] == "TrainingFailed":
        return TrainingFailed(report["message"])
    return RuntimeError(f"worker process {report['rank']} failed with {report['type']}: {report['message']}\n\n"
                        f"Its traceback:\n{report['traceback']}")  # fmt: skip


# ---------------------------------------------------------------- a notebook run as a cluster job


def export_script(run, out_dir, namespace=None, num_processes=None, overwrite=False) -> str:
    """Write what a cluster needs to train `run` again with ``accelerate launch``.

    Files: ``config.yaml`` (the run's resolved config; data given as notebook variables is saved beside it as
    ``train.jsonl``/``eval.jsonl``, local paths are made absolute), ``launch.sh`` (the exact command, run from its
    own folder) and ``accelerate_config.yaml`` (one machine, every GPU, DDP; multi-node, FSDP and DeepSpeed as
    commented alternatives).

    Args:
        run: The run whose config to export (it need not have finished).
        out_dir: Folder to write.
        namespace: Where ``$name`` data references are looked up (the notebook's variables).
        num_processes: Processes for launch.sh (default: the run's `train.num_processes` when above 1, else every
            GPU of the machine the script runs on).
        overwrite: Write into a folder that already holds files.

    Returns:
        The folder's absolute path.
    """
    import yaml

    from ..export.folder import check_target

    path = check_target(out_dir, overwrite)
    os.makedirs(path, exist_ok=True)
    cfg = run.config
    raw = cfg.to_dict()
    for split in ("train", "eval"):
        raw["data"][split] = _portable_source(getattr(cfg.data, split), namespace, path, split)
    model = os.path.expanduser(cfg.model.name_or_path)
    if os.path.exists(model):
        raw["model"]["name_or_path"] = os.path.abspath(model)
    raw["train"]["output_dir"] = f"peft_runs/{run.name}"  # beside launch.sh, which runs from its own folder
    raw["train"]["num_processes"] = 1  # under `accelerate launch` the launcher decides
    n = num_processes or (cfg.train.num_processes if cfg.train.num_processes > 1 else None)
    header = f"# peft_magic config of run '{run.name}', for launch.sh (`peft-magic train config.yaml`).\n"
    _write(path, "config.yaml", header + yaml.safe_dump(raw, sort_keys=False, default_flow_style=False))
    template = ACCELERATE_CONFIG.format(layer=_decoder_layer(cfg), accum=cfg.train.gradient_accumulation_steps,
                                        clip=cfg.train.max_grad_norm)  # fmt: skip
    _write(path, "accelerate_config.yaml", template)
    every_gpu = "$(nvidia-smi -L 2>/dev/null | wc -l)"
    _write(path, "launch.sh", LAUNCH_SH.format(name=run.name, n=n or every_gpu), mode=0o755)
    return path


def _portable_source(src, namespace, folder, split):
    """A data source that works on another machine: notebook objects become JSONL files beside the config."""
    if src is None or isinstance(src, float):
        return src
    if isinstance(src, str) and not src.strip().startswith("$"):
        local = os.path.expanduser(src)
        return os.path.abspath(local) if os.path.exists(local) else src  # a hub dataset id stays as it is
    from ..data.prepare import resolve
    from ..models import quiet_loading

    ds = resolve(src, namespace, f"data.{split}", "train" if split == "train" else "validation")
    with quiet_loading():
        ds.to_json(os.path.join(folder, f"{split}.jsonl"), lines=True, force_ascii=False)
    return f"{split}.jsonl"


def _decoder_layer(cfg) -> str:
    """The block class FSDP wraps (``LlamaDecoderLayer``...), from the architecture's own `_no_split_modules`."""
    try:
        import transformers

        from ..models import load_config

        arch = (load_config(cfg.model).architectures or [""])[0]
        layers = getattr(getattr(transformers, arch, None), "_no_split_modules", None) or []
        return ",".join(layers) or "<decoder layer class of your model>"
    except Exception:  # noqa: BLE001 - a hint in a commented template is not worth failing the export for
        return "<decoder layer class of your model>"


def _write(folder, name, text, mode=None):
    file = os.path.join(folder, name)
    with open(file, "w", encoding="utf-8") as fh:
        fh.write(text)
    if mode is not None:
        os.chmod(file, mode)


LAUNCH_SH = """#!/usr/bin/env bash
# Train run '{name}' again, on every GPU of this machine, with the config its notebook used.
#   bash launch.sh                                # or: NUM_PROCESSES=4 bash launch.sh
#   bash launch.sh --set train.max_steps=2000     # extra arguments go to `peft-magic train`
#   bash launch.sh --resume                       # continue from the latest checkpoint (same NUM_PROCESSES)
# Needs peft_magic installed (pip install peft-magic). The adapter lands in ./adapter, checkpoints in
# ./peft_runs/{name}. Mixed precision comes from train.mixed_precision in config.yaml.
set -euo pipefail
cd "$(dirname "$0")"
NUM_PROCESSES="${{NUM_PROCESSES:-{n}}}"
[ "$NUM_PROCESSES" -ge 1 ] 2>/dev/null || NUM_PROCESSES=1

accelerate launch --config_file accelerate_config.yaml --num_processes "$NUM_PROCESSES" \\
    -m peft_magic train config.yaml --name {name} --export adapter --overwrite "$@"

# Several machines: run this on each, with MACHINE_RANK 0..NUM_MACHINES-1, MAIN_IP the address of machine 0 and
# NUM_PROCESSES the number of GPUs over all machines (under SLURM: MACHINE_RANK=$SLURM_NODEID, one task per node):
#   accelerate launch --config_file accelerate_config.yaml --num_machines "$NUM_MACHINES" \\
#       --machine_rank "$MACHINE_RANK" --main_process_ip "$MAIN_IP" --main_process_port 29500 \\
#       --num_processes "$NUM_PROCESSES" -m peft_magic train config.yaml --name {name} --export adapter --overwrite
# FSDP or DeepSpeed: switch the block in accelerate_config.yaml (docs/scale-out.md says what each supports).
"""

ACCELERATE_CONFIG = """# accelerate config for launch.sh: one machine, every GPU, DDP (each GPU holds the whole base model).
# The process count comes from launch.sh; mixed precision from train.mixed_precision in config.yaml.
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: 1
machine_rank: 0
gpu_ids: all
mixed_precision: 'no'
rdzv_backend: static
same_network: true
main_training_function: main
use_cpu: false

# To use one of the alternatives below, replace the `distributed_type: MULTI_GPU` line with its block, uncommented.
# What each one supports, and what was tested: docs/scale-out.md.
#
# --- FSDP2: every weight sharded over the GPUs, for a base that does not fit on one (LoRA-family methods). Each
# checkpoint gathers the adapter and optimizer state for rank 0; resume with the same number of processes.
# distributed_type: FSDP
# fsdp_config:
#   fsdp_version: 2
#   fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
#   fsdp_transformer_layer_cls_to_wrap: {layer}
#   fsdp_state_dict_type: FULL_STATE_DICT
#   fsdp_cpu_ram_efficient_loading: true
#   fsdp_reshard_after_forward: true
#   fsdp_offload_params: false
#
# --- DeepSpeed ZeRO-2: optimizer state and gradients sharded (needs `pip install deepspeed`). zero_stage: 3 shards
# the weights too (checkpoints gather the adapter, which needs zero3_save_16bit_model). Not resumable.
# distributed_type: DEEPSPEED
# deepspeed_config:
#   zero_stage: 2
#   gradient_accumulation_steps: {accum}
#   gradient_clipping: {clip}
#   offload_optimizer_device: none
#   offload_param_device: none
#   zero3_init_flag: false
#   zero3_save_16bit_model: true
"""


# ---------------------------------------------------------------- the Run the kernel keeps


class LaunchedRun(Run):
    """A `Run` trained by worker processes.

    History, metrics and state arrive while it trains; the tokenizer and model are read from the final checkpoint
    (``adapter_dir``) on first use. Until then the kernel imports neither peft nor CUDA, so it can launch again;
    once ``run.model`` was used, another multi-process run needs a kernel restart. The model is loaded as
    `peft_magic.load` does it: on CPU for a full-precision base, on the GPU for a 4/8-bit one.
    """

    def __init__(self, name, config):
        self._model = self._tokenizer = self._method = None
        self.adapter_dir: str | None = None
        super().__init__(name, config)

    @property
    def model(self):
        if self._model is None and self.adapter_dir:
            self._load(model=True)
        return self._model

    @model.setter
    def model(self, value):
        self._model = value

    @property
    def tokenizer(self):
        if self._tokenizer is None and self.adapter_dir:
            self._load(model=False)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value):
        self._tokenizer = value

    @property
    def method(self):
        if self._method is None and self.adapter_dir:
            from ..methods import get_method

            self._method = get_method(self.config.method.name)
        return self._method

    @method.setter
    def method(self, value):
        self._method = value

    def _load(self, model: bool) -> None:
        from .. import models

        cfg = self.config
        with models.quiet_loading(self.warnings):
            if self._tokenizer is None:
                self._tokenizer = models.load_tokenizer(cfg.model)
            if model:
                base = models.load_model(cfg.model, cfg.task, self.labels, pad_token_id=self._tokenizer.pad_token_id)
                self._model = self.method.load(base, self.adapter_dir)
                self._model.eval()

    def release(self) -> None:
        super().release()
        self.adapter_dir = None  # released means gone: do not read it back on the next access
