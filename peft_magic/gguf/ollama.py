"""The Ollama Modelfile written beside a GGUF export: FROM / ADAPTER, the prompt TEMPLATE and the stop tokens.

The template is not hand-translated per family: the tokenizer's own Jinja template is rendered with marker
strings in place of the system prompt, the user's message and the answer, and the markers become Ollama's
`{{ .System }}`, `{{ .Prompt }}` and `{{ .Response }}`. A single-turn prompt is then the very text the notebook
model saw (a default system prompt included, as SmolLM2's template adds one). The stop tokens are what the
template writes right after an answer, plus the end-of-sequence token.
"""

from __future__ import annotations

import os

from .vocab import special_tokens

SYS, USER, ANSWER = "\x01PM_SYSTEM\x01", "\x01PM_PROMPT\x01", "\x01PM_ANSWER\x01"
FAMILIES = (("<|im_start|>", "ChatML"), ("<|start_header_id|>", "Llama 3"), ("[INST]", "Mistral"),
            ("<start_of_turn>", "Gemma"))  # fmt: skip


def template_family(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return "plain"
    return next((name for mark, name in FAMILIES if mark in template), "custom")


def _render(tokenizer, messages, generation_prompt=True) -> str | None:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception:  # noqa: BLE001 - a template may refuse a role (Gemma has no system turn)
        return None


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS before a text by itself (its `add_bos_token` setting or its post-processor,
    as Llama 3, Mistral and Gemma do); the GGUF then says so too (`tokenizer.ggml.add_bos_token`)."""
    if getattr(tokenizer, "add_bos_token", False):
        return True
    bos_id = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("a")["input_ids"] if bos_id is not None else []
    return bool(ids) and ids[0] == bos_id


def ollama_template(tokenizer, chat: bool = True) -> tuple[str, list[str]]:
    """(Go template, stop strings) equivalent to the tokenizer's chat template for one turn."""
    eos = tokenizer.eos_token
    if not chat or not isinstance(getattr(tokenizer, "chat_template", None), str):
        return "{{ .Prompt }}", [eos] if eos else []
    user = _render(tokenizer, [{"role": "user", "content": USER}])
    system = _render(tokenizer, [{"role": "system", "content": SYS}, {"role": "user", "content": USER}])
    bos = tokenizer.bos_token
    # llama.cpp and Ollama add BOS themselves when the model asks for it: drop the template's own copy
    if bos and adds_bos(tokenizer):
        user = user[len(bos):] if user.startswith(bos) else user
        system = system[len(bos):] if system and system.startswith(bos) else system

    def go(text):
        return text.replace(SYS, "{{ .System }}").replace(USER, "{{ .Prompt }}")

    template = go(user)
    if system and SYS in system:
        template = "{{ if .System }}" + go(system) + "{{ else }}" + go(user) + "{{ end }}"
    template += "{{ .Response }}"
    stops = []
    full = _render(tokenizer, [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER}], False)
    if full and ANSWER in full:
        after = full.split(ANSWER, 1)[1].strip()
        special = sorted(special_tokens(tokenizer), key=len, reverse=True)
        end = next((s for s in special if s and after.startswith(s)), None)
        if end:
            stops.append(end)
    if eos and eos not in stops:
        stops.append(eos)
    return template, stops


def modelfile(tokenizer, model_file: str, adapter_file: str | None = None, chat: bool = True,
              name: str = "my-model", file: str = "Modelfile") -> str:  # fmt: skip
    """The Modelfile text. `model_file`/`adapter_file` are written as given (relative to the Modelfile's folder
    when they sit beside it)."""
    template, stops = ollama_template(tokenizer, chat)
    if '"""' in template:  # cannot be quoted in a Modelfile; Ollama then falls back to the GGUF's own template
        template = None
    lines = [
        f"# Ollama Modelfile written by peft_magic ({template_family(tokenizer) if chat else 'plain'} prompt format).",
        f"# Create the model:  ollama create {name} -f {file}",
        f"# Then run it:       ollama run {name}",
        f"FROM {_quote(model_file)}",
    ]
    if adapter_file:
        lines.append(f"ADAPTER {_quote(adapter_file)}")
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    lines += [f"PARAMETER stop {_quote(s)}" for s in stops]
    lines.append("# greedy decoding, as the notebook's run.generate() and the parity check use")
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


def _quote(s: str) -> str:
    import json

    return s if s and not any(c in s for c in ' "<>\\#') else json.dumps(s, ensure_ascii=False)
