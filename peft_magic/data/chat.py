"""Chat templates and the label mask: which tokens of a conversation the loss trains.

`data.chat_template` gives a base model a template (a built-in name, a Jinja string or a file); it is set on the
tokenizer, so the export saves it and `%peft_generate` uses it. `data.train_on` chooses what is trained:
``assistant`` (every assistant turn, the default), ``last`` (the final assistant turn) or ``all`` (every token).

The mask comes from the template itself. A template with ``{% generation %}`` markers (the built-ins have them)
gives it through transformers' ``return_assistant_tokens_mask``; for any other template the conversation is
rendered turn by turn, and each answer is the text that rendering its message adds after the generation prompt
(``render(messages[:i+1])`` minus ``render(messages[:i], add_generation_prompt=True)``). Both are mapped onto
tokens through the tokenizer's character offsets, so the two agree (tests check this on every built-in).
"""

from __future__ import annotations

import os
import re

from ..errors import ConfigError, did_you_mean

_ALTERNATE = "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
_FOLD_SYSTEM = (  # templates without a system role put the system text before the first user message
    "{%- if messages[0]['role'] == 'system' -%}{%- set sys = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set msgs = messages[1:] -%}{%- else -%}{%- set sys = '' -%}{%- set msgs = messages -%}{%- endif -%}"
)
_CHECK_ROLES = (
    "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}" + _ALTERNATE + "{%- endif -%}"
    "{%- if m['role'] not in ('user', 'assistant') -%}"
    "{{ raise_exception('Only user and assistant roles are supported after an optional first system message') }}"
    "{%- endif -%}"
)
# @EOS@ becomes `{{ eos_token }}` when the template's end-of-turn marker is not one token of the tokenizer (a base
# model's): the model then also learns to emit its end-of-sequence token, so generation stops after the answer.
BUILTIN = {
    "chatml": (
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'assistant' -%}{{- '<|im_start|>assistant\\n' -}}"
        "{%- generation -%}{{- m['content'] + '<|im_end|>' -}}@EOS@{{- '\\n' -}}{%- endgeneration -%}"
        "{%- else -%}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}",
        "<|im_end|>",
    ),
    "llama3": (
        "{{- bos_token or '' -}}"
        "{%- for m in messages -%}"
        "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' -}}"
        "{%- if m['role'] == 'assistant' -%}"
        "{%- generation -%}{{- m['content'] | trim + '<|eot_id|>' -}}@EOS@{%- endgeneration -%}"
        "{%- else -%}{{- m['content'] | trim + '<|eot_id|>' -}}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}",
        "<|eot_id|>",
    ),
    "mistral": (
        "{{- bos_token or '' -}}" + _FOLD_SYSTEM + "{%- for m in msgs -%}" + _CHECK_ROLES
        + "{%- if m['role'] == 'user' -%}{{- '[INST] ' + (sys if loop.first else '') + m['content'] + ' [/INST]' -}}"
        "{%- else -%}{%- generation -%}{{- ' ' + m['content'] + (eos_token or '') -}}{%- endgeneration -%}"
        "{%- endif -%}{%- endfor -%}",
        None,
    ),
    "gemma": (
        "{{- bos_token or '' -}}" + _FOLD_SYSTEM + "{%- for m in msgs -%}" + _CHECK_ROLES
        + "{%- if m['role'] == 'assistant' -%}{{- '<start_of_turn>model\\n' -}}"
        "{%- generation -%}{{- m['content'] | trim + '<end_of_turn>' -}}@EOS@{{- '\\n' -}}{%- endgeneration -%}"
        "{%- else -%}{{- '<start_of_turn>user\\n' + ((sys if loop.first else '') + m['content']) | trim"
        " + '<end_of_turn>\\n' -}}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}",
        "<end_of_turn>",
    ),
    "zephyr": (
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'assistant' -%}{{- '<|assistant|>\\n' -}}"
        "{%- generation -%}{{- m['content'] + (eos_token or '') + '\\n' -}}{%- endgeneration -%}"
        "{%- else -%}{{- '<|' + m['role'] + '|>\\n' + m['content'] + (eos_token or '') + '\\n' -}}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}",
        None,
    ),
}
# Without any template (a base model, no `data.chat_template`): turns joined by newlines, answers ended by EOS,
# as `inference.format_prompt` writes a prompt. Never saved with the tokenizer; tokenized with its BOS.
PLAIN = (
    "{%- for m in messages -%}{%- if not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{%- if m['role'] == 'assistant' -%}{{- m['content'] + (eos_token or '') -}}{%- else -%}{{- m['content'] -}}"
    "{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%}{{- '\\n' -}}{%- endif -%}"
)
_PROBE = [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi."}]


# ---------------------------------------------------------------- choosing the template


def builtin(name: str, tokenizer) -> str:
    """The built-in template `name`, fitted to `tokenizer` (see @EOS@ above)."""
    text, marker = BUILTIN[name]
    vocab = tokenizer.get_vocab() if marker else {}
    return text.replace("@EOS@", "" if marker is None or marker in vocab else "{{- eos_token or '' -}}")


def resolve(spec, tokenizer) -> str | None:
    """`data.chat_template` -> Jinja text (None: keep the tokenizer's own)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "auto", "tokenizer")):
        return None
    if not isinstance(spec, str):
        raise ConfigError(f"expected a template name, Jinja text or a file path, got {type(spec).__name__}.",
                          key="data.chat_template")  # fmt: skip
    text = spec.strip()
    if text.lower() in BUILTIN:
        return builtin(text.lower(), tokenizer)
    if "{{" in text or "{%" in text:
        return spec
    path = os.path.expanduser(text)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    if os.sep in text or text.endswith((".jinja", ".j2", ".txt")):
        raise ConfigError(f"file '{text}' does not exist. Fix: check the path, or use a built-in template: "
                          f"{', '.join(BUILTIN)}.", key="data.chat_template")  # fmt: skip
    raise ConfigError(f"unknown chat template '{text}'.{did_you_mean(text.lower(), BUILTIN)} Fix: one of "
                      f"{', '.join(BUILTIN)}, a Jinja template string, or a path to a .jinja file.",
                      key="data.chat_template")  # fmt: skip


def install(tokenizer, spec) -> str:
    """Set `data.chat_template` on the tokenizer (so it is saved and used for generation) after checking that it
    renders; returns how the template is described in the dry run."""
    template = resolve(spec, tokenizer)
    if template is None:
        return "the tokenizer's" if current(tokenizer) else "none (turns joined as plain text)"
    try:
        render(tokenizer, _PROBE, template)
        render(tokenizer, _PROBE[:1], template, generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - any Jinja failure is the template's: one line, naming the fix
        raise ConfigError(f"the template does not render: {_first_line(e)}. Fix: check its Jinja syntax (each "
                          "{% ... %} closed, names like messages / message['role'] / add_generation_prompt), or "
                          f"use a built-in one: {', '.join(BUILTIN)}.", key="data.chat_template") from None  # fmt: skip
    tokenizer.chat_template = template
    name = spec.strip().lower() if isinstance(spec, str) and spec.strip().lower() in BUILTIN else "custom"
    return f"{name} (data.chat_template)"


def current(tokenizer) -> str | None:
    """The tokenizer's template text (the default one of a named set), or None."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    return template or None


def has_generation_markers(template: str | None) -> bool:
    return bool(template) and re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


def render(tokenizer, messages, template, generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)  # fmt: skip


def _first_line(e) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0].rstrip(".")


# ---------------------------------------------------------------- the mask


class Encoder:
    """Turns conversations (or plain prompt/completion pairs) into ``input_ids`` and ``labels``.

    Args:
        tokenizer: A transformers tokenizer (its chat template, if any, already installed).
        train_on: ``assistant``, ``last`` or ``all``.
        max_length: Tokens kept per example.
        key: The config key named by errors (``data.train`` / ``data.eval``).
    """

    def __init__(self, tokenizer, train_on="assistant", max_length=256, key="data.train"):
        self.tokenizer, self.train_on, self.max_length, self.key = tokenizer, train_on, max_length, key
        self.template = current(tokenizer)
        self.plain = self.template is None
        self.markers = has_generation_markers(self.template) and getattr(tokenizer, "is_fast", False)

    def conversation(self, messages, n_context=0, row=None) -> tuple[list, list, int]:
        """(input_ids cut to max_length, labels with -100 on untrained tokens, the full length before the cut)."""
        try:
            ids, owner = self.owners(messages)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - the template refused or failed on this conversation
            raise self._render_error(e, row) from None
        if self.train_on == "all":
            labels = list(ids)
        else:
            answers = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= n_context]
            trained = set(answers[-1:] if self.train_on == "last" else answers)
            labels = [t if o in trained else -100 for t, o in zip(ids, owner)]
        return ids[: self.max_length], labels[: self.max_length], len(ids)

    def text(self, text: str) -> tuple[list, list, int]:
        """Plain text: every token trained, an end-of-sequence token appended."""
        ids = list(self.tokenizer(text + (self.tokenizer.eos_token or ""))["input_ids"])
        return ids[: self.max_length], ids[: self.max_length], len(ids)

    def completion(self, prompt: str, completion: str) -> tuple[list, list, int]:
        """Plain prompt/completion (TRL's non-conversational format): the prompt is context, the completion and
        an end-of-sequence token are trained."""
        text = prompt + completion + (self.tokenizer.eos_token or "")
        ids, owner = self._tokenize(text, [(0, len(prompt), len(text))], add_special=True)
        labels = list(ids) if self.train_on == "all" else [t if o == 0 else -100 for t, o in zip(ids, owner)]
        return ids[: self.max_length], labels[: self.max_length], len(ids)

    def owners(self, messages) -> tuple[list, list]:
        """Token ids of the rendered conversation, and for each token the index of the assistant message it
        belongs to (-1: context)."""
        if self.markers:
            found = self._owners_by_markers(messages)
            if found is not None:
                return found
        return self._owners_by_turns(messages)

    def _owners_by_markers(self, messages):
        out = self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=True,
                                                 return_dict=True, return_assistant_tokens_mask=True)  # fmt: skip
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        owner, run = [-1] * len(ids), -1
        for t, bit in enumerate(mask):
            if bit and (t == 0 or not mask[t - 1]):
                run += 1
            if bit and run < len(answers):
                owner[t] = answers[run]
        if run + 1 != len(answers):  # adjacent answers merged into one span: tell them apart turn by turn
            return None
        return ids, owner

    def _owners_by_turns(self, messages):
        template = PLAIN if self.plain else self.template
        tok = self.tokenizer
        full = render(tok, messages, template)
        spans, cursor = [], 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            after = render(tok, messages[: i + 1], template)
            before = render(tok, messages[:i], template, generation_prompt=True) if i else None
            if before is not None and after.startswith(before) and full.startswith(after) and len(before) >= cursor:
                start, end = len(before), len(after)
            else:  # a template that renders earlier turns differently later: find the answer's text instead
                start, end = self._find(full, m["content"], cursor)
            spans.append((i, start, end))
            cursor = end
        return self._tokenize(full, spans, add_special=self.plain)

    def _find(self, full, content, cursor):
        for text in (content, content.strip()):
            start = full.find(text, cursor) if text else -1
            if start >= 0:
                end = start + len(text)
                eos = self.tokenizer.eos_token
                if eos and full.startswith(eos, end):
                    end += len(eos)
                return start, end
        raise ConfigError("the chat template rewrites the assistant's answers, so which tokens to train cannot be "
                          "told. Fix: set `data.chat_template: chatml` (or another built-in), or `data.train_on: "
                          "all`.", key="data.chat_template")  # fmt: skip

    def _tokenize(self, text, spans, add_special):
        """Token ids of `text` and each token's owner: the first of `spans` ((owner, start, end) in characters)
        that the token overlaps, as transformers maps its generation spans."""
        tok = self.tokenizer
        if not getattr(tok, "is_fast", False):
            return self._tokenize_pieces(text, spans, add_special)
        enc = tok(text, add_special_tokens=add_special, return_offsets_mapping=True)
        ids, owner, k = list(enc["input_ids"]), [], 0
        for start, end in enc["offset_mapping"]:
            while k < len(spans) and start >= spans[k][2]:
                k += 1
            owner.append(spans[k][0] if k < len(spans) and end > spans[k][1] else -1)
        return ids, owner

    def _tokenize_pieces(self, text, spans, add_special):
        """Slow tokenizers have no offsets: tokenize context and answers as separate pieces."""
        tok = self.tokenizer
        ids = tok("", add_special_tokens=True)["input_ids"] if add_special else []
        ids = [i for i in ids if i != tok.eos_token_id]
        owner, pos = [-1] * len(ids), 0
        for who, start, end in [*spans, (-1, len(text), len(text))]:
            for piece, o in ((text[pos:start], -1), (text[start:end], who)):
                if piece:
                    part = tok(piece, add_special_tokens=False)["input_ids"]
                    ids += part
                    owner += [o] * len(part)
            pos = end
        return ids, owner

    def _render_error(self, e, row) -> ConfigError:
        where = f"row {row}" if row is not None else "a conversation"
        text = _first_line(e)
        if "alternate" in text.lower():
            fix = ("merge consecutive messages of the same role so that user and assistant alternate, or choose "
                   "a template that allows it with `data.chat_template` (e.g. chatml)")  # fmt: skip
        else:
            fix = "fix that row, or choose another template with `data.chat_template` (e.g. chatml)"
        return ConfigError(f"{where}: the chat template refuses it: {text}. Fix: {fix}.", key=self.key)


# ---------------------------------------------------------------- whole datasets

STATS_COLUMNS = ("n_full", "n_trained")  # per row: tokens before the cut, trained tokens after it (preview.finish)


def tokenize_rows(ds, tokenizer, kind: str, train_on="assistant", max_length=256, key="data.train",
                  text_column="text", fingerprint=None):  # fmt: skip
    """Tokenize a causal-LM split (normalised by `formats.normalize`): input_ids, attention_mask, labels and the
    `STATS_COLUMNS`, which `preview.finish` turns into the length figures and then removes. `fingerprint`: as
    for `prepare.tokenize`."""
    encoder = Encoder(tokenizer, train_on, max_length, key)

    def encode(batch):
        if kind == "text":
            rows = [encoder.text(t) for t in batch[text_column]]
        elif kind == "completion":
            rows = [encoder.completion(p, c) for p, c in zip(batch["prompt"], batch["completion"])]
        else:
            rows = [encoder.conversation(m, n, r)
                    for m, n, r in zip(batch["messages"], batch["n_context"], batch["source_row"])]  # fmt: skip
        return {"input_ids": [r[0] for r in rows], "attention_mask": [[1] * len(r[0]) for r in rows],
                "labels": [r[1] for r in rows], "n_full": [r[2] for r in rows],
                "n_trained": [sum(1 for x in r[1] if x != -100) for r in rows]}  # fmt: skip

    return ds.map(encode, batched=True, remove_columns=list(ds.column_names), desc=None, new_fingerprint=fingerprint)
