"""One run in this process, from a resolved config to a trained model: the one place that sequences a run.

`api.train` (one process), every worker of a multi-process run (`distributed/worker.py`) and `api.resume` go
through here: check that nothing else trains, wire the display, set up (cheapest checks first, in the caller's
thread so a mistake surfaces in the cell as a `ConfigError`), then fit here or in a background thread.

    cfg = resolve_config(config, overrides, defaults, name)   # the config, built once
    check_idle()                                               # one background run at a time
    run = train_in_process(cfg, name=name, ...)                # setup + fit (+ display, + thread)
"""

from __future__ import annotations

import os
import threading

from .config.objectives import OBJECTIVE_TASKS
from .config.parse import build_config, raw_config
from .config.schema import Config
from .errors import ConfigError, TrainingFailed
from .events import EventBus
from .run import Run

BACKGROUND_RUNS: set = set()  # background runs in progress (one at a time: two would fight over the device)


def default_output_dir(name: str) -> str:
    """Colab with Drive mounted: the Drive; Kaggle: /kaggle/working; elsewhere ./peft_runs/NAME beside the notebook
    (see `training.persistent`)."""
    from .training.persistent import default_root

    return os.path.join(default_root(), "peft_runs", name)


def resolve_config(config=None, overrides=None, defaults=None, name="run") -> Config:
    """The run's validated `Config`, with its output folder (``peft_runs/NAME`` unless set)."""
    raw = raw_config(config, overrides or (), defaults)
    cfg = build_config(raw)
    if "task" not in raw and not isinstance(config, Config):
        from . import models

        inferred = models.infer_task(cfg, raw)
        if inferred:  # built again, so that every check sees the task; the plan says why, saved configs hold it
            raw["task"], note = inferred
            cfg = build_config(raw)
            cfg.task_note = note
    if not cfg.train.output_dir:
        from .config.checks import check_run_name

        check_run_name(name)  # the default folder is peft_runs/NAME: no '..' or separators
        cfg.train.output_dir = default_output_dir(name)
    return cfg


def check_idle(why="one run trains at a time", key="--background") -> None:
    """Refuse a second run while one trains in the background (they would fight over the device)."""
    if BACKGROUND_RUNS:
        raise ConfigError(f"run '{next(iter(BACKGROUND_RUNS)).name}' is still training in the background. Fix: "
                          f"`.stop()` or `.wait()` it first; {why}.", key=key)  # fmt: skip


def make_bus(run: Run, callbacks=(), display="auto", background=False, report=True) -> EventBus:
    """The run's event bus: the user's callbacks and the display (live panel or printed lines).

    Args:
        display: ``"auto"``, ``"none"``/None, or a subscriber object.
        background: The run trains in a thread (then the panel's Stop button stops it).
        report: False on the ranks other than 0 of a launched run: only rank 0 prints and calls callbacks.
    """
    bus = EventBus(list(callbacks) if report else [])
    if report and display is not None and display != "none":
        sub = _display(display, run, background)
        if sub is not None:
            bus.add(sub)
    return bus


def _display(display, run, background):
    if not isinstance(display, str):
        return display
    from .ui import make_display

    # A blocking cell keeps the kernel busy, so a widget click would only arrive after the run: there the
    # kernel's interrupt button is the Stop (stopping.SigintAsStop) and the panel's button says so.
    sub = make_display(stop=run.stop if background else None, mode=display)
    if sub is not None and hasattr(sub, "summary_extra"):
        sub.summary_extra = {"export": f"%peft_export {run.name} ./{run.name}-adapter"}
    return sub


def find_resume(resume, cfg):
    """The checkpoint to continue from (`resume`: True for the latest in the output folder, or a path), loaded;
    None when not resuming."""
    if not resume:
        return None
    from .training import checkpoint

    path = resume if isinstance(resume, str) else checkpoint.latest_checkpoint(cfg.train.output_dir)
    if not path or not os.path.isfile(os.path.join(path, checkpoint.STATE_FILE)):
        raise ConfigError(f"no checkpoint to resume from in '{cfg.train.output_dir}'. Fix: run without --resume, "
                          "or set train.output_dir to the folder of the run to continue.", key="--resume")  # fmt: skip
    return checkpoint.load(path)


def in_background(run: Run, work, exclusive=True) -> Run:
    """Run `work()` in a daemon thread; its error is recorded on the run (`run.wait()` re-raises it).

    Args:
        exclusive: Count the run in `BACKGROUND_RUNS` (so `check_idle` refuses another) until `work` ends.
    """
    if exclusive:
        BACKGROUND_RUNS.add(run)

    def body():
        try:
            work()
        except BaseException as e:  # noqa: BLE001 - the thread must record, not lose, the error
            run.error = e
        finally:
            BACKGROUND_RUNS.discard(run)

    run._thread = threading.Thread(target=body, daemon=True, name=f"peft_magic:{run.name}")
    run._thread.start()
    return run


def train_in_process(cfg: Config, *, name="run", namespace=None, callbacks=(), display="auto", background=False,
                     resume=False, cell=None, replaces=None, overwrite=False, stop=None, check_rerun=True) -> Run:  # fmt: skip
    """Set up and train one run in this process (see `api.train` for the arguments).

    Args:
        stop: The stop event to use (a worker's is shared with the kernel); default: the run's own.
        check_rerun: Decide what happens to a run already in the output folder (`training.rerun`: continue,
            refuse or replace). False: only resume when asked (the notebook launcher's workers, as before).
    """
    from .distributed.ranks import is_main_process

    run = Run(name, cfg)
    run.cell = cell
    if stop is not None:
        run._stop = stop
    # under a launcher, only rank 0 reports (prints, panels, user callbacks)
    main = is_main_process()
    bus = make_bus(run, callbacks, display, background, report=main)
    if check_rerun:
        from .training import rerun

        resume_meta, replace = rerun.decide(cfg, resume, overwrite)  # at once: before any loading
    else:
        resume_meta, replace = find_resume(resume, cfg), False
    # `gradient_checkpointing: auto` is decided by the pre-flight in `setup`; a resumed run keeps its choice
    cfg.train.auto_checkpointing = (resume_meta or {}).get("gradient_checkpointing")
    from .library_output import routed

    with routed(run.warnings):  # the libraries' warnings, logs and bars go to the run's details, not the cell
        setup_guarded(run, namespace, bus, replaces)
    if resume_meta is not None:
        resume_meta["method"] = run.method
    if main and check_rerun:
        rerun.begin(cfg, replace)
    return start(run, bus, resume_meta, background)


def start(run: Run, bus: EventBus, resume_meta, background: bool) -> Run:
    """Run the loop here, or in a thread (one background run at a time, see `check_idle`)."""
    from .library_output import routed

    def work():
        with routed(run.warnings):
            fit(run, bus, resume_meta)

    if background:
        return in_background(run, work)
    work()
    return run


def setup_guarded(run, namespace, bus, replaces=None):
    """`setup`, with running out of memory while loading turned into a `TrainingFailed` that says what to try."""
    from .training.guards import is_out_of_memory, out_of_memory_failure

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

    from . import models
    from .data.prepare import prepare
    from .distributed.ranks import main_process_first
    from .methods import get_method
    from .training import forgetting

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
        from .methods.meta_check import check_on_meta

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
    if cfg.train.checkpointing:  # as written, or as the pre-flight decided `auto`
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
    """The memory pre-flight before every run: decide `train.gradient_checkpointing: auto` (on only when the run
    needs it to fit, said in one line), and warn (not refuse: it is an estimate) when the run looks too big for the
    device, with the first concrete setting that fits. Never blocks a run on its own failure."""
    import warnings

    from .devices import device_info
    from .distributed.ranks import from_main_process, is_main_process
    from .preflight import resolve_checkpointing

    cfg = run.config
    try:
        info = device_info()
        seq = min(cfg.data.max_length, max(int(1.5 * data.train_tokens / max(data.train_rows, 1)), 8))
        choice = resolve_checkpointing(cfg, info, seq_len=seq)
    except Exception as e:  # noqa: BLE001 - an estimate for an exotic architecture must not stop training
        run.warnings.append(f"memory pre-flight skipped: {type(e).__name__}: {e}")
        choice = None
    if cfg.train.gradient_checkpointing == "auto":  # what the model is set up with, and what checkpoints record;
        # every process of a launched run takes rank 0's choice (their free memory differs a little)
        cfg.train.auto_checkpointing = from_main_process(choice.on if choice else bool(cfg.train.auto_checkpointing))
    if choice is None:
        return None
    if choice.auto and choice.on and is_main_process():
        warnings.warn(f"peft_magic: gradient checkpointing {choice.line}", stacklevel=3)
    fit_report = choice.fit
    if not fit_report.fits:
        advice = f" Try: {fit_report.suggestions[0]}" if fit_report.suggestions else ""
        warnings.warn(f"peft_magic: {fit_report.message}{advice}", stacklevel=3)
    return fit_report


def _calibration(data, cfg):
    def batches():
        from torch.utils.data import DataLoader

        return DataLoader(data.train.with_format("python"), batch_size=cfg.train.per_device_train_batch_size,
                          shuffle=False, collate_fn=data.collator)  # fmt: skip

    return batches


def title(cfg, trainable: int, total: int) -> str:
    from .methods import method_label
    from .ui.format import build_title

    quant = {"4bit": "4-bit NF4", "8bit": "8-bit"}.get(cfg.model.quantization)
    return build_title(cfg.model.display_name, quant, method_label(cfg.method), trainable, total)


def _status(run, bus, status):
    run.state.status = status
    bus.emit("on_status", run.state, status)


def fit(run: Run, bus: EventBus, resume_meta=None) -> None:
    """Train the set-up run (`setup`) in this thread: the loop, its checkpoints and evaluation; running out of
    memory becomes a `TrainingFailed` that frees the model and says what to try."""
    from functools import partial

    from .training.checkpoint import Checkpointer
    from .training.engine import fit as fit_loop
    from .training.guards import is_out_of_memory, out_of_memory_failure

    cfg = run.config
    ckpt = Checkpointer(cfg.train.output_dir, run.method, cfg, cfg.train.save_steps, cfg.train.save_total_limit,
                        save_minutes=cfg.train.save_minutes)  # fmt: skip
    evaluate_fn = partial(_eval_fn, task=cfg.task, labels=run.labels)
    if cfg.task in OBJECTIVE_TASKS:
        from .training.objectives import evaluate_objective

        evaluate_fn = partial(evaluate_objective, cfg=cfg, data=run.data)
    out_of_memory = False
    try:
        run.model = fit_loop(run.model, cfg, run.data, run.method, run.state, bus, run._stop, run.history,
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


def evaluate_run(run: Run, data=None, namespace=None) -> dict:
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


def resume_in_process(run: Run, *, callbacks=(), background=False, display="auto", checkpoint=None) -> Run:
    """Continue `run` in place from its latest checkpoint (or `checkpoint`), with the model and data it holds."""
    if run.running:
        raise ConfigError(f"'{run.name}' is still training. Fix: wait for it, or `.stop()` it first.", key=run.name)
    if run.model is None or run.data is None or run.method is None:
        raise ConfigError("this run holds no model to continue (it was released or failed to load). Fix: "
                          f"%%peft_train {run.name} --resume (or train(config, resume=True)) reloads it from the "
                          "checkpoint.", key=run.name)  # fmt: skip
    check_idle()
    meta = find_resume(checkpoint or True, run.config)
    meta["method"] = run.method
    run._stop, run.error = threading.Event(), None
    run.state.stop_reason = run.state.error = None
    bus = make_bus(run, callbacks, display, background)
    from .training.forgetting import reattach

    reattach(run, bus)  # the resumed run's end is measured too
    return start(run, bus, meta, background)
