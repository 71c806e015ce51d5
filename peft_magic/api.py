"""The plain Python API that the magics, the CLI, the form and the tests all call.

    run = peft_magic.train({"model": "org/name", "data": {"train": df}, "train": {"max_steps": 100}})
    run.export("my-adapter")

`train` = setup (check, load tokenizer, data, model, method) + `engine.fit`. Setup always runs in the caller's
thread so a mistake surfaces in the cell as a `ConfigError`; only the loop itself moves to a thread with
``background=True``.
"""

from __future__ import annotations

import os
import threading

from .config.objectives import OBJECTIVE_TASKS
from .config.schema import Config, parse_config
from .errors import ConfigError, TrainingFailed
from .events import EventBus
from .run import Run

_ACTIVE: set = set()  # background runs in progress (one at a time: two would fight over the device)


def default_output_dir(name: str) -> str:
    """Colab with Drive mounted: the Drive; Kaggle: /kaggle/working; elsewhere ./peft_runs/NAME beside the notebook
    (see `training.persistent`)."""
    from .training.persistent import default_root

    return os.path.join(default_root(), "peft_runs", name)


def resolve_config(config=None, overrides=None, defaults=None, name="run") -> Config:
    cfg = parse_config(config, overrides=overrides or (), defaults=defaults)
    if not cfg.train.output_dir:
        from .training.faults import check_run_name

        check_run_name(name)  # the default folder is peft_runs/NAME: no '..' or separators
        cfg.train.output_dir = default_output_dir(name)
    return cfg


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
    overrides = _merge_overrides(overrides, kw)
    from .distributed import launch

    if launch.requested_processes(config, overrides, defaults) > 1:  # fork workers; this process relays (launch.py)
        return launch.train_processes(config, overrides=overrides, defaults=defaults, namespace=namespace,
                                      callbacks=callbacks, name=name, display=display, resume=resume, cell=cell,
                                      background=background, replaces=replaces)  # fmt: skip
    cfg = resolve_config(config, overrides, defaults, name)
    if _ACTIVE:
        raise ConfigError(f"run '{next(iter(_ACTIVE)).name}' is still training in the background. Fix: "
                          "`.stop()` or `.wait()` it first; one run trains at a time.", key="--background")  # fmt: skip
    run = Run(name, cfg)
    run.cell = cell
    main = launch.is_main_process()  # under a launcher, only rank 0 reports (prints, panels, user callbacks)
    bus = EventBus(list(callbacks) if main else [])
    if main and display is not None and display != "none":
        sub = _make_display(display, run, background)
        if sub is not None:
            bus.add(sub)
    from .training import rerun

    resume_meta, replace = rerun.decide(cfg, resume, overwrite)  # at once: before any loading
    _setup_guarded(run, namespace, bus, replaces)
    if resume_meta is not None:
        resume_meta["method"] = run.method
    if main:
        rerun.begin(cfg, replace)
    return _start(run, bus, resume_meta, background)


def _merge_overrides(overrides, kw) -> list | dict:
    if not kw:
        return overrides or ()
    merged = dict(overrides) if isinstance(overrides, dict) else dict(_pairs(overrides or ()))
    merged.update({k.replace("__", "."): v for k, v in kw.items()})
    return merged


def _pairs(items):
    from .config.schema import _iter_overrides

    return list(_iter_overrides(items))


def _make_display(display, run, background):
    if not isinstance(display, str):
        return display
    from .ui import make_display

    # A blocking cell keeps the kernel busy, so a widget click would only arrive after the run: there the
    # kernel's interrupt button is the Stop (engine.SigintAsStop) and the panel's button says so.
    sub = make_display(stop=run.stop if background else None, mode=display)
    if sub is not None and hasattr(sub, "summary_extra"):
        sub.summary_extra = {"export": f"%peft_export {run.name} ./{run.name}-adapter"}
    return sub


def _find_resume(resume, cfg):
    if not resume:
        return None
    from .training import checkpoint

    path = resume if isinstance(resume, str) else checkpoint.latest_checkpoint(cfg.train.output_dir)
    if not path or not os.path.isfile(os.path.join(path, checkpoint.STATE_FILE)):
        raise ConfigError(f"no checkpoint to resume from in '{cfg.train.output_dir}'. Fix: run without --resume, "
                          "or set train.output_dir to the folder of the run to continue.", key="--resume")  # fmt: skip
    return checkpoint.load(path)


def _setup_guarded(run, namespace, bus, replaces):
    from .training.faults import is_out_of_memory, out_of_memory_failure

    try:
        setup(run, namespace, bus, replaces=replaces)
        return
    except BaseException as e:
        if not is_out_of_memory(e):
            raise
    raise out_of_memory_failure(run, "loading the model")  # outside `except`: no traceback keeps tensors alive


def setup(run: Run, namespace, bus: EventBus, replaces=None) -> Run:
    """Everything before the first step, cheapest checks first, so mistakes fail fast."""
    from accelerate.utils import set_seed

    from .training import forgetting
    from . import models
    from .data.prepare import prepare
    from .distributed.launch import main_process_first
    from .methods import get_method

    cfg, state = run.config, run.state
    models.check_model_source(cfg.model)
    models.check_quantization(cfg.model)
    _status(run, bus, "loading tokenizer")
    with models.quiet_loading(run.warnings):
        tokenizer = models.load_tokenizer(cfg.model)
    _status(run, bus, "tokenizing")
    with models.quiet_loading(run.warnings), main_process_first():  # rank 0 fills the caches, the others read
        data = prepare(cfg, tokenizer, namespace)
        probe = forgetting.attach(run, tokenizer, namespace, bus)  # None unless data.forgetting; bad text fails here
    if replaces is not None and replaces.model is not None:  # free the previous run's model for the new one,
        # once every mistake that can be found without weights was looked for
        from .training.faults import check_on_meta

        check_on_meta(cfg, data.labels)
        replaces.release()
    check = getattr(get_method(cfg.method.name), "check_before_loading", None)
    if check is not None:  # full fine-tuning refuses, with its estimate, a run that cannot fit: before loading
        check(cfg, data)
    run.preflight = _preflight(run, data)
    _status(run, bus, "loading model")
    set_seed(cfg.train.seed)  # a new task head (seq-cls, token-cls) is randomly initialised on load
    with models.quiet_loading(run.warnings):
        model = models.load_model(cfg.model, cfg.task, data.labels, pad_token_id=tokenizer.pad_token_id)
    method = get_method(cfg.method.name)
    if probe is not None:  # before apply: selective and full methods change the base weights in place
        probe.measure_base(model, method)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.model.quantization == "none" and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    from .training.objectives import keep_reference

    data.reference = keep_reference(cfg, model, method)  # dpo/grpo with a method without an adapter to disable
    set_seed(cfg.train.seed)  # adapter initialisation is part of what the seed reproduces
    with models.quiet_loading(run.warnings):
        model = method.apply(model, cfg, calibration=_calibration(data, cfg))
    run.model, run.tokenizer, run.method, run.data, run.labels = model, tokenizer, method, data, data.labels
    trainable, total = models.count_trainable(model, method)
    state.trainable_params, state.total_params = trainable, total
    state.output_dir = cfg.train.output_dir
    from .training.persistent import output_note

    state.output_note = output_note(cfg.train.output_dir)  # Drive / Kaggle: where checkpoints survive the session
    stats = (getattr(data, "stats", None) or {}).get("train")
    state.data_warning = stats.warning() if stats is not None else None  # rows cut by max_length, as the plan says
    state.title = title(cfg, trainable, total)
    return run


def _preflight(run, data):
    """The memory pre-flight before every run: warn (not refuse: it is an estimate) when the run looks too big
    for the device, with the first concrete setting that fits. Never blocks a run on its own failure."""
    import warnings

    from .devices import device_info
    from .preflight import check_fit, estimate_for_config

    cfg = run.config
    try:
        info = device_info()
        seq = min(cfg.data.max_length, max(int(1.5 * data.train_tokens / max(data.train_rows, 1)), 8))
        fit = check_fit(estimate_for_config(cfg, info, seq_len=seq), info,
                        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps)  # fmt: skip
    except Exception as e:  # noqa: BLE001 - an estimate for an exotic architecture must not stop training
        run.warnings.append(f"memory pre-flight skipped: {type(e).__name__}: {e}")
        return None
    if not fit.fits:
        advice = f" Try: {fit.suggestions[0]}" if fit.suggestions else ""
        warnings.warn(f"peft_magic: {fit.message}{advice}", stacklevel=3)
    return fit


def _calibration(data, cfg):
    def batches():
        from torch.utils.data import DataLoader

        return DataLoader(data.train.with_format("python"), batch_size=cfg.train.per_device_train_batch_size,
                          shuffle=False, collate_fn=data.collator)  # fmt: skip

    return batches


def title(cfg, trainable: int, total: int) -> str:
    from .methods import describe
    from .ui.format import build_title

    quant = {"4bit": "4-bit NF4", "8bit": "8-bit"}.get(cfg.model.quantization)
    return build_title(cfg.model.display_name, quant, describe(cfg.method), trainable, total)


def _status(run, bus, status):
    run.state.status = status
    bus.emit("on_status", run.state, status)


def resume(run: Run, *, callbacks=(), background=False, display="auto", checkpoint=None) -> Run:
    """Continue `run` in place from its latest checkpoint (or `checkpoint`), with the model and data it holds.

    The weights, optimizer, scheduler, RNG state, data position and history all come from the checkpoint, so a
    stopped-then-resumed run ends where an uninterrupted one would. In a new kernel (no `Run` in memory), use
    ``%%peft_train NAME --resume`` or ``train(config, resume=True)`` instead.
    """
    if run.running:
        raise ConfigError(f"'{run.name}' is still training. Fix: wait for it, or `.stop()` it first.", key=run.name)
    if run.model is None or run.data is None or run.method is None:
        raise ConfigError("this run holds no model to continue (it was released or failed to load). Fix: "
                          f"%%peft_train {run.name} --resume (or train(config, resume=True)) reloads it from the "
                          "checkpoint.", key=run.name)  # fmt: skip
    if _ACTIVE:
        raise ConfigError(f"run '{next(iter(_ACTIVE)).name}' is still training in the background. Fix: "
                          "`.stop()` or `.wait()` it first; one run trains at a time.", key="--background")  # fmt: skip
    meta = _find_resume(checkpoint or True, run.config)
    meta["method"] = run.method
    run._stop, run.error = threading.Event(), None
    run.state.stop_reason = run.state.error = None
    bus = EventBus(list(callbacks))
    if display is not None and display != "none":
        sub = _make_display(display, run, background)
        if sub is not None:
            bus.add(sub)
    from .training.forgetting import reattach

    reattach(run, bus)  # the resumed run's end is measured too
    return _start(run, bus, meta, background)


def _start(run: Run, bus: EventBus, resume_meta, background: bool) -> Run:
    """Run the loop here, or in a thread (one background run at a time, see `_ACTIVE`)."""
    if background:
        _ACTIVE.add(run)
        run._thread = threading.Thread(target=_fit_safely, args=(run, bus, resume_meta), daemon=True,
                                       name=f"peft_magic:{run.name}")  # fmt: skip
        run._thread.start()
        return run
    _fit(run, bus, resume_meta)
    return run


def _fit_safely(run, bus, resume_meta):
    try:
        _fit(run, bus, resume_meta)
    except BaseException as e:  # noqa: BLE001 - the thread must record, not lose, the error
        run.error = e
    finally:
        _ACTIVE.discard(run)


def _fit(run: Run, bus: EventBus, resume_meta=None) -> None:
    from functools import partial

    from .training.checkpoint import Checkpointer
    from .training.engine import fit
    from .training.evaluation import evaluate_model
    from .training.faults import is_out_of_memory, out_of_memory_failure

    cfg = run.config
    ckpt = Checkpointer(cfg.train.output_dir, run.method, cfg, cfg.train.save_steps, cfg.train.save_total_limit,
                        save_minutes=cfg.train.save_minutes)  # fmt: skip
    evaluate_fn = partial(_eval_fn, task=cfg.task, labels=run.labels)
    if cfg.task in OBJECTIVE_TASKS:
        from .training.objectives import evaluate_objective

        evaluate_fn = partial(evaluate_objective, cfg=cfg, data=run.data)
    out_of_memory = False
    try:
        run.model = fit(run.model, cfg, run.data, run.method, run.state, bus, run._stop, run.history,
                        checkpointer=ckpt, resume=resume_meta, evaluate_fn=evaluate_fn)  # fmt: skip
    except BaseException as e:
        out_of_memory = is_out_of_memory(e)
        if not out_of_memory:
            run.error = e
            if isinstance(e, TrainingFailed):
                e.run = run  # the cell keeps this run: it holds the weights of the last good step
            raise
    if out_of_memory:  # raised outside `except`, so no traceback keeps the activations alive
        raise out_of_memory_failure(run, "training")
    final = getattr(run.state, "_final_metrics", None)
    if final:
        run.metrics = final


def _eval_fn(model, dl, accelerator, task, labels):
    from .training.evaluation import evaluate_model

    return evaluate_model(model, dl, accelerator, task=task, labels=labels)


def evaluate(run: Run, data=None, namespace=None) -> dict:
    """Evaluate `run.model` on its eval split or on another source; the result lands in history and metrics."""
    from torch.utils.data import DataLoader

    from .data.prepare import check_rows, detect_kind, resolve, tokenize
    from .training.evaluation import evaluate_model

    if run.model is None:
        raise ConfigError("this run has no model to evaluate.", key=run.name)
    cfg = run.config
    if cfg.task in OBJECTIVE_TASKS:  # preference accuracy and margin, or greedy rewards (training/objectives.py)
        from .report import EvalMetrics
        from .training.objectives import evaluate_on

        metrics = EvalMetrics(evaluate_on(run, data, namespace))
        run.history.append({"step": run.state.step, **{f"eval_{k}": v for k, v in metrics.items()}})
        run.metrics = metrics
        return metrics
    if data is None:
        if run.data is None or run.data.eval is None:
            raise ConfigError("this run has no eval data. Fix: run.evaluate(data=...) or set `data.eval`.", key="data.eval")
        ds = run.data.eval
    else:
        raw = resolve(data, namespace, "data")
        kind = detect_kind(raw, cfg.data, cfg.task, key="data")
        check_rows(raw, kind, cfg.data, "data")
        if run.labels is not None:
            from .data.prepare import unseen_labels

            unknown = unseen_labels(raw, kind, cfg.data, run.labels)
            if unknown:
                raise ConfigError(f"labels {unknown[:5]} were not seen in training.", key="data")
        ds = tokenize(raw, run.tokenizer, cfg.data, kind, cfg.task, run.labels)
    from .training.packing import example_lengths
    from .training.sampling import longest_first

    dl = DataLoader(ds.with_format("python"), batch_size=cfg.train.per_device_eval_batch_size,
                    sampler=longest_first(example_lengths(ds)), collate_fn=run.data.collator if run.data else _collator(run))  # fmt: skip
    from .report import EvalMetrics

    metrics = EvalMetrics(evaluate_model(run.model, dl, None, task=cfg.task, labels=run.labels))  # shows itself
    row = {"step": run.state.step, **{f"eval_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}}
    run.history.append(row)
    run.metrics = metrics
    return metrics


def _collator(run):
    from .data.prepare import make_collator

    return make_collator(run.tokenizer, run.config.task)


def load(path: str, device=None) -> Run:
    """Load an exported folder (peft adapter, peft_magic delta, or merged model) onto its base; returns a Run."""
    from .export.folder import load_export
    from .models import quiet_loading

    with quiet_loading():
        return load_export(path, device=device)
