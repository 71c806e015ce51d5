"""Loading the base model and its tokenizer: hub id, local folder or GGUF file; optionally 4/8-bit.

Everything heavy is imported inside functions so `import peft_magic` stays fast.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import warnings

from .errors import ConfigError

AUTO_CLASSES = {
    "causal-lm": "AutoModelForCausalLM",
    "seq-cls": "AutoModelForSequenceClassification",
    "token-cls": "AutoModelForTokenClassification",
    "seq2seq": "AutoModelForSeq2SeqLM",
    **dict.fromkeys(("dpo", "orpo", "grpo"), "AutoModelForCausalLM"),  # preference and reward tuning of an LM
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def check_model_source(mcfg) -> None:
    """Fail early, before anything heavy, on a path that cannot be a model."""
    src = mcfg.name_or_path
    looks_local = src.startswith((".", "/", "~")) or os.path.exists(src) or bool(mcfg.gguf_file)
    if not looks_local and not _HUB_ID.match(src):
        raise ConfigError(f"'{src}' is neither a local folder nor a hub id (org/name). Fix: check the spelling.",
                          key="model.name_or_path")  # fmt: skip
    if not looks_local:
        check_hub_reachable(src, mcfg.revision)
        return
    path = os.path.expanduser(src)
    if not os.path.exists(path):
        raise ConfigError(f"'{src}' does not exist. Fix: check the path, or give a hub id like org/name.",
                          key="model.name_or_path")  # fmt: skip
    if mcfg.gguf_file:
        gguf = os.path.join(path, mcfg.gguf_file)
        if not os.path.isfile(gguf):
            raise ConfigError(f"GGUF file '{gguf}' does not exist.", key="model.name_or_path")
        if importlib.util.find_spec("gguf") is None:
            raise ConfigError("loading a .gguf file needs the `gguf` package. Fix: pip install 'peft-magic[gguf]'.",
                              key="model.name_or_path")  # fmt: skip
        return
    if os.path.isfile(path):
        raise ConfigError(f"'{src}' is a file, not a model folder. Fix: give the folder holding config.json "
                          "(or a .gguf file).", key="model.name_or_path")  # fmt: skip
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"'{src}' is a folder but holds no config.json, so it is not a transformers model. "
                          "Fix: point at the model's own folder.", key="model.name_or_path")  # fmt: skip


_REACHABLE: set[str] = set()  # endpoints answered once in this process: no second probe per cell


def check_hub_reachable(repo_id: str, revision: str | None = None, filename: str = "config.json") -> None:
    """A hub id must be in the local cache, or the hub must answer: decided at once, not after a minute of retries.

    Offline (``HF_HUB_OFFLINE=1``) the cache alone decides; online, one HEAD request with a short timeout does
    (a cached model skips it). Raises a one-line `ConfigError` naming the fix and the offline demo models.
    """
    import huggingface_hub
    from huggingface_hub import constants

    cached = huggingface_hub.try_to_load_from_cache(repo_id, filename, revision=revision)
    if isinstance(cached, str):
        return
    offline = huggingface_hub.is_offline_mode() or any(
        os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    endpoint = constants.ENDPOINT
    why, fix = "offline mode is on (HF_HUB_OFFLINE=1)", "unset HF_HUB_OFFLINE and connect"
    if not offline and endpoint not in _REACHABLE:
        try:
            huggingface_hub.get_session().head(endpoint, timeout=3)
            _REACHABLE.add(endpoint)
        except Exception as e:  # noqa: BLE001 - any failure to get an answer means: not reachable now
            why, fix = f"{endpoint} did not answer ({type(e).__name__})", "connect and run again"
    if offline or endpoint not in _REACHABLE:
        from .demo_data import describe_demo_models

        raise ConfigError(
            f"'{repo_id}' is not in the local cache and the hub cannot be reached: {why}. Fix: {fix}, "
            f"or give a local model folder or .gguf file; {describe_demo_models()}.",
            key="model.name_or_path",
        )


def check_quantization(mcfg) -> None:
    if mcfg.quantization == "none":
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"'{mcfg.quantization}' needs bitsandbytes. Fix: pip install bitsandbytes, or set `quantization: none`.",
            key="model.quantization",
        )


def resolve_dtype(mcfg):
    """auto -> float32 on CPU, bf16 (or fp16 on GPUs without bf16) on CUDA."""
    import torch

    if mcfg.dtype != "auto":
        return getattr(torch, mcfg.dtype)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _common_kwargs(mcfg) -> dict:
    kw = {"trust_remote_code": bool(mcfg.trust_remote_code)}
    if mcfg.revision:
        kw["revision"] = mcfg.revision
    if mcfg.gguf_file:
        kw["gguf_file"] = mcfg.gguf_file
    return kw


def load_tokenizer(mcfg):
    from transformers import AutoTokenizer

    with quiet_loading():
        tok = AutoTokenizer.from_pretrained(os.path.expanduser(mcfg.name_or_path), **_common_kwargs(mcfg))
    if tok.pad_token is None:  # decoder-only tokenizers often have none; padding is masked out anyway
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


_GGUF_CONFIGS: dict = {}  # (file, mtime, revision, trust_remote_code) -> config read from a GGUF file


def load_config(mcfg):
    """The model's transformers config. Read from a GGUF file (~10-20 s for SmolLM2's: transformers parses the
    file) once per process and file version; each caller gets its own copy to change."""
    import copy

    from transformers import AutoConfig

    def read():
        with quiet_loading():
            return AutoConfig.from_pretrained(os.path.expanduser(mcfg.name_or_path), **_common_kwargs(mcfg))

    if not mcfg.gguf_file:
        return read()
    path = os.path.join(os.path.expanduser(mcfg.name_or_path), mcfg.gguf_file)
    try:
        key = (os.path.abspath(path), os.stat(path).st_mtime_ns, mcfg.revision, bool(mcfg.trust_remote_code))
    except OSError:
        return read()
    if key not in _GGUF_CONFIGS:
        _GGUF_CONFIGS[key] = read()
    return copy.deepcopy(_GGUF_CONFIGS[key])


def load_model(mcfg, task: str, labels=None, quantization: str | None = None, pad_token_id=None):
    """Load the base model for `task`.

    Args:
        mcfg: `ModelConfig`.
        task: One of `config.TASKS`.
        labels: Ordered label names for classification heads (index = class id).
        quantization: Override of ``mcfg.quantization`` (export reloads a 4-bit base in full precision to merge).
        pad_token_id: Set on the model config when it has none (needed by seq-cls heads on decoder models).
    """
    import transformers

    check_model_source(mcfg)
    quantization = mcfg.quantization if quantization is None else quantization
    dtype = resolve_dtype(mcfg)
    kw = _common_kwargs(mcfg)
    if quantization != "none":
        check_quantization(mcfg)
        kw["quantization_config"] = _bnb_config(quantization, dtype, task)
    if labels is not None:
        kw.update(num_labels=len(labels), id2label=dict(enumerate(map(str, labels))),
                  label2id={str(lab): i for i, lab in enumerate(labels)})  # fmt: skip
    elif mcfg.gguf_file:
        kw["config"] = load_config(mcfg)  # read once per process: from_pretrained would parse the GGUF's header again
    cls = getattr(transformers, AUTO_CLASSES[task])
    # transformers 5.2x with `kernels` installed (a dependency of its own) kernelizes a model as it loads and again at
    # every train()/eval(): the forward of each hub-kernel layer (RMSNorm, ...) is put back or swapped for code from
    # the Hugging Face Hub, which drops the run's own CPU kernels (training/rms_norm.py) at `model.train()`. Code
    # from the Hub runs when the user says so, as with trust_remote_code.
    kw["use_kernels"] = False
    with quiet_loading():
        try:
            model = cls.from_pretrained(os.path.expanduser(mcfg.name_or_path), dtype=dtype, **kw)
        except ValueError as e:
            if "Unrecognized configuration class" in str(e):
                raise ConfigError(f"this model cannot be loaded for task '{task}' ({str(e).splitlines()[0]}). "
                                  "Fix: pick a task the architecture supports.", key="task") from None  # fmt: skip
            raise
    if mcfg.gguf_file:
        _make_gguf_trainable(model)
    if quantization == "4bit":
        from .training.quantized_cpu import never_repack

        never_repack(model)  # bitsandbytes' CPU inference repack would cut gradients and round the block scales
    if pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_token_id
    from .training.offload import page_out_checkpoints

    page_out_checkpoints()  # pages loading read and no tensor keeps (quantized, converted) leave RAM now
    return model


def _bnb_config(quantization: str, dtype, task: str = "causal-lm"):
    from transformers import BitsAndBytesConfig

    # a fresh classification head must stay in floating point: it is trained (modules_to_save), not adapted
    skip = ["classifier", "score"] if task in ("seq-cls", "token-cls") else None
    if quantization == "4bit":
        from .distributed.sharding import quant_storage

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=quant_storage(dtype),  # FSDP/ZeRO-3 shard only tensors of one float dtype
            llm_int8_skip_modules=skip,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def _make_gguf_trainable(model) -> None:
    """transformers dequantizes GGUF weights on load but still flags the model as quantized, and `Trainer`/peft
    then refuse to train it. The weights are plain tensors now, so drop the stale quantizer marks."""
    model.hf_quantizer = None
    for attr in ("is_quantized", "_is_quantized_training_enabled"):
        if attr in vars(model):
            delattr(model, attr)
    with contextlib.suppress(AttributeError):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.quantization_config = None
    with contextlib.suppress(AttributeError):
        del model.config.quantization_config


def is_decoder(config) -> bool:
    """The model generates text: its architecture is a causal LM (a config without architectures: its type has one)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = getattr(config, "architectures", None) or []
    if archs:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not getattr(config, "is_encoder_decoder", False)


def infer_task(cfg, raw: dict) -> tuple[str, str] | None:
    """For a config whose mapping `raw` names no ``task``: ``(task, the plan's note)`` where the model leaves one
    choice, else None.

    An encoder-only model (BERT, MiniLM: its checkpoint is ``BertModel``) does not generate text, so training it as
    a causal LM (transformers would bolt on ``BertLMHeadModel``) is never meant: it becomes ``seq-cls``. A
    causal LM with ``data.label_column`` set is ambiguous (a classifier head, or text generation that ignores the
    labels) and is refused with both fixes.
    """
    if "task" in raw or cfg.task != "causal-lm" or cfg.model.gguf_file:  # a GGUF file is always a causal LM
        return None
    try:
        check_model_source(cfg.model)  # never a slow lookup for a model that cannot be found
        config = load_config(cfg.model)
    except (ConfigError, OSError, ValueError, KeyError):
        return None  # loading the model says what is wrong with it, in its turn
    arch = (getattr(config, "architectures", None) or [config.model_type])[0]
    if not is_decoder(config) and not getattr(config, "is_encoder_decoder", False):
        return "seq-cls", (f"seq-cls, inferred: {arch} is an encoder (it does not generate text). Set `task:` to "
                           "choose another")
    data = raw.get("data")
    if isinstance(data, dict) and "label_column" in data:
        raise ConfigError(f"data.label_column is set but no task is, and the default task, causal-lm, ignores labels. "
                          f"Fix: `task: seq-cls` to train {arch} as a classifier, or remove `label_column` to train "
                          "it on text.", key="task")  # fmt: skip
    return None


def build_empty(mcfg, task: str, labels=None):
    """The architecture on the meta device (no weights read): for dry runs and parameter counts."""
    import transformers
    from accelerate import init_empty_weights

    config = load_config(mcfg)
    if labels is not None:
        config.num_labels = len(labels)
    cls = getattr(transformers, AUTO_CLASSES[task])
    with init_empty_weights(), quiet_loading():
        model = cls.from_config(config, trust_remote_code=bool(mcfg.trust_remote_code))
    model.tie_weights()  # meta models start untied: count a tied embedding once, as the real model has it
    return model


@contextlib.contextmanager
def quiet_loading(record: list | None = None):
    """Silence weight-loading bars and library chatter; keep the warnings in `record` for a summary."""
    from transformers.utils import logging as tlog

    import datasets

    from .devices import quiet_deepspeed

    quiet_deepspeed()

    verbosity = tlog.get_verbosity()
    bars = tlog.is_progress_bar_enabled()
    ds_bars = datasets.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    datasets.disable_progress_bars()
    prev = logging.getLogger("bitsandbytes").level
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
        if record is not None:
            record.extend(str(w.message) for w in caught)
    finally:
        tlog.set_verbosity(verbosity)
        if bars:
            tlog.enable_progress_bar()
        if ds_bars:
            datasets.enable_progress_bars()
        logging.getLogger("bitsandbytes").setLevel(prev)


def count_trainable(model, method=None) -> tuple[int, int]:
    """(trainable, total) as the method sees it: a sparse method trains entries, not whole tensors."""
    counter = getattr(method, "count_trainable", None)
    return counter(model) if counter is not None else count_parameters(model)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total), counting 4-bit packed weights by their logical size."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if getattr(p, "quant_state", None) is not None or type(p).__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored byte
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
