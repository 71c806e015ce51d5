"""Inside each process of a notebook-launched run: the ordinary one-process run, with rank 0's events, result
and errors sent to the kernel over a queue (the kernel side is `distributed/notebook.py`)."""

from __future__ import annotations

import dataclasses
import os

from ..errors import ConfigError, TrainingFailed
from .ranks import process_index


def run_worker(job, events, stop) -> None:
    """What every forked process runs: the ordinary one-process run (`session`); rank 0 also reports to the
    kernel over `events`, and `stop` is the kernel's stop event."""
    from .. import session

    rank = process_index()
    try:
        cfg = session.resolve_config(job.config, None, None, job.name)
        if rank == 0:
            events.put(("config", _portable_config(cfg)))
        run = session.train_in_process(cfg, name=job.name, namespace=job.namespace, display=None, resume=job.resume,
                                       cell=job.cell, stop=stop, callbacks=[_Forwarder(events)],
                                       check_rerun=False)  # fmt: skip
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


def rebuild_error(report: dict) -> BaseException:
    if report["type"] == "ConfigError":
        return ConfigError(report["message"], key=report["key"])
    if report["type"] == "TrainingFailed":
        return TrainingFailed(report["message"])
    return RuntimeError(f"worker process {report['rank']} failed with {report['type']}: {report['message']}\n\n"
                        f"Its traceback:\n{report['traceback']}")  # fmt: skip
