"""The dry run: what a run would do (model, method, data, plan, memory), without loading weights or training.

The architecture is built on the meta device, so counting a 7B model's parameters costs no memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Plan:
    """What `--dry-run` prints. `rows` is an ordered {label: text}."""

    config: object
    trainable: int = 0
    total: int = 0
    max_steps: int = 0
    rows: dict = field(default_factory=dict)
    memory: object = None  # preflight.MemoryEstimate, when available
    fit: object = None  # preflight.FitReport
    preview: object = None  # data.preview.Preview: the first training example, trained tokens highlighted
    details: list = field(default_factory=list)  # what the libraries warned or logged meanwhile (library_output)

    def text(self) -> str:
        width = max(len(k) for k in self.rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in self.rows.items())

    def __str__(self) -> str:
        return self.text()

    def _repr_pretty_(self, p, cycle):
        p.text(self.text())


def dry_run(config=None, *, namespace=None, defaults=None, name="run", overrides=None) -> Plan:
    """Resolve the config, read and tokenize the data, build the model on the meta device, count parameters and
    plan the steps. Trains nothing and loads no weights. The libraries' warnings go to `Plan.details`."""
    from .library_output import routed

    details = []
    with routed(details):
        plan = _plan(config, namespace, defaults, name, overrides)
    plan.details = details
    if details:
        noun = "message" if len(details) == 1 else "messages"
        plan.rows["details"] = f"{len(details)} library {noun} (transformers, peft, ...), kept in plan.details"
    return plan


def _plan(config, namespace, defaults, name, overrides) -> Plan:
    from . import models
    from .session import resolve_config
    from .data.prepare import prepare
    from .training.schedule import plan_steps
    from .methods import get_method, method_label
    from .ui.format import format_count, format_epochs, format_params

    cfg = resolve_config(config, overrides, defaults, name)
    models.check_model_source(cfg.model)
    models.check_quantization(cfg.model)
    tokenizer = models.load_tokenizer(cfg.model)
    with models.quiet_loading():
        data = prepare(cfg, tokenizer, namespace)
    model = models.build_empty(cfg.model, cfg.task, data.labels)
    arch = type(model).__name__
    _, total = models.count_parameters(model)
    base_total = total  # the model row counts the base model, as %peft_model does; the adapter adds to `total`
    method = get_method(cfg.method.name)
    trainable = None
    try:
        quant = cfg.model.quantization
        cfg.model.quantization = "none"  # kbit preparation needs real weights; counts are the same
        with models.quiet_loading():
            adapted = method.apply(model, cfg, calibration=None)
        trainable, total = models.count_trainable(adapted, method)
    except Exception:  # noqa: BLE001 - some methods need real weights to choose what trains
        pass
    finally:
        cfg.model.quantization = quant
    t = cfg.train
    max_steps, per_epoch = plan_steps(cfg, data.train_rows)
    from .devices import device_info, precision_choice
    from .training.sampling import decide

    grouped, why = decide(cfg, data.train)
    plan = Plan(config=cfg, trainable=trainable or 0, total=total, max_steps=max_steps)
    quant_text = {"4bit": " · 4-bit NF4, double quant", "8bit": " · 8-bit LLM.int8()"}.get(cfg.model.quantization, "")
    eval_text = f"eval {data.eval_rows:,} ({data.source_names['eval']})" if data.eval_rows else "no eval"
    plan.rows = {
        "model": f"{cfg.model.name_or_path}{' / ' + cfg.model.gguf_file if cfg.model.gguf_file else ''} "
        f"({arch}, {format_count(base_total)} params){quant_text}",
        **({"task": cfg.task_note} if getattr(cfg, "task_note", None) else {}),
        "method": f"{method_label(cfg.method)} · "
        + (format_params(trainable, total) if trainable else "trainable count known after loading"),
        "data": f"train {data.train_rows:,} rows ({data.source_names['train']}, {data.kind}) · {eval_text} · "
        f"max_length {cfg.data.max_length} · ~{format_count(data.train_tokens)} tokens/epoch",
        "plan": f"{max_steps:,} steps ({format_epochs(max_steps / per_epoch)}) · batch {t.per_device_train_batch_size} x "
        f"accum {t.gradient_accumulation_steps} · lr {t.learning_rate:g} {t.lr_scheduler_type} · "
        f"{_eval_schedule(t.eval_steps, max_steps, data.eval_rows, t.eval_samples)}output {t.output_dir}",
        "batches": ("length-grouped, in random order" if grouped else "shuffled") + f" · {why}",
        "precision": precision_choice(t.mixed_precision, device_info(), cfg.task, getattr(model, "config", None))[1],
    }
    _add_data_rows(plan, data)
    if cfg.task in ("dpo", "orpo", "grpo"):
        from .training.objectives import plan_rows

        plan.rows.update(plan_rows(cfg, data))
    if cfg.data.forgetting is not None:
        from .training.forgetting import source_label

        plan.rows["forgetting"] = f"base vs tuned loss on {source_label(cfg.data.forgetting)}"
    _add_memory(plan, cfg, model, trainable, data)
    return plan


def _eval_schedule(eval_steps, max_steps, eval_rows, samples=0) -> str:
    """``eval every 50 · `` only when there is an eval set and it comes before the end; the end always evaluates.
    With `eval.samples`: ``eval every 50 and at the end, with 4 sample answers · ``."""
    if not eval_rows:
        return ""
    answers = f", with {min(samples, eval_rows)} sample answers" if samples else ""
    if eval_steps and eval_steps < max_steps:
        return f"eval every {eval_steps} and at the end{answers} · "
    return f"eval at the end{answers} · "


def _add_data_rows(plan, data) -> None:
    """What the data is and what of it is trained: its format, chat template, lengths and cuts (data/preview.py)."""
    from .data.preview import split_summary

    rows = split_summary(data, "train")
    warning = data.stats["train"].warning() if data.stats.get("train") else None
    if warning:
        rows["warning"] = warning
    ordered = {}
    for k, v in plan.rows.items():  # right under the `data` row
        ordered[k] = v
        if k == "data":
            ordered.update(rows)
    plan.rows = ordered
    if data.kind in ("instruction", "chat", "completion"):
        plan.preview = data.preview(0)
        plan.preview.lines, plan.preview.warning = {}, None  # the plan's rows already say them


def _add_memory(plan, cfg, model, trainable, data) -> None:
    from .devices import device_info
    from .preflight import resolve_checkpointing

    avg_len = data.train_tokens / max(data.train_rows, 1)
    seq = min(cfg.data.max_length, max(int(avg_len * 1.5), 8))  # dynamic padding: batches pad to their longest
    info = device_info()
    choice = resolve_checkpointing(cfg, info, model_config=model.config, trainable_params=trainable, seq_len=seq)
    plan.memory, plan.fit = choice.estimate, choice.fit
    plan.rows["memory"] = choice.estimate.summary(info)
    plan.rows["checkpointing"] = f"gradient checkpointing {choice.line}"
    if info.kind == "cpu":
        from .allocator import hint

        line = hint()
        if line:
            plan.rows["allocator"] = line
    for s in plan.fit.suggestions[:3]:
        plan.rows.setdefault("try", s)
