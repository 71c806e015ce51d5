"""A run on several processes started from a notebook: ``train.num_processes: N`` (``%%peft_train NAME
--processes N``) forks N workers with `accelerate.notebook_launcher`. Rank 0 forwards its events over a queue and
the kernel re-emits them on its own `EventBus`, so the live panel and Stop button work as for one process; the
adapter comes back through the final checkpoint and is loaded on first use of ``run.model`` (`LaunchedRun`).

The kernel side never imports peft: peft imports bitsandbytes, which can start CUDA, and a process that started
CUDA cannot fork workers that use it. The config is therefore validated in the workers (`distributed/worker.py`).
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, TrainingFailed, did_you_mean
from ..run import Run
from ..config.parse import requested_processes
from .worker import rebuild_error, run_worker

_DONE = ("done",)
_RESTART = (
    "Fix: restart the kernel and run this cell before any cell that trains, loads or evaluates a model in it; or "
    "make it a cluster job: %peft_export NAME --script DIR, then `bash DIR/launch.sh` in a terminal."
)


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

    from ..config.parse import raw_config

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
    from .. import session
    from ..config.schema import Config

    n = n or requested_processes(config, overrides, defaults)
    session.check_idle()
    check_fork_safe(n)
    job = make_job(config, overrides=overrides, defaults=defaults, namespace=namespace, name=name, resume=resume,
                   cell=cell)  # fmt: skip
    if replaces is not None:
        replaces.release()
    provisional = Config()  # replaced by the workers' validated config as soon as rank 0 sends it
    provisional.train.output_dir = (job.config.get("train") or {}).get("output_dir") or session.default_output_dir(name)
    run = LaunchedRun(name, provisional)
    run.cell = cell
    bus = session.make_bus(run, callbacks, display, background)
    launch = _Launch(run, bus, job, n)
    launch.start()
    if background:
        return session.in_background(run, launch.follow)
    from ..training.stopping import SigintAsStop

    try:
        with SigintAsStop(run._stop):  # first Ctrl-C: a graceful stop of every worker, like the Stop button
            launch.follow()
    except KeyboardInterrupt:  # second Ctrl-C: give the cell back; keep relaying so the workers can finish
        session.in_background(run, launch.follow, exclusive=False)
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
            notebook_launcher(run_worker, args=(self.job, self.events, self.stop), num_processes=self.n,
                              use_port=str(free_port()))  # fmt: skip
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
            run.error = rebuild_error(self.worker_error)
            if isinstance(run.error, TrainingFailed):
                run.error.run = run  # as in one process: the cell keeps the run and its last good checkpoint
            raise run.error
        if self.failure is not None:
            run.error = self.failure
            raise self.failure


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _copy_state(state, snapshot) -> None:
    for f in dataclasses.fields(snapshot):
        if f.name != "log_history":
            setattr(state, f.name, getattr(snapshot, f.name))


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
