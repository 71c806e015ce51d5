"""Which transformers architectures can be written as GGUF, and how their weights and settings map onto llama.cpp's
names and layouts.

The conventions are llama.cpp's (its `convert_hf_to_gguf.py`): tensor names come from `gguf.TensorNameMap`, and the
llama family's query/key rows are reordered because llama.cpp rotates adjacent pairs where transformers rotates
the two halves of each head. Qwen2/Qwen3 use the halves convention in llama.cpp too (NEOX rope), so they are
written as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class Arch:
    """One supported architecture: its llama.cpp name and whether q/k rows are permuted for rotary embeddings."""

    model_type: str
    gguf_arch: str  # a gguf.MODEL_ARCH member name
    permute_qk: bool


ARCHS = {
    "llama": Arch("llama", "LLAMA", True),
    "mistral": Arch("mistral", "LLAMA", True),  # llama.cpp runs Mistral as a llama
    "qwen2": Arch("qwen2", "QWEN2", False),
    "qwen3": Arch("qwen3", "QWEN3", False),
}
ROPE_TYPES = ("default", "linear", "llama3")


def supported() -> str:
    return ", ".join(sorted(ARCHS))


def arch_for(config) -> Arch:
    """The `Arch` of a transformers config; a `ConfigError` naming the supported ones otherwise."""
    model_type = getattr(config, "model_type", None)
    arch = ARCHS.get(model_type)
    if arch is None:
        raise ConfigError(f"GGUF export does not support the '{model_type}' architecture yet (supported: "
                          f"{supported()}). Fix: export without --gguf (peft adapter or --merge).", key="gguf")  # fmt: skip
    rope = rope_parameters(config)
    if rope.get("rope_type", "default") not in ROPE_TYPES:
        raise ConfigError(f"GGUF export does not support '{rope['rope_type']}' rotary scaling yet (supported: "
                          f"{', '.join(ROPE_TYPES)}). Fix: export without --gguf.", key="gguf")  # fmt: skip
    return arch


def gguf_arch(arch: Arch):
    import gguf

    return gguf.MODEL_ARCH[arch.gguf_arch]


def arch_name(arch: Arch) -> str:
    import gguf

    return gguf.MODEL_ARCH_NAMES[gguf_arch(arch)]


def rope_parameters(config) -> dict:
    """transformers 5 keeps rotary settings in `rope_parameters`; older configs in `rope_theta`/`rope_scaling`."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if not rope:
        rope = dict(getattr(config, "rope_scaling", None) or {})
        rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope.setdefault("rope_type", rope.get("type", "default"))
    return rope


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def add_hparams(writer, config, arch: Arch) -> None:
    """The `{arch}.*` settings llama.cpp reads to build the graph."""
    import gguf

    n_head = config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or n_head)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    dim = head_dim(config)
    writer.add_rope_dimension_count(dim)
    if dim != config.hidden_size // n_head:  # Qwen3 and some Mistrals: heads are not hidden/n_head wide
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def permute_rows(w, n_head: int, n_head_kv: int | None = None):
    """Reorder the output rows of a q/k projection (or of its LoRA B) from transformers' half-split rotary layout
    to llama.cpp's interleaved one; k uses the key/value head count."""
    n = n_head_kv if n_head_kv is not None and n_head_kv != n_head else n_head
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def qk_permutation(name: str, config, arch: Arch):
    """`(n_head, n_head_kv)` to permute `name` with, or None when it keeps its layout."""
    if not arch.permute_qk:
        return None
    n_head = config.num_attention_heads
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        return n_head, n_head
    if name.endswith(("k_proj.weight", "k_proj.bias")):
        return n_head, getattr(config, "num_key_value_heads", None) or n_head
    return None


class NameMap:
    """transformers parameter names -> GGUF tensor names, through gguf's own table for the architecture."""

    def __init__(self, config, arch: Arch):
        import gguf

        self._map = gguf.get_tensor_name_map(gguf_arch(arch), config.num_hidden_layers)

    def __call__(self, hf_name: str) -> str | None:
        name = hf_name
        for prefix in ("base_model.model.", "_orig_mod."):
            if name.startswith(prefix):
                name = name[len(prefix):]
        return self._map.get_name(name, try_suffixes=(".weight", ".bias"))


def llama3_rope_factors(config):
    """The per-frequency factors llama.cpp reads from `rope_freqs.weight` for Llama 3.1+ rotary scaling (the
    same formula as transformers' `_compute_llama3_parameters`)."""
    import numpy as np

    rope = rope_parameters(config)
    dim, base = head_dim(config), float(rope.get("rope_theta", 10000.0))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_len = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            factors.append(1.0)
        elif wavelen > old_len / low:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)
