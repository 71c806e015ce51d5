"""The tokenizer in GGUF metadata: vocabulary, token types, merges, special tokens and the chat template.

A model trained from a `.gguf` base keeps that file's tokenizer metadata exactly (llama.cpp wrote it, llama.cpp
reads it back). Otherwise the transformers tokenizer is converted as llama.cpp's converter does: byte-level BPE
as `gpt2`, byte-fallback BPE (the SentencePiece family: Llama 2, Mistral) as `llama`, with gguf's `SpecialVocab`
for merges, special ids and the template.
"""

from __future__ import annotations

import json
import os
import tempfile

from ..errors import ConfigError

TOKENIZER_PREFIX = "tokenizer."


def tokenizer_json(tokenizer) -> dict:
    """The `tokenizers` description of a fast tokenizer (refuses slow ones: GGUF needs the full vocabulary)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise ConfigError(f"the tokenizer ({type(tokenizer).__name__}) is not a fast tokenizer, so its vocabulary "
                          "cannot be written to GGUF. Fix: load the model with a tokenizer.json.", key="gguf")  # fmt: skip
    return json.loads(backend.to_str())


def tokenizer_model(tokenizer) -> str:
    """`gpt2` (byte-level BPE) or `llama` (byte-fallback BPE); a `ConfigError` for anything else, before work."""
    model = tokenizer_json(tokenizer)["model"]
    if model.get("type") != "BPE":
        raise ConfigError(f"the tokenizer is a {model.get('type')} tokenizer; GGUF export writes BPE tokenizers "
                          "(Llama, Mistral, Qwen, SmolLM). Fix: export without --gguf.", key="gguf")  # fmt: skip
    return "llama" if model.get("byte_fallback") else "gpt2"


def pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for how text is split before BPE (its converter hashes a test string's tokens; the
    families here are recognised from the pre-tokenizer itself)."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    patterns = " ".join(str((p.get("pattern") or {}).get("Regex", "")) for p in parts if p.get("type") == "Split")
    if "\\p{N}{1,3}" in patterns:
        return "llama-bpe"
    if "\\p{L}+|\\p{N}|" in patterns:
        return "qwen2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    return "default"


def add_tokenizer(writer, tokenizer, vocab_size: int, source_gguf: str | None = None) -> None:
    """Write the `tokenizer.*` metadata.

    Args:
        writer: An open `gguf.GGUFWriter` (before its header is written).
        tokenizer: The run's transformers tokenizer.
        vocab_size: Rows of the embedding (token ids past the tokenizer's are written as unused).
        source_gguf: The `.gguf` file the model was trained from, whose tokenizer metadata is copied as it is.
    """
    if source_gguf:
        copy_tokenizer_fields(writer, source_gguf)
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, str) and template != read_field(source_gguf, "tokenizer.chat_template"):
            writer.add_chat_template(template)  # the user set a template in the notebook: that one trained
        return
    _add_hf_tokenizer(writer, tokenizer, vocab_size)


def _add_hf_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    import gguf

    kind = tokenizer_model(tokenizer)
    with tempfile.TemporaryDirectory(prefix="peft-magic-tok-") as d:
        tokenizer.save_pretrained(d)
        if kind == "llama":
            tokens, scores, types = [], [], []
            for text, score, ttype in gguf.LlamaHfVocab(_Path(d)).all_tokens():
                tokens.append(text)
                scores.append(score)
                types.append(ttype)
            tokens, types = _pad(tokens, types, vocab_size)
            scores += [-1000.0] * (len(tokens) - len(scores))
            writer.add_tokenizer_model("llama")
            writer.add_tokenizer_pre("default")
            writer.add_token_list(tokens)
            writer.add_token_scores(scores)
            writer.add_token_types(types)
        else:
            tokens, types = _bpe_tokens(tokenizer, vocab_size)
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer_json(tokenizer)))
            writer.add_token_list(tokens)
            writer.add_token_types(types)
        special = gguf.SpecialVocab(_Path(d), load_merges=kind == "gpt2", n_vocab=len(tokens))
        if tokenizer.pad_token_id is not None and special.special_token_ids.get("pad") is None:
            special.special_token_ids["pad"] = tokenizer.pad_token_id
        special.add_to_gguf(writer, quiet=True)


def _Path(d):  # noqa: N802 - gguf's vocab classes want a pathlib.Path
    from pathlib import Path

    return Path(d)


def _bpe_tokens(tokenizer, vocab_size: int):
    """Tokens and types in id order, as llama.cpp's converter lists them (added special tokens are CONTROL,
    other added tokens USER_DEFINED, ids without a token UNUSED)."""
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(max(vocab_size, len(reverse))):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _pad(tokens, types, vocab_size):
    import gguf

    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    return tokens, types


def special_tokens(tokenizer) -> dict:
    """{text: id} of every special token: the named ones (BOS, EOS, ...) and the added special tokens, which
    transformers leaves out of `all_special_tokens` (Llama 3's `<|eot_id|>`, Gemma's `<end_of_turn>`)."""
    out = {str(t): i for t, i in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids)}
    for i, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if added.special:
            out.setdefault(added.content, i)
    return out


def copy_tokenizer_fields(writer, source_gguf: str) -> None:
    """Copy every `tokenizer.*` field of `source_gguf` into `writer`, with its GGUF value type."""
    import gguf

    reader = gguf.GGUFReader(source_gguf)
    for key, field in reader.fields.items():
        if not key.startswith(TOKENIZER_PREFIX):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)


def read_field(path: str, key: str):
    """One metadata value of a GGUF file (None when absent)."""
    import gguf

    field = gguf.GGUFReader(path).get_field(key)
    return None if field is None else field.contents()


def source_gguf_path(model_config) -> str | None:
    """The `.gguf` file a run was trained from, or None."""
    if not getattr(model_config, "gguf_file", None):
        return None
    return os.path.join(os.path.expanduser(model_config.name_or_path), model_config.gguf_file)
