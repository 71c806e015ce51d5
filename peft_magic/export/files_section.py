"""What each file of an export folder is and what runs it: the model card's "Files" table and
`run.last_export.files`."""

from __future__ import annotations

import fnmatch
import os

# (pattern, what it is); the first match wins
KINDS = (
    ("README.md", "this model card"),
    ("adapter_model.safetensors", "the adapter's weights (peft: PeftModel.from_pretrained)"),
    ("adapter_config.json", "the adapter's settings (peft)"),
    ("model*.safetensors", "the model's weights (transformers: from_pretrained)"),
    ("model.safetensors.index.json", "the index of the weight shards (transformers)"),
    ("config.json", "the model's settings (transformers)"),
    ("generation_config.json", "generation defaults (transformers)"),
    ("tokenizer*", "the tokenizer (transformers: AutoTokenizer)"),
    ("special_tokens_map.json", "the tokenizer's special tokens (transformers)"),
    ("chat_template.*", "the chat template (transformers)"),
    ("vocab.*", "the tokenizer's vocabulary (transformers)"),
    ("merges.txt", "the tokenizer's merges (transformers)"),
    ("peft_magic.yaml", "the resolved training config (peft_magic.load, %%peft_train --config)"),
    ("labels.json", "the class names"),
    ("*-adapter.gguf", "the LoRA adapter as GGUF, for the base GGUF (llama.cpp --lora, Ollama ADAPTER)"),
    ("base-*.gguf", "the base model as GGUF, which the adapter GGUF applies to (llama.cpp, Ollama)"),
    ("*.gguf", "the merged model as GGUF: weights, tokenizer, chat template (llama.cpp, Ollama, LM Studio)"),
    ("Modelfile*", "Ollama: ollama create NAME -f {name}"),
)


def file_role(name: str) -> str:
    for pattern, what in KINDS:
        if fnmatch.fnmatchcase(name, pattern):
            return what.format(name=name)
    return "written by the fine-tuning method"


def describe_files(folder: str) -> dict:
    """{file name: what it is} for every file in `folder` (sub-folders as 'name/'), README.md included."""
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    if "README.md" not in names:
        names.append("README.md")  # written last, after this listing
    out = {}
    for name in names:
        shown = name + "/" if os.path.isdir(os.path.join(folder, name)) else name
        out[shown] = file_role(name)
    return out


def files_lines(files: dict, folder: str) -> list[str]:
    """The model card's table of every file, with its size."""
    lines = ["## Files", "", "| file | size | what it is |", "|---|---|---|"]
    for name, what in files.items():
        path = os.path.join(folder, name.rstrip("/"))
        size = _size(os.path.getsize(path)) if os.path.isfile(path) else ""
        lines.append(f"| `{name}` | {size} | {what} |")
    return lines + [""]


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
