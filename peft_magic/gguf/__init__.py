"""GGUF export for llama.cpp, Ollama and LM Studio, written with the `gguf` package (no compiler, no llama.cpp
checkout): the merged model (`merged.write_merged_gguf`), the LoRA as a GGUF adapter (`lora.write_lora_gguf`), an
Ollama Modelfile (`ollama.modelfile`) and the proof that the file answers like the notebook model
(`parity.check_parity`, with llama-cpp-python).

Nothing heavy is imported here: each module imports `gguf`, torch or llama_cpp inside its functions.
"""

from .quant import QUANTS, parse_quant

__all__ = ["QUANTS", "parse_quant"]
