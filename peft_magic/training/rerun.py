"""Re-running a cell whose output folder already holds a run: continue it, refuse to mix, or replace it.

Every checkpoint carries the config of the run that wrote it (``trainer_state.json``). When a new run is started
in a folder that holds checkpoints:

| the folder holds | same config | another config |
| --- | --- | --- |
| an interrupted run | refused at once, offering `--resume` (`train.resume: auto` resumes without asking) | refused unless `--overwrite` |
| a completed run | trained again: the old checkpoints (the same result) are replaced | refused unless `--overwrite` |

`--resume` with another config is refused too: a checkpoint continues only the run that wrote it (more steps or
epochs excepted: that is the same run, longer; and GRPO's reward functions: a reward that failed stops the run
keeping its checkpoint, so that it can be fixed or replaced in the notebook and the run continued). `--overwrite`
removes the earlier run's checkpoints (and nothing else in the folder) before the new one starts.
"""

from __future__ import annotations

import os
import shutil

from ..errors import ConfigError
from . import checkpoint

# what may change between a run and its continuation without changing what it trains (gradient checkpointing
# recomputes the same activations, dropout masks included: it trades speed for memory, not results)
NOT_COMPARED = {
    "train": {"max_time", "resume", "output_dir", "save_steps", "save_minutes", "save_total_limit", "logging_steps",
              "eval_steps", "report_to", "per_device_eval_batch_size", "num_processes", "eval_samples",
              "eval_max_new_tokens", "gradient_checkpointing"},
    "data": {"cache_tokenized"},
}  # fmt: skip
# what an explicit `--resume` may change: more steps or epochs (the same run, longer), and the reward functions (a
# reward that raised or returned the wrong thing stops the run keeping its checkpoint: the user fixes it, or swaps
# it for another, in the notebook and continues; a function's body cannot be compared anyway, only its name)
EXTENDING = {"train": {"max_steps", "num_train_epochs"}, "grpo": {"rewards"}}


def decide(cfg, resume=False, overwrite: bool = False):
    """What a new run in ``cfg.train.output_dir`` does with the run already there.

    Args:
        cfg: The new run's resolved `Config`.
        resume: ``True`` (`--resume`), a checkpoint path, or False.
        overwrite: Replace the earlier run (`--overwrite`).

    Returns:
        (checkpoint, replace): the checkpoint to resume from (a dict from `checkpoint.load`) or None to start
        fresh; whether the earlier run's checkpoints are to be removed (by `begin`, once the new run's setup passed,
        so that a mistake in the new cell leaves them intact).

    Raises:
        ConfigError: an interrupted run of the same config (without `--resume`), another config's run (without
            `--overwrite`), or `--resume` with nothing or another config's run to continue.
    """
    out = cfg.train.output_dir
    if resume and overwrite:
        raise ConfigError("--resume continues the run in the folder and --overwrite replaces it: pick one.",
                          key="--overwrite")  # fmt: skip
    if overwrite:
        return None, True
    explicit = resume if resume else (getattr(cfg.train, "resume", "ask") == "auto")
    ckpts = checkpoint.list_checkpoints(out)
    if isinstance(resume, str):  # a checkpoint path: from the folder it is in
        ckpts, out_of = [resume], os.path.dirname(os.path.normpath(resume))
    else:
        out_of = out
    if not ckpts:
        if resume:
            raise ConfigError(f"no checkpoint to resume from in '{out}'. Fix: run without --resume, or set "
                              "train.output_dir to the folder of the run to continue.", key="--resume")  # fmt: skip
        return None, False
    if not os.path.isfile(os.path.join(ckpts[-1], checkpoint.STATE_FILE)):
        raise ConfigError(f"'{ckpts[-1]}' is not a checkpoint (no {checkpoint.STATE_FILE}). Fix: give a "
                          "checkpoint-N folder of a run.", key="--resume")  # fmt: skip
    meta = checkpoint.load(ckpts[-1])
    step, planned = int(meta.get("step", 0)), int(meta.get("max_steps") or 0)
    interrupted = step < planned
    where = f"'{out_of}' holds {'an interrupted' if interrupted else 'a completed'} run"
    diff = differences(meta.get("config"), cfg, extending=bool(resume))
    if diff:
        shown = "; ".join(diff[:3]) + (f" (and {len(diff) - 3} more)" if len(diff) > 3 else "")
        cont = " and cannot continue with" if resume else " of"
        raise ConfigError(f"{where}{cont} another config ({shown}). Fix: --overwrite to replace it (overwrite=True "
                          "in train()), or give this run another name or train.output_dir; never mixed.",
                          key="--resume" if resume else "train.output_dir")  # fmt: skip
    if explicit:
        if not interrupted and not resume:  # resume: auto, and the run had ended: start again
            return None, True
        return meta, False
    if interrupted:
        raise ConfigError(f"{where} of this config (step {step}/{planned}). Fix: --resume to continue it "
                          "(resume=True in train(), or `train.resume: auto` to do so without asking), or "
                          "--overwrite to start over.", key="--resume")  # fmt: skip
    return None, True  # a completed run of the same config: training again gives the same, never mixed with it


def differences(before: dict | None, cfg, extending: bool = False) -> list[str]:
    """``["train.learning_rate 0.0002 → 0.001", ...]``: what differs between a saved config and `cfg`, on the keys
    that change what is trained (data given as objects, not names, cannot be compared and is not). `extending`
    (an explicit --resume): more steps or epochs continue the same run."""
    if not isinstance(before, dict):  # a checkpoint written before checkpoints carried their config
        return []
    after = checkpoint.described(cfg)
    out = []
    for section in sorted(set(before) | set(after)):
        a, b = before.get(section), after.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            skip = NOT_COMPARED.get(section, set()) | (EXTENDING.get(section, set()) if extending else set())
            for key in sorted(set(a) | set(b)):
                if key in skip or _same(a.get(key), b.get(key)):
                    continue
                out.append(f"{section}.{key} {_show(a.get(key))} → {_show(b.get(key))}")
        elif not _same(a, b):
            out.append(f"{section} {_show(a)} → {_show(b)}")
    return out


def _same(a, b) -> bool:
    placeholder = any(isinstance(v, str) and v.startswith("<") and v.endswith(">") for v in (a, b))
    return a == b or placeholder or (_number(a) and _number(b) and float(a) == float(b))


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _show(value) -> str:
    text = "unset" if value is None else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def begin(cfg, replace: bool) -> None:
    """As training starts (main process): remove the run being replaced."""
    if replace:
        clear(cfg.train.output_dir)


def clear(out_dir) -> None:
    """Remove an earlier run's checkpoints from `out_dir`; nothing else in the folder is touched."""
    if not out_dir or not os.path.isdir(out_dir):
        return
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        if checkpoint.CKPT.match(name) and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
