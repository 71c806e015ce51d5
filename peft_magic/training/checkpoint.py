"""Checkpoints: the trained weights, optimizer, scheduler and RNG state of one step, written atomically.

Layout of ``<output_dir>/checkpoint-<step>/``: the method's adapter files (peft format for peft methods), then
``optimizer.pt``, ``scheduler.pt``, ``rng_state.pt`` and ``trainer_state.json`` (step, epoch, history). A
checkpoint is written into a temporary folder and renamed into place, so a crash while saving never leaves a
half-written "latest"; old ones are pruned to ``save_total_limit``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time

CKPT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
METHOD_STATE = "method_state.pt"  # what a method keeps besides weights (AdaLoRA: its rank schedule)


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints in `output_dir`, oldest first."""
    if not output_dir or not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = CKPT.match(name)
        path = os.path.join(output_dir, name)
        if m and not os.path.islink(path) and os.path.isfile(os.path.join(path, STATE_FILE)):  # links may point out
            found.append((int(m.group(1)), os.path.join(output_dir, name)))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str) -> str | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


class Checkpointer:
    """Saves checkpoints every `save_steps` optimizer steps and/or every `save_minutes`, plus at the end.

    Args:
        output_dir: Folder of the run.
        method: The run's method (its `save` writes the trained weights).
        cfg: The run's Config (saved beside the weights).
        save_steps: Save every N steps (0: not by steps).
        save_total_limit: Keep at most this many checkpoints.
        save_minutes: Also save when this many minutes passed since the last save (0: not by time).
    """

    def __init__(self, output_dir, method, cfg, save_steps=0, save_total_limit=2, save_minutes=0.0):
        self.output_dir = output_dir
        self.method = method
        self.cfg = cfg
        self.save_steps = save_steps
        self.save_total_limit = max(int(save_total_limit), 1)
        self.save_minutes = save_minutes
        self._last_save = time.time()

    def due(self, step: int, max_steps: int, timed: bool | None = None) -> bool:
        """Whether to save after `step`: every `save_steps`, or when `save_minutes` passed (`timed`, when given,
        is that clock decision as all processes agreed on it; see `stopping.StopSignal`)."""
        if step >= max_steps:
            return False  # the final save happens once the loop ends
        if self.save_steps and step % self.save_steps == 0:
            return True
        return self.time_due() if timed is None else timed

    def time_due(self) -> bool:
        """`save_minutes` passed since the last save (this process's clock)."""
        return bool(self.save_minutes) and time.time() - self._last_save >= 60 * self.save_minutes

    def save(self, accelerator, model, optimizer, scheduler, state, history, extra=None) -> str | None:
        """Write ``checkpoint-<step>``; `extra` (JSON-safe) goes into trainer_state.json.

        Every rank calls it: the per-process RNG states, and under FSDP/ZeRO-3 the weights and optimizer state,
        are gathered for rank 0, which writes. If writing fails, every rank raises the same error.
        """
        from ..distributed import sharding

        accelerator.wait_for_everyone()
        ranks = _per_process(accelerator, extra)  # a collective: every rank's RNG state and running sums
        weights = sharding.gather_weights(accelerator, model)  # collectives too, under FSDP / ZeRO-3
        optim = sharding.gather_optimizer(accelerator, model, optimizer)
        if weights is not None and accelerator.is_main_process:  # what an export after training will write
            sharding.remember(accelerator.unwrap_model(model), weights)
        final_dir = os.path.join(self.output_dir, f"checkpoint-{state.step}")
        error = failure = None  # failure: (error class name, message), the same on every rank once broadcast
        if accelerator.is_main_process:
            how = sharding.kind(accelerator)  # resume checks it: the optimizer state's layout depends on it
            extra = {**(extra or {}), "sharded": how} if how else extra
            try:
                self._write_in_place(final_dir, accelerator, model, weights, optim, scheduler, state, history, extra,
                                     ranks)  # fmt: skip
            except OSError as e:  # disk full, permission denied: the user can act on it
                failure = ("TrainingFailed", _save_failed(e, final_dir, state))
            except BaseException as e:  # noqa: BLE001 - a bug: rank 0 keeps its traceback, the other ranks learn of it
                error, failure = e, ("RuntimeError", f"rank 0 failed to write {final_dir}: {type(e).__name__}: {e}")
        failure = _from_main_process(accelerator, failure)  # also the barrier: no rank runs ahead of the write
        if failure is not None:
            from ..errors import TrainingFailed

            if error is None:
                error = (TrainingFailed if failure[0] == "TrainingFailed" else RuntimeError)(failure[1])
            error.agreed = True  # every rank raises it at this point: the engine may finish its collectives
            raise error
        self._last_save = time.time()
        state.checkpoint_dir = final_dir
        return final_dir

    def _write_in_place(self, final_dir, *args):
        """Write into a temporary folder, then rename it to `final_dir` (a crash never leaves half a checkpoint)."""
        os.makedirs(self.output_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(final_dir)}-", dir=self.output_dir)
        try:
            self._write(tmp, *args)
        except BaseException:  # a half-written folder is never renamed into place: drop it
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if os.path.islink(final_dir):
            os.unlink(final_dir)
        elif os.path.exists(final_dir):  # same step saved again (e.g. stop right after a periodic save)
            shutil.rmtree(final_dir)
        os.replace(tmp, final_dir)
        self._prune()

    def _write(self, tmp, accelerator, model, weights, optim, scheduler, state, history, extra, ranks=()):
        import torch

        unwrapped = accelerator.unwrap_model(model)
        if weights is None:
            self.method.save(unwrapped, tmp, self.cfg)
        else:  # gathered from FSDP / ZeRO-3 shards (sharding.check made sure the method takes them)
            self.method.save(unwrapped, tmp, self.cfg, state_dict=weights)
        if optim is not None:  # None under DeepSpeed, which keeps it partitioned (resume is refused there)
            torch.save(optim, os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        method_state = getattr(self.method, "train_state", lambda m: None)(unwrapped)  # e.g. AdaLoRA's schedule
        if method_state is not None:
            torch.save(method_state, os.path.join(tmp, METHOD_STATE))
        torch.save(_rng_state(), os.path.join(tmp, "rng_state.pt"))
        for i, (rng, _) in enumerate(ranks[1:], start=1):  # each process resumes its own dropout stream
            torch.save(rng, os.path.join(tmp, f"rng_state_{i}.pt"))
        meta = {"step": state.step, "epoch": state.epoch, "samples_seen": state.samples_seen,
                "tokens_seen": state.tokens_seen, "max_steps": state.max_steps, "log_history": history,
                "config": described(self.cfg), **(extra or {})}  # fmt: skip
        if self.cfg is not None:  # what `gradient_checkpointing: auto` chose: a resumed run keeps it
            meta["gradient_checkpointing"] = self.cfg.train.checkpointing
        if ranks:
            meta["per_process"] = [e for _, e in ranks]
        with open(os.path.join(tmp, STATE_FILE), "w") as fh:  # written last: its presence marks a complete one
            json.dump(meta, fh, indent=1, default=float)

    def _prune(self):
        for path in list_checkpoints(self.output_dir)[: -self.save_total_limit]:
            shutil.rmtree(path, ignore_errors=True)


DATA_SOURCES = ("train", "eval", "forgetting")


def described(cfg) -> dict | None:
    """The run's config as a checkpoint keeps it (to tell a re-run of it from another run: `rerun.decide`): a plain
    dict, data given as objects or inline rows shown by their type only (never the rows)."""
    if cfg is None:
        return None
    out = cfg.to_dict()
    data = out.get("data") or {}
    for key in DATA_SOURCES:
        if key in data and not isinstance(data[key], (str, int, float, type(None))):
            data[key] = f"<{type(getattr(cfg.data, key)).__name__}>"
    return out


def _save_failed(err: OSError, final_dir: str, state) -> str:
    kept = f" The last good checkpoint, {state.checkpoint_dir}, is intact." if state.checkpoint_dir else ""
    return (
        f"could not write {final_dir} ({err.strerror or err}); nothing half-written was kept.{kept} Fix: free "
        "disk space, lower train.save_total_limit, or set train.output_dir to a folder with room. run.model "
        "still holds the trained weights."
    )


def _from_main_process(accelerator, value):
    """Rank 0's `value` on every rank (one small broadcast; nothing to do with one process)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def _per_process(accelerator, extra) -> list:
    """[(rng_state, extra)] of every process, gathered for rank 0 to write; [] with one process."""
    if accelerator.num_processes == 1:
        return []
    from accelerate.utils import gather_object

    return gather_object([(_rng_state(), extra or {})])


def _rng_state() -> dict:
    import random

    import numpy as np
    import torch

    out = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def load(path: str) -> dict:
    """Read a checkpoint folder's metadata (weights and states are read by `restore`)."""
    with open(os.path.join(path, STATE_FILE)) as fh:
        meta = json.load(fh)
    meta["path"] = path
    return meta


def before_prepare(accelerator, model, method, resume=None) -> None:
    """Before `accelerator.prepare` shards the model (FSDP, ZeRO-3): refuse what could not be saved or resumed
    under this run's sharding, and load a resumed run's weights into the whole model.

    Args:
        accelerator: The run's Accelerator.
        model: The model, not yet prepared.
        method: The run's method.
        resume: A loaded checkpoint dict from `load` (with its ``method``), or None.
    """
    from ..distributed.sharding import check

    check(accelerator, method, model, resume)
    if resume is not None:
        resume["method"].load_weights(model, resume["path"])


def restore(resume: dict, accelerator, model, optimizer, scheduler, state, history) -> int:
    """Load optimizer, scheduler and RNG state into the prepared objects; returns the step. The weights went in
    before `prepare` (`before_prepare`)."""
    import random

    import numpy as np
    import torch

    from ..distributed.sharding import load_optimizer

    path = resume["path"]
    load_optimizer(accelerator, model, optimizer, torch.load(os.path.join(path, "optimizer.pt"), weights_only=False))
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=False))
    method = resume.get("method")
    if os.path.exists(os.path.join(path, METHOD_STATE)) and hasattr(method, "load_train_state"):
        method.load_train_state(accelerator.unwrap_model(model),
                                torch.load(os.path.join(path, METHOD_STATE), weights_only=False))  # fmt: skip
    rng_file = os.path.join(path, "rng_state.pt")
    per = resume.get("per_process")
    if per and len(per) == accelerator.num_processes:  # same process count: each rank continues its own state
        resume.update(per[accelerator.process_index])
        if accelerator.process_index:
            rng_file = os.path.join(path, f"rng_state_{accelerator.process_index}.pt")
    rng = torch.load(rng_file, weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    history[:] = resume.get("log_history", [])
    state.samples_seen = resume.get("samples_seen", 0)
    state.tokens_seen = resume.get("tokens_seen", 0)
    state.epoch = resume.get("epoch", 0.0)
    state.log_history = history
    return int(resume["step"])
