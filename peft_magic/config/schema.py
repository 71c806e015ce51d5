"""The run's configuration: one set of dataclasses, the single source of truth.

The `%%peft_train` YAML body, `--set key=value`, the CLI's YAML file, the widget form and the `peft_magic.yaml`
saved beside every adapter all map onto `Config`. Names follow peft and `transformers.TrainingArguments` where
those exist, so users can paste values from their docs.

Parsing never evaluates anything: YAML is loaded with `yaml.safe_load`, and `$name` strings are looked up (not
evaluated) in the notebook's namespace when the data is loaded.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from ..errors import ConfigError, did_you_mean
from .objectives import OBJECTIVE_TASKS, SECTIONS as OBJECTIVE_SECTIONS, DPOConfig, GRPOConfig, ORPOConfig

TASKS = ("causal-lm", "seq-cls", "token-cls", "seq2seq", *OBJECTIVE_TASKS)
QUANTIZATIONS = ("none", "4bit", "8bit")
DTYPES = ("auto", "float32", "bfloat16", "float16")
MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")
GROUPINGS = ("auto", "true", "false")
KERNELS = ("auto", "chunked", "none")
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)


DATA_FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "prompt_response", "text")
DATA_FORMAT_ALIASES = {"openai": "messages", "chat": "messages", "conversations": "sharegpt",
                       "instruction": "prompt_response", "completion": "prompt_completion", "plain": "text"}  # fmt: skip
TRAIN_ON = ("assistant", "last", "all")
RESUMES = ("ask", "auto")


def _name(value) -> str:
    """A choice as written (``Prompt-Completion``) -> its spelling here (``prompt_completion``)."""
    return str(value).strip().lower().replace("-", "_")


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class ModelConfig:
    """The base model."""

    name_or_path: str = field(
        default="", metadata=_help("Hub id (org/name), a local model folder, or a .gguf file.")
    )
    quantization: str = field(
        default="none",
        metadata=_help(
            "Load the base in 4bit (bitsandbytes NF4 + double quant: QLoRA) or 8bit (LLM.int8()).",
            choices=QUANTIZATIONS,
        ),
    )
    dtype: str = field(
        default="auto",
        metadata=_help("Weights dtype: auto (bf16/fp16 on GPU, float32 on CPU) or an explicit one.", choices=DTYPES),
    )
    trust_remote_code: bool = field(
        default=False, metadata=_help("Run code shipped with a hub model. Off unless you trust its authors.")
    )
    gguf_file: Optional[str] = field(
        default=None,
        metadata=_help("GGUF file inside name_or_path (set automatically when name_or_path ends in .gguf)."),
    )
    revision: Optional[str] = field(default=None, metadata=_help("Hub revision (branch, tag or commit)."))

    def validate(self) -> None:
        if not self.name_or_path:
            raise ConfigError(
                "no base model given. Fix: add `model: <hub id or folder>` to the cell, or run `%peft_model NAME` first.",
                key="model",
            )
        _check_choice(self.quantization, QUANTIZATIONS, "model.quantization")
        _check_choice(self.dtype, DTYPES, "model.dtype")
        if self.name_or_path.lower().endswith(".gguf") and self.gguf_file is None:
            folder, file = os.path.split(self.name_or_path)
            self.name_or_path, self.gguf_file = folder or ".", file
        if self.gguf_file and self.quantization != "none":
            raise ConfigError(
                "a GGUF model is dequantized on load and cannot be re-quantized with bitsandbytes. "
                "Fix: set `quantization: none`, or use the original (non-GGUF) model for QLoRA.",
                key="model.quantization",
            )

    @property
    def display_name(self) -> str:
        base = self.gguf_file or self.name_or_path.rstrip("/")
        return os.path.basename(base) if os.path.sep in base and os.path.exists(self.name_or_path) else base


@dataclass
class MethodConfig:
    """The PEFT method and its parameters (peft's own config names)."""

    name: str = field(default="lora", metadata=_help("PEFT method: lora, dora, qlora, ia3, prompt-tuning, ..."))
    params: dict = field(
        default_factory=dict,
        metadata=_help("The method's parameters, with peft's names (e.g. r, lora_alpha, target_modules)."),
    )

    def validate(self) -> None:
        from ..methods import get_method  # light: the registry imports peft only when a method is applied

        self.name = str(self.name).strip().lower().replace("_", "-")
        get_method(self.name).check_params(self.params)


@dataclass
class DataConfig:
    """Training and evaluation data."""

    train: Any = field(
        default=None,
        metadata=_help(
            "$variable (DataFrame, list of dicts, datasets.Dataset), a local file (.csv .json .jsonl .parquet "
            ".txt) or a hub dataset id."
        ),
    )
    eval: Any = field(
        default=None,
        metadata=_help("A fraction of train to hold out (e.g. 0.1), a $variable, a file, a hub dataset, or null."),
    )
    text_column: str = field(default="text", metadata=_help("Column holding the input text."))
    label_column: str = field(default="label", metadata=_help("Column holding the label (seq-cls)."))
    prompt_column: str = field(default="prompt", metadata=_help("Instruction data: the prompt column."))
    response_column: str = field(default="response", metadata=_help("Instruction data: the response column."))
    messages_column: str = field(default="messages", metadata=_help("Chat data: a list of {role, content}."))
    max_length: int = field(default=256, metadata=_help("Tokens per example; longer ones are truncated."))
    split: str = field(default="train", metadata=_help("Split of a hub dataset to read for train."))
    max_samples: Optional[int] = field(default=None, metadata=_help("Use at most this many training rows."))
    tokens_column: str = field(default="tokens", metadata=_help("token-cls: the column holding each row's words (a list)."))
    tags_column: str = field(default="tags", metadata=_help("token-cls: one tag per word (a list of names or ids)."))
    packing: bool = field(
        default=False,
        metadata=_help("causal-lm: pack each batch into one row without padding (same loss, less compute)."),
    )
    cache_tokenized: bool = field(
        default=True, metadata=_help("Reuse the tokenized data of an earlier run with the same data and tokenizer.")
    )
    forgetting: Any = field(
        default=None,
        metadata=_help("General text unrelated to the task (`default`: the offline text shipped with peft_magic; or "
                       "a $variable, file or hub dataset): the base and tuned models' loss on it measures forgetting."),
    )  # fmt: skip
    # ---- data shapes and what is trained (issue 16)
    format: str = field(
        default="auto",
        metadata=_help("causal-lm data shape: auto (detected from the columns), messages (role/content lists), "
                       "sharegpt (conversations of from/value), alpaca (instruction/input/output), "
                       "prompt_completion (TRL), prompt_response, text. Set it when two fit.", choices=DATA_FORMATS),
    )  # fmt: skip
    chat_template: Optional[str] = field(
        default=None,
        metadata=_help("Chat template for conversations when the tokenizer has none (or to replace its own): "
                       "chatml, llama3, mistral, gemma, zephyr, a Jinja string or a .jinja file. Saved with the "
                       "exported tokenizer and used by %peft_generate."),
    )  # fmt: skip
    train_on: str = field(
        default="assistant",
        metadata=_help("What a conversation trains: assistant (every assistant turn), last (the final assistant "
                       "turn) or all (every token, prompts included).", choices=TRAIN_ON),
    )  # fmt: skip

    def validate(self) -> None:
        self.format = DATA_FORMAT_ALIASES.get(_name(self.format), _name(self.format))
        _check_choice(self.format, DATA_FORMATS, "data.format")
        self.train_on = _name(self.train_on)
        _check_choice(self.train_on, TRAIN_ON, "data.train_on")
        if self.train is None or (isinstance(self.train, str) and not self.train.strip()):
            raise ConfigError(
                "no training data. Fix: add `data: {train: $my_dataframe}` (or a file path / hub dataset id).",
                key="data.train",
            )
        _check_positive(self.max_length, "data.max_length")
        if self.max_samples is not None:
            _check_positive(self.max_samples, "data.max_samples")
        if isinstance(self.eval, float) and not 0.0 < self.eval < 1.0:
            raise ConfigError(
                f"a held-out fraction must be between 0 and 1, got {self.eval}. Fix: e.g. `eval: 0.1`, or `eval: null`.",
                key="data.eval",
            )


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping (transformers.TrainingArguments names)."""

    max_steps: int = field(default=-1, metadata=_help("Optimizer steps to run; -1 means use num_train_epochs."))
    num_train_epochs: float = field(default=1.0, metadata=_help("Epochs over train, when max_steps is -1."))
    learning_rate: float = field(default=2e-4, metadata=_help("Peak learning rate."))
    per_device_train_batch_size: int = field(default=8, metadata=_help("Examples per step per device."))
    per_device_eval_batch_size: int = field(default=16, metadata=_help("Examples per eval batch per device."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Micro-batches per optimizer step."))
    lr_scheduler_type: str = field(default="linear", metadata=_help("Schedule shape.", choices=SCHEDULERS))
    warmup_ratio: float = field(default=0.0, metadata=_help("Fraction of steps spent warming up."))
    warmup_steps: int = field(default=0, metadata=_help("Warm-up steps (overrides warmup_ratio when > 0)."))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Gradient clipping norm (0 disables)."))
    seed: int = field(default=0, metadata=_help("Seed for weights init, data order and dropout."))
    mixed_precision: str = field(
        default="auto",
        metadata=_help("auto: bf16 where supported, fp16 on GPUs without bf16, no on CPU.", choices=MIXED_PRECISIONS),
    )
    gradient_checkpointing: bool = field(default=False, metadata=_help("Trade compute for activation memory."))
    logging_steps: int = field(default=10, metadata=_help("Log train loss every N steps."))
    eval_steps: int = field(default=50, metadata=_help("Evaluate every N steps (0: only at the end)."))
    save_steps: int = field(default=0, metadata=_help("Checkpoint every N steps (0: only at the end or on stop)."))
    save_total_limit: int = field(default=2, metadata=_help("Keep at most this many checkpoints."))
    save_minutes: float = field(
        default=0.0, metadata=_help("Also checkpoint every N minutes (0: off), e.g. 10 on Colab/Kaggle sessions.")
    )
    resume: str = field(
        default="ask",
        metadata=_help("When the output folder holds an interrupted run of this config: ask (refuse, offering "
                       "--resume) or auto (resume it without asking).", choices=RESUMES),
    )  # fmt: skip
    max_time: Optional[str] = field(
        default=None,
        metadata=_help("Time budget: stop gracefully, with a checkpoint, before it runs out (e.g. 11h30m on a 12-hour "
                       "Colab session, 90m, 45s); --resume continues in the next session."),
    )  # fmt: skip
    group_by_length: str = field(
        default="auto",
        metadata=_help("Batch examples of similar length (less padding), batches in random order. auto: when random "
                       "batches would be >= 10% padding and, for classifiers, lengths do not differ by label.",
                       choices=GROUPINGS),
    )  # fmt: skip
    kernels: str = field(
        default="auto",
        metadata=_help("Causal-LM loss: auto/chunked computes the output layer and cross-entropy only at trained "
                       "positions, in chunks (no positions x vocab logits); none: the model's own loss.",
                       choices=KERNELS),
    )  # fmt: skip
    output_dir: Optional[str] = field(default=None, metadata=_help("Where checkpoints go (default: peft_runs/NAME)."))
    report_to: list = field(default_factory=list, metadata=_help("Extra trackers (accelerate names), e.g. [tensorboard]."))
    num_processes: int = field(
        default=1,
        metadata=_help("Processes (one per GPU) to train on. > 1 in a notebook or script: started with accelerate's "
                       "notebook_launcher. Under `accelerate launch` the launcher decides and this is ignored."),
    )  # fmt: skip

    def validate(self) -> None:
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(
                f"must be a positive number of steps (or -1 to use num_train_epochs), got {self.max_steps}.",
                key="train.max_steps",
            )
        if self.max_steps == -1:
            _check_positive(self.num_train_epochs, "train.num_train_epochs")
        _check_positive(self.learning_rate, "train.learning_rate")
        for k in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            _check_positive(getattr(self, k), f"train.{k}")
        for k in ("logging_steps", "num_processes"):
            _check_positive(getattr(self, k), f"train.{k}")
        for k in ("eval_steps", "save_steps", "warmup_steps", "weight_decay", "max_grad_norm", "save_total_limit",
                  "save_minutes"):  # fmt: skip
            if getattr(self, k) < 0:
                raise ConfigError(f"must be >= 0, got {getattr(self, k)}.", key=f"train.{k}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"must be in [0, 1), got {self.warmup_ratio}.", key="train.warmup_ratio")
        _check_choice(self.lr_scheduler_type, SCHEDULERS, "train.lr_scheduler_type")
        _check_choice(self.mixed_precision, MIXED_PRECISIONS, "train.mixed_precision")
        _check_choice(self.group_by_length, GROUPINGS, "train.group_by_length")
        _check_choice(self.kernels, KERNELS, "train.kernels")
        from ..training.deadline import parse_duration

        parse_duration(self.max_time)
        self.resume = _name(self.resume)
        _check_choice(self.resume, RESUMES, "train.resume")
        if not 0 <= self.seed < 2**32:  # numpy's limit (set_seed seeds numpy too)
            raise ConfigError(f"must be between 0 and 4294967295, got {self.seed}.", key="train.seed")


@dataclass
class Config:
    """Everything one training run needs. Build it with `parse_config`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: str = field(default="causal-lm", metadata=_help("What the model learns.", choices=TASKS))
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)  # read for task: dpo only (config/objectives.py), as
    orpo: ORPOConfig = field(default_factory=ORPOConfig)  # are orpo and grpo for their tasks
    grpo: GRPOConfig = field(default_factory=GRPOConfig)

    def validate(self) -> "Config":
        _check_choice(self.task, TASKS, "task")
        if self.task in OBJECTIVE_TASKS:
            getattr(self, self.task).validate()
        self.model.validate()
        self.method.validate()
        self.data.validate()
        self.train.validate()
        from ..methods import get_method

        get_method(self.method.name).check_compatible(self)
        if self.data.packing and self.task != "causal-lm":
            raise ConfigError(f"packing joins examples for causal-lm only, not {self.task}. Fix: remove "
                              "`data.packing` (`train.group_by_length`, on by default, already cuts padding).", key="data.packing")  # fmt: skip
        from ..training.forgetting import check_config

        check_config(self)
        return self

    def to_dict(self, minimal: bool = False) -> dict:
        """A plain, YAML-safe dict; objects given as data are shown as a placeholder, never serialised."""
        out = {}
        default = Config()
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in OBJECTIVE_SECTIONS and f.name != self.task:
                continue  # a dpo run saves its dpo section only; supervised runs none
            if dataclasses.is_dataclass(value):
                section = {}
                for sf in fields(value):
                    v = getattr(value, sf.name)
                    if minimal and v == getattr(getattr(default, f.name), sf.name) and sf.name != "name_or_path":
                        continue
                    section[sf.name] = _plain(v)
                if f.name == "method":
                    section = {"name": value.name, **{k: _plain(v) for k, v in value.params.items()}}
                if minimal and f.name == "model" and list(section) == ["name_or_path"]:
                    section = section["name_or_path"]
                if minimal and f.name == "method" and list(section) == ["name"]:
                    section = section["name"]
                if section or not minimal:
                    out[f.name] = section
            elif not (minimal and value == getattr(default, f.name)):
                out[f.name] = _plain(value)
        return out

    def to_yaml(self, minimal: bool = False) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(minimal=minimal), sort_keys=False, default_flow_style=False)


# ---------------------------------------------------------------- parsing

SECTIONS = {"model": ModelConfig, "method": MethodConfig, "data": DataConfig, "train": TrainConfig,
            **OBJECTIVE_SECTIONS}  # fmt: skip
ALIASES = {
    "train": {
        "batch_size": "per_device_train_batch_size",
        "eval_batch_size": "per_device_eval_batch_size",
        "epochs": "num_train_epochs",
        "lr": "learning_rate",
        "steps": "max_steps",
        "grad_accum": "gradient_accumulation_steps",
        "scheduler": "lr_scheduler_type",
    },
    "model": {"name": "name_or_path", "path": "name_or_path", "quantize": "quantization", "torch_dtype": "dtype"},
}
QUANT_ALIASES = {"4": "4bit", "4-bit": "4bit", "nf4": "4bit", "8": "8bit", "8-bit": "8bit", "int8": "8bit",
                 "no": "none", "false": "none", "off": "none", "null": "none", "None": "none"}  # fmt: skip


def parse_config(source=None, overrides=(), defaults: dict | None = None) -> Config:
    """Build and validate a `Config`.

    Args:
        source: A dict, a YAML string, a path to a YAML file, an existing `Config`, or None.
        overrides: ``"section.key=value"`` strings (the value is read as YAML) or a dict of them.
        defaults: Values used where the source says nothing, e.g. ``{"model": "org/name"}`` from `%peft_model`.

    Raises:
        ConfigError: naming the key and the fix, for any mistake.
    """
    return build_config(raw_config(source, overrides, defaults))


def raw_config(source=None, overrides=(), defaults: dict | None = None) -> dict:
    """`parse_config` before validation: the merged mapping (validating a method imports peft; a notebook that
    forks worker processes must not, see `distributed/notebook.py`)."""
    if isinstance(source, Config):
        raw = source.to_dict()
        raw["data"].update({"train": source.data.train, "eval": source.data.eval, "forgetting": source.data.forgetting})
        if "grpo" in raw:
            raw["grpo"]["rewards"] = list(source.grpo.rewards)  # functions, not their placeholders
    else:
        raw = load_mapping(source)
    for key, value in (defaults or {}).items():
        raw.setdefault(key, value)
    for key, value in iter_overrides(overrides):
        _set_dotted(raw, key, value)
    return raw


def load_mapping(source) -> dict:
    """YAML text, a YAML file path, a dict or None -> dict (safe YAML only)."""
    import yaml

    if source is None:
        return {}
    if isinstance(source, dict):
        _check_acyclic(source, "config")
        return _deepcopy_plain(source)
    if isinstance(source, os.PathLike) or (isinstance(source, str) and "\n" not in source and source.strip().endswith((".yaml", ".yml", ".json"))):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ConfigError(f"config file '{path}' does not exist. Fix: check the path.", key="--config")
        with open(path, encoding="utf-8") as fh:
            source = fh.read()
    if not isinstance(source, str):
        raise ConfigError(f"a config must be a dict, YAML text or a file path, not {type(source).__name__}.")
    try:
        data = yaml.safe_load(source)
    except yaml.YAMLError as e:
        mark, ctx = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        if ctx is not None and (mark is None or ctx.line != mark.line):
            where += f" (in the value that starts at line {ctx.line + 1})"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(
            f"the YAML cannot be read{where}: {problem}. Fix: check indentation and that `key: value` pairs use "
            "a space after the colon.",
            key="yaml",
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"the cell must be a YAML mapping of keys (model, task, method, data, train), got {type(data).__name__}.",
            key="yaml",
        )
    return data


def build_config(raw: dict) -> Config:
    """dict -> validated Config; unknown keys and wrong types raise ConfigError with a 'did you mean'."""
    _check_acyclic(raw, "yaml")
    raw = dict(raw)
    if "eval" in raw:
        from ..training.forgetting import fold_eval_section

        raw = fold_eval_section(raw)  # `eval: {forgetting: SOURCE}` is `data: {forgetting: SOURCE}`
    top = {f.name for f in fields(Config)}
    for key in raw:
        if key in ("compare", "sweep"):
            raise ConfigError("trains several variants: use a `%%peft_compare NAME` cell, or peft_magic.compare(config), "
                              "instead of %%peft_train / train().", key=key)  # fmt: skip
        if not isinstance(key, str) or key not in top:
            raise ConfigError(
                f"unknown key.{did_you_mean(key, top)} Valid top-level keys: {', '.join(sorted(top))}.", key=str(key)
            )
    cfg = Config()
    if "task" in raw:
        cfg.task = _coerce(raw["task"], str, "task")
    for name, cls in SECTIONS.items():
        if name not in raw or raw[name] is None:
            continue
        value = raw[name]
        if name == "model" and isinstance(value, str):
            value = {"name_or_path": value}
        if name == "method":
            setattr(cfg, name, _build_method(value))
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping of keys, got {type(value).__name__} ({value!r}).", key=name)
        setattr(cfg, name, _build_section(cls, value, name))
    return cfg.validate()


def _build_method(value) -> MethodConfig:
    if isinstance(value, str):
        return MethodConfig(name=value)
    if not isinstance(value, dict):
        raise ConfigError(f"expected a method name or a mapping, got {type(value).__name__}.", key="method")
    value = dict(value)
    name = value.pop("name", None)
    if "params" in value and isinstance(value["params"], dict):
        value.update(value.pop("params"))
    if not name:
        raise ConfigError("a method mapping needs `name`, e.g. `method: {name: lora, r: 8}`.", key="method.name")
    return MethodConfig(name=_coerce(name, str, "method.name"), params=value)


def _build_section(cls, values: dict, section: str):
    known = {f.name: f for f in fields(cls)}
    aliases = ALIASES.get(section, {})
    kwargs = {}
    for key, value in values.items():
        key = aliases.get(key, key)
        if key not in known:
            raise ConfigError(
                f"unknown key.{did_you_mean(key, list(known) + list(aliases))} Valid keys: {', '.join(known)}.",
                key=f"{section}.{key}",
            )
        if section == "model" and key == "quantization" and value is not None:
            value = QUANT_ALIASES.get(str(value), str(value))
        if section == "train" and key == "group_by_length" and isinstance(value, bool):
            value = str(value).lower()  # YAML true/false for the auto/true/false choice
        kwargs[key] = _coerce(value, known[key].type, f"{section}.{key}")
    return cls(**kwargs)


_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict}


def _coerce(value, typ, key):
    """Check and gently convert a YAML value to a field's type ('2e-4' -> 2e-4, 3.0 -> 3)."""
    if isinstance(typ, str):
        optional = typ.startswith("Optional[")
        name = typ[9:-1] if optional else typ
        if name == "Any":
            return value
        if value is None:
            if optional:
                return None
            raise ConfigError(f"needs a value ({name}), got null.", key=key)
        typ = _TYPES.get(name, object)
    if typ is object:
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise ConfigError(f"expected true or false, got {value!r}.", key=key)
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"expected a whole number, got {value!r}.", key=key)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
        raise ConfigError(f"expected a whole number, got {value!r}.", key=key)
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"expected a number, got {value!r}.", key=key)
        number = None
        if isinstance(value, (int, float)):
            number = float(value) if abs(value) < 1e308 else math.inf
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
        raise ConfigError(f"expected a finite number, got {value!r}.", key=key)
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"expected text, got {type(value).__name__} ({value!r}).", key=key)
    if typ is list:
        if isinstance(value, str):
            return [value]
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"expected a list, got {value!r}.", key=key)
    if typ is dict and not isinstance(value, dict):
        raise ConfigError(f"expected a mapping, got {value!r}.", key=key)
    return value


def _check_acyclic(node, key, _parents=()) -> None:
    """Refuse values that contain themselves (a YAML anchor used inside itself: `a: &x [*x]`) or that nest
    absurdly deep: both would otherwise crash later with a RecursionError instead of a message."""
    if not isinstance(node, (dict, list, tuple)):
        return
    if id(node) in _parents:
        raise ConfigError("a value contains itself (a YAML alias *name used inside its own &name). Fix: write the "
                          "value out instead of the alias.", key=key)  # fmt: skip
    if len(_parents) > 50:
        raise ConfigError("values are nested more than 50 levels deep. Fix: check the brackets and indentation.",
                          key=key)  # fmt: skip
    for child in node.values() if isinstance(node, dict) else node:
        _check_acyclic(child, key, (*_parents, id(node)))


def coerce_typed(value, annotation, key):
    """Check a value against a dataclass annotation of another library (peft's config fields): the plain types
    and ``Optional`` of them are checked and gently converted like our own fields; lists of str/int are checked;
    anything richer is left for that library to check."""
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")
    optional = text.startswith("Optional[")
    inner = text[9:-1] if optional else text
    if value is None:
        return value
    if inner in ("int", "float", "bool", "str", "dict"):
        return _coerce(value, inner, key)
    if inner in ("list[str]", "Union[list[str], str]", "list[int]", "Union[list[int], int]"):
        item = str if "str" in inner else int
        if isinstance(value, (str, int)) and not isinstance(value, bool) and "Union" in inner:
            return _coerce(value, item.__name__, key)
        if isinstance(value, (list, tuple)):
            return [_coerce(v, item.__name__, key) for v in value]
        raise ConfigError(f"expected a list of {'names' if item is str else 'whole numbers'}, got {value!r}.",
                          key=key)  # fmt: skip
    return value


def iter_overrides(overrides):
    import yaml

    if isinstance(overrides, dict):
        yield from overrides.items()
        return
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"'{item}' is not key=value. Fix: e.g. --set train.max_steps=10.", key="--set")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        yield key.strip(), value


def _set_dotted(raw: dict, key: str, value) -> None:
    parts = [p for p in key.split(".") if p]
    if not parts:
        raise ConfigError("empty key. Fix: e.g. --set train.max_steps=10.", key="--set")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if isinstance(child, str) and i == 0 and part == "model":
            child = {"name_or_path": child}
        elif isinstance(child, str) and i == 0 and part == "method":
            child = {"name": child}
        elif child is None:
            child = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"cannot set '{key}': '{part}' is not a mapping.", key=key)
        node[part] = child
        node = child
    node[parts[-1]] = value


def _check_choice(value, choices, key):
    if value not in choices:
        raise ConfigError(f"'{value}' is not one of {', '.join(choices)}.{did_you_mean(value, choices)}", key=key)


def _check_positive(value, key):
    if not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"must be a positive number, got {value!r}.", key=key)


def _plain(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return f"<{type(v).__name__}>"


def _deepcopy_plain(d):
    """Copy nested dicts/lists, keeping leaf objects (DataFrames, Datasets) as they are."""
    if isinstance(d, dict):
        return {k: _deepcopy_plain(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy_plain(v) for v in d]
    return d


def field_help(section: str) -> dict[str, str]:
    """{field name: help} for a section (used by --help, the form and the README reference)."""
    cls = SECTIONS.get(section, Config)
    return {f.name: f.metadata.get("help", "") for f in fields(cls)}

