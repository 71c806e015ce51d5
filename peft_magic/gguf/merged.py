"""The merged model as one GGUF file that llama.cpp, Ollama and LM Studio load: weights (adapter folded in),
settings, tokenizer and chat template."""

from __future__ import annotations

import os
import tempfile

from ..errors import ConfigError
from . import arch as archs
from .files import Planned, write_gguf
from .quant import Quant, k_quantize, parse_quant, tensor_type
from .vocab import add_tokenizer


def check_model(config, tokenizer) -> archs.Arch:
    """Everything that can refuse a merged export, checked before any weight is touched."""
    arch = archs.arch_for(config)
    from .vocab import tokenizer_model

    tokenizer_model(tokenizer)
    return arch


def plan_tensors(state: dict, config, quant: Quant, arch: archs.Arch) -> list[Planned]:
    """The file's tensors in write order, each made lazily from `state` (transformers names -> tensors)."""
    names = archs.NameMap(config, arch)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    planned, unknown = [], []
    for hf_name, tensor in state.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        if tied and hf_name.endswith("lm_head.weight"):
            continue  # llama.cpp reads the output projection from token_embd when output.weight is absent
        name = names(hf_name)
        if name is None:
            unknown.append(hf_name)
            continue
        shape = tuple(tensor.shape)
        planned.append(Planned(name, shape, tensor_type(quant, name, shape), _maker(tensor, hf_name, config, arch)))
    if unknown:
        raise ConfigError(f"GGUF export does not know where {len(unknown)} weight(s) go in llama.cpp (e.g. "
                          f"'{unknown[0]}'). Fix: export without --gguf.", key="gguf")  # fmt: skip
    if archs.rope_parameters(config)["rope_type"] == "llama3":
        factors = archs.llama3_rope_factors(config)
        planned.append(Planned("rope_freqs.weight", factors.shape, "F32", lambda: factors))
    return planned


def _maker(tensor, hf_name, config, arch):
    def make():
        data = tensor.detach().to("cpu").float().numpy()
        perm = archs.qk_permutation(hf_name, config, arch)
        return archs.permute_rows(data, *perm) if perm else data

    return make


def write_merged_gguf(model, tokenizer, path: str, quant="q8_0", source_gguf: str | None = None,
                      name: str | None = None, progress=None, state: dict | None = None) -> str:  # fmt: skip
    """Write `model` (a plain transformers model: merge the adapter first) to the GGUF file `path`.

    Args:
        model: A causal LM of a supported architecture (`arch.ARCHS`), full precision.
        tokenizer: Its tokenizer (vocabulary, special tokens and chat template are written from it).
        path: The `.gguf` file to write (atomically).
        quant: A quantization name (`quant.QUANTS`) or `Quant`.
        source_gguf: The `.gguf` the model was trained from: its tokenizer metadata is copied exactly.
        name: `general.name`.
        progress: `progress(done, total, tensor_name)`, called after each tensor.
        state: The weights to write instead of `model.state_dict()` (the base of a PeftModel, see
            `lora.base_state_dict`).
    """
    import gguf

    quant = quant if isinstance(quant, Quant) else parse_quant(quant)
    arch = check_model(model.config, tokenizer)
    config = model.config
    state = model.state_dict() if state is None else state

    def setup(writer):
        writer.add_type(gguf.GGUFType.MODEL)
        if name:
            writer.add_name(name)
        archs.add_hparams(writer, config, arch)
        writer.add_file_type(int(gguf.LlamaFileType["MOSTLY_F16" if quant.k_quant else quant.file_type]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, tokenizer, config.vocab_size, source_gguf=source_gguf)

    if not quant.k_quant:
        return write_gguf(path, setup, plan_tensors(state, config, quant, arch), archs.arch_name(arch), progress)
    # K-quants: an f16 file first, then llama.cpp's quantizer; the intermediate sits beside the target
    from .files import atomic_file

    folder = os.path.dirname(os.path.abspath(path))
    with tempfile.TemporaryDirectory(prefix=".peft-magic-f16-", dir=folder) as tmpdir:
        f16 = os.path.join(tmpdir, "model-f16.gguf")
        write_gguf(f16, setup, plan_tensors(state, config, quant, arch), archs.arch_name(arch), progress)
        with atomic_file(path) as tmp:
            k_quantize(f16, tmp, quant)
    return path
