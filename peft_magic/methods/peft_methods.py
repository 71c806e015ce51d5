"""Methods backed by peft: we map our names to peft config classes and call `get_peft_model`.

Nothing here re-implements a layer. Parameters are peft's own config fields, checked against the config class
so a typo gets a "did you mean".
"""

from __future__ import annotations

import dataclasses
import os

from ..config.coerce import coerce_typed
from ..errors import ConfigError, did_you_mean
from .registry import register

TASK_TYPES = {"causal-lm": "CAUSAL_LM", "seq-cls": "SEQ_CLS", "token-cls": "TOKEN_CLS", "seq2seq": "SEQ_2_SEQ_LM",
              "dpo": "CAUSAL_LM", "orpo": "CAUSAL_LM", "grpo": "CAUSAL_LM"}  # fmt: skip
# Keys peft_magic manages itself; a user giving them would only create conflicts.
MANAGED = {"task_type", "peft_type", "base_model_name_or_path", "revision", "inference_mode"}
# Keys of ours accepted by every peft method.
OURS = {"from"}
PROMPT_LEARNING = {"prompt-tuning", "prefix-tuning", "p-tuning"}


def import_peft():
    """`import peft`, without the notice bitsandbytes logs on CPU-only machines landing above the user's panel."""
    import logging

    bnb = logging.getLogger("bitsandbytes")
    level = bnb.level
    bnb.setLevel(logging.ERROR)
    try:
        import peft
    finally:
        bnb.setLevel(level)
    return peft


class PeftMethod:
    """A method that peft implements.

    Args:
        name: Our name for it (`method: NAME`).
        config_class: Name of the peft config class, e.g. ``"LoraConfig"``; None for the generic ``peft`` entry.
        family: ``A``dditive, ``S``elective or ``R``eparameterized (shown in tables).
        defaults: Parameters we set unless the user does (e.g. ``use_dora`` for dora).
        summary: One line for docs and the form.
    """

    def __init__(self, name, config_class, family, defaults=None, summary=""):
        self.name = name
        self.config_class = config_class
        self.family = family
        self.defaults = dict(defaults or {})
        self.summary = summary
        self.is_peft = True

    # -- parse time
    def peft_config_class(self, params=None):
        peft = import_peft()

        if self.config_class is None:  # generic: method: {name: peft, peft_type: FOURIERFT, ...}
            from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

            ptype = str((params or {}).get("peft_type", "")).upper()
            names = [str(getattr(k, "value", k)) for k in PEFT_TYPE_TO_CONFIG_MAPPING]
            if ptype not in names:
                raise ConfigError(
                    f"needs a peft_type peft knows.{did_you_mean(ptype, names)} Known: {', '.join(names)}.",
                    key="method.peft_type",
                )
            return PEFT_TYPE_TO_CONFIG_MAPPING[ptype]
        return getattr(peft, self.config_class)

    def accepted_params(self, params=None) -> dict:
        """{name: dataclass field} the user may set for this method."""
        cls = self.peft_config_class(params)
        return {f.name: f for f in dataclasses.fields(cls) if f.name not in MANAGED and f.init}

    def check_params(self, params: dict) -> None:
        accepted = self.accepted_params(params)
        for key in params:
            if key in OURS or (self.config_class is None and key == "peft_type"):
                continue
            if key in MANAGED:
                raise ConfigError(f"is set by peft_magic from `task:`; remove it.", key=f"method.{key}")
            if key not in accepted:
                raise ConfigError(
                    f"'{self.name}' has no parameter '{key}'.{did_you_mean(key, accepted)} "
                    f"See peft's {self.peft_config_class(params).__name__} for the accepted names.",
                    key=f"method.{key}",
                )
            params[key] = coerce_typed(params[key], accepted[key].type, f"method.{key}")  # peft checks few types
        for key in ("r", "num_virtual_tokens"):
            if key in params and (not isinstance(params[key], int) or isinstance(params[key], bool) or params[key] <= 0):
                raise ConfigError(f"must be a positive whole number, got {params[key]!r}.", key=f"method.{key}")
        if "lora_dropout" in params and not (isinstance(params["lora_dropout"], (int, float)) and 0 <= params["lora_dropout"] < 1):
            raise ConfigError(f"must be in [0, 1), got {params['lora_dropout']!r}.", key="method.lora_dropout")
        src = params.get("from")
        if src is not None and not os.path.isfile(os.path.join(str(src), "adapter_config.json")):
            raise ConfigError(
                f"'{src}' holds no adapter_config.json. Fix: point `from:` at a folder written by %peft_export.",
                key="method.from",
            )

    def check_compatible(self, cfg) -> None:
        if self.name == "qlora":
            if cfg.model.quantization == "8bit":
                raise ConfigError("qlora is LoRA on a 4-bit base. Fix: set `quantization: 4bit` or use `method: lora`.",
                                  key="model.quantization")  # fmt: skip
            if not cfg.model.gguf_file:
                cfg.model.quantization = "4bit"

    # -- run time
    def build_peft_config(self, cfg, model=None, calibration=None):
        params = {k: v for k, v in cfg.method.params.items() if k not in OURS and k != "peft_type"}
        merged = {**self.defaults, **params}
        accepted = self.accepted_params(cfg.method.params)
        if "target_modules" in accepted and "target_modules" not in merged and self.name in TARGETS_ALL_LINEAR:
            merged["target_modules"] = "all-linear"
        if "task_type" in {f.name for f in dataclasses.fields(self.peft_config_class(cfg.method.params))}:
            merged["task_type"] = TASK_TYPES[cfg.task]
        if self.name in PROMPT_LEARNING:
            merged.setdefault("num_virtual_tokens", 8)
        from .peft_defaults import adapt_params  # run- and model-dependent defaults (adalora, boft, ...)

        merged = adapt_params(self.name, merged, cfg.method.params, cfg, model, calibration)
        try:
            return self.peft_config_class(cfg.method.params)(**merged)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"peft rejected these parameters: {e}", key="method") from None

    def apply(self, model, cfg, calibration=None):
        """Wrap `model` (already loaded, maybe quantized) for training; returns the PeftModel."""
        from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

        if cfg.model.quantization != "none":
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=cfg.train.checkpointing
            )
        src = cfg.method.params.get("from")
        if src:
            return PeftModel.from_pretrained(model, str(src), is_trainable=True)
        peft_config = self.build_peft_config(cfg, model, calibration)
        if self.name == "prefix-tuning" and not _supports_past_key_values(model):
            raise ConfigError(
                f"prefix tuning needs a decoder model that accepts past key values; "
                f"{type(model).__name__} does not. Fix: use `prompt-tuning` or `p-tuning` for this model.",
                key="method.name",
            )
        try:
            peft_model = get_peft_model(model, peft_config)
        except ValueError as e:
            raise ConfigError(f"peft could not apply '{self.name}' to {type(model).__name__}: {e}", key="method") from None
        if self.name == "adalora":
            from .peft_defaults import follow_adalora_schedule

            follow_adalora_schedule(peft_model)
        return peft_model


    regularizer = None  # peft methods add nothing to the loss

    def save(self, model, out_dir, cfg=None, state_dict=None) -> None:
        """peft's own format: adapter_config.json + adapter_model.safetensors.

        Args:
            model: The PeftModel.
            out_dir: Folder to write.
            cfg: The run's Config (unused: peft saves its own config).
            state_dict: The model's weights gathered from FSDP/ZeRO-3 shards (see `sharding`); by default the
                model's own, or for a sharded model the ones its latest checkpoint gathered on this rank.
        """
        import warnings

        from ..distributed.sharding import gathered

        if state_dict is None:
            state_dict = gathered(model)  # None for a model that holds its weights whole
        with warnings.catch_warnings():  # GGUF bases keep no config.json beside the .gguf file; peft warns each save
            warnings.filterwarnings("ignore", message="Could not find a config file")
            model.save_pretrained(out_dir, safe_serialization=True, state_dict=state_dict)

    def load_weights(self, model, in_dir) -> None:
        """Load saved adapter weights into an existing PeftModel, in place (resume)."""
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        from ..training.checkpoint import METHOD_STATE

        full = os.path.join(in_dir, METHOD_STATE)
        if self.name == "adalora" and os.path.exists(full):  # a checkpoint: the uncut matrices (peft_defaults)
            import torch

            model.load_state_dict(torch.load(full, weights_only=False)["weights"], strict=False)
            return
        set_peft_model_state_dict(model, load_file(os.path.join(in_dir, "adapter_model.safetensors")))

    def train_state(self, model) -> dict | None:
        """State besides weights and optimizer that a checkpoint must keep to resume exactly (AdaLoRA's rank
        schedule), or None."""
        from .peft_defaults import adalora_state

        return adalora_state(model) if self.name == "adalora" else None

    def load_train_state(self, model, state) -> None:
        """Put `train_state` back into a resumed model."""
        from .peft_defaults import load_adalora_state

        if self.name == "adalora":
            load_adalora_state(model, state)

    def load(self, base_model, in_dir, is_trainable=False):
        from peft import PeftModel

        from .peft_defaults import fix_loaded

        return fix_loaded(PeftModel.from_pretrained(base_model, in_dir, is_trainable=is_trainable))

    def merge(self, model):
        """A plain transformers model with the adapter folded in (prompt methods cannot be merged)."""
        if self.name in PROMPT_LEARNING or self.name == "llama-adapter":
            raise ConfigError(f"'{self.name}' adds virtual tokens, which cannot be merged into the weights. "
                              "Fix: export without --merge and load it with PeftModel.from_pretrained.", key="--merge")  # fmt: skip
        return model.merge_and_unload()


def _supports_past_key_values(model) -> bool:
    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False):
        return True
    return bool(getattr(cfg, "use_cache", False)) and cfg.model_type not in {"bert", "roberta", "distilbert", "electra", "deberta", "deberta-v2", "albert", "xlm-roberta"}  # fmt: skip


TARGETS_ALL_LINEAR = {"lora", "qlora", "dora", "rslora", "adalora", "loha", "lokr", "oft", "boft", "vera"}
_CATALOG = [
    ("lora", "LoraConfig", "R", {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05}, "Low-rank update B·A added to each targeted linear layer."),
    ("qlora", "LoraConfig", "R", {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05}, "LoRA on a 4-bit NF4 base (bitsandbytes)."),
    ("dora", "LoraConfig", "R", {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "use_dora": True}, "LoRA with a learned magnitude per output (weight-decomposed)."),
    ("rslora", "LoraConfig", "R", {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "use_rslora": True}, "LoRA scaled by alpha/sqrt(r), stable at high rank."),
    ("adalora", "AdaLoraConfig", "R", {}, "LoRA whose rank budget is re-allocated during training."),
    ("loha", "LoHaConfig", "R", {"r": 8, "alpha": 8}, "Low-rank Hadamard product update."),
    ("lokr", "LoKrConfig", "R", {"r": 8, "alpha": 8}, "Low-rank Kronecker product update."),
    ("vera", "VeraConfig", "R", {"r": 64}, "Shared frozen random matrices with trained scaling vectors."),
    ("oft", "OFTConfig", "R", {}, "Orthogonal fine-tuning: rotate weights with a learned orthogonal matrix."),
    ("boft", "BOFTConfig", "R", {"boft_block_size": 4}, "Butterfly-factorised orthogonal fine-tuning."),
    ("ia3", "IA3Config", "A", {}, "Learned vectors that rescale keys, values and feed-forward activations."),
    ("prompt-tuning", "PromptTuningConfig", "A", {}, "Trained soft prompt tokens prepended to the input."),
    ("prefix-tuning", "PrefixTuningConfig", "A", {}, "Trained key/value prefixes at every layer (decoders only)."),
    ("p-tuning", "PromptEncoderConfig", "A", {}, "Soft prompt produced by a small trained encoder."),
    ("llama-adapter", "AdaptionPromptConfig", "A", {"adapter_len": 10}, "Gated adaption prompts in the top layers (Llama-style models)."),
    ("ln-tuning", "LNTuningConfig", "S", {}, "Only the LayerNorm parameters train."),
    ("peft", None, "?", {}, "Any other peft method: give peft_type and its parameters."),
]  # fmt: skip
for _name, _cls, _family, _defaults, _summary in _CATALOG:
    register(_name, PeftMethod(_name, _cls, _family, _defaults, _summary))
