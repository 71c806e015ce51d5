"""The plain Python API that the magics, the CLI, the form and the tests all call.

    run = peft_magic.train({"model": "org/name", "data": {"train": df}, "train": {"max_steps": 100}})
    run.export("my-adapter")

`train` chooses one process (`session.train_in_process`: setup, then the loop, here or in a thread) or several
(`distributed.notebook.train_processes`). Setup always runs in the caller's thread so a mistake surfaces in the
cell as a `ConfigError`; only the loop itself moves to a thread with ``background=True``.
"""

from __future__ import annotations

from .errors import ConfigError
from .run import Run
from .session import default_output_dir, resolve_config  # noqa: F401 - part of the API
from .session import evaluate_run as evaluate  # noqa: F401 - part of the API


def train(config=None, *, namespace=None, callbacks=(), background=False, name="run", display="auto",
          resume=False, defaults=None, cell=None, overrides=None, replaces=None, overwrite=False, **kw) -> Run:  # fmt: skip
    """Fine-tune a model and return the `Run`.

    Args:
        config: A dict, YAML text, a YAML file path or a `Config`.
        namespace: Where ``$name`` data references are looked up (the notebook's variables).
        callbacks: Extra event subscribers (see `peft_magic.events`).
        background: Train in a thread and return at once (`run.wait()`, `run.stop()`).
        name: The run's name (default output folder ``peft_runs/NAME``).
        display: ``"auto"`` (live panel in notebooks, printed lines elsewhere), ``"none"``, or a subscriber.
        resume: Continue from the latest checkpoint in the output folder (True) or from a checkpoint path.
        overwrite: Replace the run the output folder holds (see `training.rerun`: an interrupted run of the same
            config is otherwise refused with the offer to resume, another config's run refused).
        defaults: Config values used where `config` is silent (e.g. the `%peft_model` base model).
        cell: The %%peft_train cell text, kept for the model card.
        overrides: ``["train.max_steps=10", ...]`` or ``{"train.max_steps": 10}``.
        replaces: A previous `Run` whose model is released once this run's data checks passed, just before the
            new model loads (a mistake in the cell therefore leaves the previous run untouched).
        **kw: Also overrides, with ``__`` for dots: ``train__max_steps=10``.
    """
    from . import session
    from .config.parse import requested_processes

    overrides = _merge_overrides(overrides, kw)
    if requested_processes(config, overrides, defaults) > 1:  # fork workers; this process relays
        # the workers check the config (checking it here imports peft, and a kernel that did cannot fork them)
        _check_not_running(replaces, name)
        from .distributed.notebook import train_processes

        return train_processes(config, overrides=overrides, defaults=defaults, namespace=namespace,
                               callbacks=callbacks, name=name, display=display, resume=resume, cell=cell,
                               background=background, replaces=replaces)  # fmt: skip
    cfg = resolve_config(config, overrides, defaults, name)  # the config, built once; mistakes fail fast here
    _check_not_running(replaces, name)
    session.check_idle()
    return session.train_in_process(cfg, name=name, namespace=namespace, callbacks=callbacks, display=display,
                                    background=background, resume=resume, cell=cell, replaces=replaces,
                                    overwrite=overwrite)  # fmt: skip


def _check_not_running(replaces, name) -> None:
    if replaces is not None and replaces.running:
        raise ConfigError(f"'{name}' is still training. Fix: {name}.stop() (or .wait()) first.")


def _merge_overrides(overrides, kw) -> list | dict:
    if not kw:
        return overrides or ()
    from .config.parse import iter_overrides

    merged = dict(overrides) if isinstance(overrides, dict) else dict(iter_overrides(overrides or ()))
    merged.update({k.replace("__", "."): v for k, v in kw.items()})
    return merged


def resume(run: Run, *, callbacks=(), background=False, display="auto", checkpoint=None) -> Run:
    """Continue `run` in place from its latest checkpoint (or `checkpoint`), with the model and data it holds.

    The weights, optimizer, scheduler, RNG state, data position and history all come from the checkpoint, so a
    stopped-then-resumed run ends where an uninterrupted one would. In a new kernel (no `Run` in memory), use
    ``%%peft_train NAME --resume`` or ``train(config, resume=True)`` instead.
    """
    from .session import resume_in_process

    return resume_in_process(run, callbacks=callbacks, background=background, display=display, checkpoint=checkpoint)


def load(path: str, device=None) -> Run:
    """Load an exported folder (peft adapter, peft_magic delta, or merged model) onto its base; returns a Run."""
    from .export.folder import load_export
    from .models import quiet_loading

    with quiet_loading():
        return load_export(path, device=device)
