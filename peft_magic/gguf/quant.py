"""Quantization types for the merged GGUF: names as users type them, checked before any work.

The block types (q4_0 ... q8_0) are quantized by the `gguf` package in Python. The K-quants (q4_k_m, q5_k_m,
q6_k) have no Python quantizer there; llama-cpp-python (the `gguf-check` extra) carries llama.cpp's, which
quantizes an f16 GGUF written first. Without it they are refused before anything is written.
"""

from __future__ import annotations

import difflib
import importlib.util
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class Quant:
    name: str
    weights: str  # gguf.GGMLQuantizationType of the 2-D weights
    embeddings: str  # of token_embd/output: 4- and 5-bit types keep them at q8_0, as llama-quantize keeps them fine
    file_type: str  # gguf.LlamaFileType member
    k_quant: bool = False


QUANTS = {
    q.name: q
    for q in (
        Quant("f32", "F32", "F32", "ALL_F32"),
        Quant("f16", "F16", "F16", "MOSTLY_F16"),
        Quant("bf16", "BF16", "BF16", "MOSTLY_BF16"),
        Quant("q8_0", "Q8_0", "Q8_0", "MOSTLY_Q8_0"),
        Quant("q5_1", "Q5_1", "Q8_0", "MOSTLY_Q5_1"),
        Quant("q5_0", "Q5_0", "Q8_0", "MOSTLY_Q5_0"),
        Quant("q4_1", "Q4_1", "Q8_0", "MOSTLY_Q4_1"),
        Quant("q4_0", "Q4_0", "Q8_0", "MOSTLY_Q4_0"),
        Quant("q6_k", "F16", "F16", "MOSTLY_Q6_K", k_quant=True),
        Quant("q5_k_m", "F16", "F16", "MOSTLY_Q5_K_M", k_quant=True),
        Quant("q4_k_m", "F16", "F16", "MOSTLY_Q4_K_M", k_quant=True),
    )
}


def require_gguf() -> None:
    """The `gguf` package writes every GGUF file: refuse, before any work, when it is missing."""
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError("GGUF export needs the gguf package, which is not installed. Fix: pip install gguf (or "
                          "'peft-magic[gguf]'); it is pure Python, no compiler.", key="gguf")  # fmt: skip


def k_quantizer_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def parse_quant(name) -> Quant:
    """The `Quant` for a user's name (`Q8_0`, `q8-0` and `q8_0` are the same); one clear line otherwise."""
    key = str(name or "").strip().lower().replace("-", "_")
    if key in ("true", "1", "yes", ""):
        key = "q8_0"
    quant = QUANTS.get(key)
    if quant is None:
        close = difflib.get_close_matches(key, QUANTS, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"unknown GGUF quantization '{name}': {hint}Choose one of {', '.join(QUANTS)}.",
                          key="gguf")  # fmt: skip
    if quant.k_quant and not k_quantizer_available():
        raise ConfigError(f"'{quant.name}' needs llama.cpp's K-quant quantizer (the gguf package quantizes only "
                          "f16/bf16 and q4_0 to q8_0 in Python), and llama-cpp-python is not installed. Fix: pip "
                          "install 'peft-magic[gguf-check]', or choose q4_1, q5_1 or q8_0, which need nothing more.",
                          key="gguf")  # fmt: skip
    return quant


def tensor_type(quant: Quant, gguf_name: str, shape) -> str:
    """The GGML type one tensor is stored in: norms and biases (1-D) stay f32, as llama.cpp needs them; rows that
    do not fill whole quantization blocks fall back to f16."""
    import gguf

    if len(shape) < 2:
        return "F32"
    kind = quant.embeddings if gguf_name.startswith(("token_embd.", "output.")) else quant.weights
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][0]
    if shape[-1] % block:
        return "F16"
    return kind


def k_quantize(src: str, dst: str, quant: Quant, threads: int = 0) -> None:
    """llama.cpp's own quantizer (through llama-cpp-python) on the f16 file `src`."""
    import os

    import gguf
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf.LlamaFileType[quant.file_type])
    params.nthread = threads or max(1, min(4, os.cpu_count() or 1))
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0:
        raise OSError(f"llama.cpp could not quantize to {quant.name} (code {rc})")
