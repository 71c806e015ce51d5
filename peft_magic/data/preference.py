"""Data for preference and reward tuning: (prompt, chosen, rejected) pairs for DPO/ORPO, prompts for GRPO.

Pairs come as TRL's two preference shapes:

| shape | columns | |
| --- | --- | --- |
| plain text | `prompt`, `chosen`, `rejected`: strings | the answers continue the prompt text, an EOS appended |
| conversational | `chosen`, `rejected`: message lists, with `prompt` (the shared messages) or without (the common leading messages are the prompt) | the chat template renders prompt + answer |

Each side is tokenized as supervised chat data is (`chat.Encoder`: the same template, the same mask), and the
prompt is never trained: the loss and log-probabilities read only the answer's tokens. A tokenized pair is
``input_ids`` / ``labels`` (chosen) and ``rejected_input_ids`` / ``rejected_labels``; `PairCollator` pads both to
one length and stacks them as one batch of 2n rows (chosen first), so one forward pass scores both.

GRPO rows have a prompt (`prompt` text or messages, or a `messages` column ending with a user turn); every other
column of the row reaches the reward functions as a keyword argument. A tokenized prompt is ``input_ids`` (the
prompt rendered with the generation prompt) and ``row`` (its index in the raw rows kept for the rewards).
"""

from __future__ import annotations

from ..errors import ConfigError, did_you_mean

PAIR_COLUMNS = ("chosen", "rejected")


def _missing(cols, need, key, what):
    absent = [c for c in need if c not in cols]
    if absent:
        hint = did_you_mean(absent[0], cols)
        raise ConfigError(f"no column {', '.join(repr(c) for c in absent)} (columns: {', '.join(map(str, cols))}).{hint} "
                          f"Fix: {what}", key=key)  # fmt: skip


def _pair(row, i, prompt_col, key):
    """One row -> (prompt: str | messages, chosen, rejected) in one shape, checked."""
    from .formats import message_list, text_value

    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        if prompt_col not in row:
            raise ConfigError(f"row {i}: plain-text answers need a '{prompt_col}' column. Fix: add the prompt text, "
                              "or give chosen/rejected as message lists.", key=key)  # fmt: skip
        return text_value(row[prompt_col], i, prompt_col, key), chosen, rejected
    c, r = message_list(chosen, i, "chosen", key), message_list(rejected, i, "rejected", key)
    if prompt_col in row and row[prompt_col] is not None:
        p = row[prompt_col]
        prompt = [{"role": "user", "content": p}] if isinstance(p, str) else message_list(p, i, prompt_col, key)
    else:  # TRL's implicit prompt: the messages both conversations share
        n = 0
        while n < min(len(c), len(r)) - 1 and c[n] == r[n]:
            n += 1
        prompt, c, r = c[:n], c[n:], r[n:]
    for side, msgs in (("chosen", c), ("rejected", r)):
        if not msgs or any(m["role"] != "assistant" for m in msgs):
            raise ConfigError(f"row {i}: '{side}' must be the assistant's answer (after the prompt), got roles "
                              f"{[m['role'] for m in msgs]}. Fix: give the answer as [{{'role': 'assistant', "
                              "'content': ...}].", key=key)  # fmt: skip
    if not prompt:
        raise ConfigError(f"row {i}: no prompt (chosen and rejected share no leading messages). Fix: add a "
                          f"'{prompt_col}' column.", key=key)  # fmt: skip
    return prompt, c, r


def _encode_side(encoder, prompt, answer, i):
    if isinstance(prompt, str):
        return encoder.completion(prompt, answer)
    return encoder.conversation(prompt + answer, n_context=len(prompt), row=i)


def tokenize_pairs(ds, tokenizer, dcfg, key="data.train"):
    """Rows of pairs -> a tokenized `datasets.Dataset`; pairs where a side keeps no answer token after
    `data.max_length`'s cut are dropped (their count is returned)."""
    import datasets

    from .chat import Encoder

    _missing(ds.column_names, PAIR_COLUMNS, key, "a preference set needs 'chosen' and 'rejected' columns (and "
             f"'{dcfg.prompt_column}' for plain text), as TRL's DPO/ORPO data.")  # fmt: skip
    encoder = Encoder(tokenizer, "assistant", dcfg.max_length, key)  # the prompt is never trained
    out = {"input_ids": [], "attention_mask": [], "labels": [], "rejected_input_ids": [], "rejected_labels": []}
    dropped = 0
    for i, row in enumerate(ds):
        prompt, chosen, rejected = _pair(row, i, dcfg.prompt_column, key)
        c_ids, c_lab, _ = _encode_side(encoder, prompt, chosen, i)
        r_ids, r_lab, _ = _encode_side(encoder, prompt, rejected, i)
        if all(x == -100 for x in c_lab) or all(x == -100 for x in r_lab):
            dropped += 1
            continue
        for k, v in zip(out, (c_ids, [1] * len(c_ids), c_lab, r_ids, r_lab)):
            out[k].append(v)
    if not out["input_ids"]:
        raise ConfigError("no pair keeps an answer token after `data.max_length`'s cut. Fix: raise "
                          "`data.max_length` or shorten the prompts.", key=key)  # fmt: skip
    return datasets.Dataset.from_dict(out), dropped


class PairCollator:
    """Pad chosen and rejected of a batch to one length and stack them: rows [0, n) chosen, [n, 2n) rejected."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, features):
        import torch

        ids = [f["input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
        labels = [f["labels"] for f in features] + [f["rejected_labels"] for f in features]
        width = max(len(x) for x in ids)
        batch = {
            "input_ids": torch.tensor([x + [self.pad] * (width - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            "labels": torch.tensor([x + [-100] * (width - len(x)) for x in labels]),
        }
        return batch


# ---------------------------------------------------------------- GRPO prompts


def prompt_of(row, i, dcfg, key):
    """A GRPO row's prompt: text, or messages (from the prompt column, or the messages column)."""
    from .formats import message_list, text_value

    if dcfg.prompt_column in row:
        p = row[dcfg.prompt_column]
        return text_value(p, i, dcfg.prompt_column, key) if not isinstance(p, (list, tuple)) else message_list(p, i, dcfg.prompt_column, key)
    msgs = message_list(row[dcfg.messages_column], i, dcfg.messages_column, key)
    while msgs and msgs[-1]["role"] == "assistant":  # an example answer is not part of the prompt
        msgs = msgs[:-1]
    if not msgs:
        raise ConfigError(f"row {i}: no prompt messages. Fix: give at least one user message.", key=key)
    return msgs


def render_prompt(tokenizer, prompt) -> list:
    """Prompt token ids ready for generation: messages through the chat template with the generation prompt
    (turns joined as plain text without one), plain text as it is, with the tokenizer's special tokens."""
    from . import chat

    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    template = chat.current(tokenizer)
    text = chat.render(tokenizer, prompt, template or chat.PLAIN, generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=template is None)["input_ids"])


def tokenize_prompts(ds, tokenizer, dcfg, key="data.train"):
    import datasets

    cols = ds.column_names
    if dcfg.prompt_column not in cols and dcfg.messages_column not in cols:
        _missing(cols, [dcfg.prompt_column], key, f"GRPO needs a '{dcfg.prompt_column}' column (text or messages) "
                 f"or a '{dcfg.messages_column}' column; set `data.prompt_column` to use another.")  # fmt: skip
    ids = [render_prompt(tokenizer, prompt_of(row, i, dcfg, key))[-dcfg.max_length:] for i, row in enumerate(ds)]
    return datasets.Dataset.from_dict({"input_ids": ids, "row": list(range(len(ids)))})


class PromptCollator:
    """Left-pad prompts (generation continues at the right edge) and carry each row's index for the rewards."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, features):
        import torch

        width = max(len(f["input_ids"]) for f in features)
        pads = [width - len(f["input_ids"]) for f in features]
        return {
            "input_ids": torch.tensor([[self.pad] * p + f["input_ids"] for p, f in zip(pads, features)]),
            "attention_mask": torch.tensor([[0] * p + [1] * len(f["input_ids"]) for p, f in zip(pads, features)]),
            "row": torch.tensor([f["row"] for f in features]),
        }


# ---------------------------------------------------------------- rewards


def resolve_rewards(cfg, namespace, columns) -> list:
    """`grpo.rewards` -> [(name, function)]: each `$name` defined and callable, each accepting
    (prompts=, completions=, **the row's other columns)."""
    import inspect

    out = []
    for spec in cfg.grpo.rewards:
        fn, name = spec, getattr(spec, "__name__", repr(spec))
        if isinstance(spec, str):
            name = spec.strip()[1:]
            ns = namespace or {}
            if name not in ns:
                visible = [k for k in ns if not k.startswith("_")]
                raise ConfigError(f"'${name}' is not defined in the notebook.{did_you_mean(name, visible)} Fix: run "
                                  f"the cell that defines `{name}` first.", key="grpo.rewards")  # fmt: skip
            fn = ns[name]
        if not callable(fn):
            raise ConfigError(f"'{name}' is a {type(fn).__name__}, not a function. Fix: give a function "
                              "f(prompts, completions, **columns) -> list of numbers.", key="grpo.rewards")  # fmt: skip
        try:
            inspect.signature(fn).bind(prompts=[], completions=[], **dict.fromkeys(columns, []))
        except TypeError as e:
            raise ConfigError(f"'{name}' cannot be called as {name}(prompts=..., completions=..., "
                              f"{', '.join(f'{c}=...' for c in columns)}) ({e}). Fix: define it as "
                              f"`def {name}(prompts, completions, **columns):`.", key="grpo.rewards") from None  # fmt: skip
        except ValueError:  # a builtin without a signature: called as it is
            pass
        out.append((name, fn))
    return out


# ---------------------------------------------------------------- all together


def prepare_objective_data(cfg, tokenizer, namespace=None):
    """`prepare` for task dpo / orpo / grpo: resolve, split, tokenize; the `PreparedData` of the run."""
    from ..config.objectives import PAIR_TASKS
    from ..training.packing import example_lengths
    from . import chat
    from .prepare import PreparedData, describe_source, hold_out, resolve

    dcfg = cfg.data
    check_decoder(cfg)
    train = resolve(dcfg.train, namespace, "data.train", dcfg.split)
    eval_ = None
    if isinstance(dcfg.eval, float):
        train, eval_ = hold_out(train, dcfg.eval, cfg.train.seed)
    elif dcfg.eval is not None:
        eval_ = resolve(dcfg.eval, namespace, "data.eval", "validation")
    if dcfg.max_samples is not None and dcfg.max_samples < len(train):
        train = train.shuffle(seed=cfg.train.seed).select(range(dcfg.max_samples))
    note = chat.install(tokenizer, dcfg.chat_template)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    extra = {}
    if cfg.task in PAIR_TASKS:
        train_tok, dropped = tokenize_pairs(train, tokenizer, dcfg)
        eval_tok = tokenize_pairs(eval_, tokenizer, dcfg, "data.eval")[0] if eval_ is not None else None
        collator, kind = PairCollator(pad), "preference"
        extra = {"chat": not isinstance(train[0]["chosen"], str)}
        note = f"{note} · prompts never trained" + (f" · {dropped} pairs cut away by max_length" if dropped else "")
    else:
        train_tok = tokenize_prompts(train, tokenizer, dcfg)
        eval_tok = tokenize_prompts(eval_, tokenizer, dcfg, "data.eval") if eval_ is not None else None
        columns = [c for c in train.column_names if c != dcfg.prompt_column]
        extra = {"rewards": resolve_rewards(cfg, namespace, columns), "rows": {"train": train, "eval": eval_},
                 "chat": not isinstance(prompt_of(train[0], 0, dcfg, "data.train"), str)}
        collator, kind = PromptCollator(pad), "prompts"
    data = PreparedData(
        train=train_tok, eval=eval_tok, collator=collator, kind=kind, train_rows=len(train_tok),
        eval_rows=len(eval_tok) if eval_tok is not None else 0, train_tokens=sum(example_lengths(train_tok)),
        source_names={"train": describe_source(dcfg.train),
                      "eval": describe_source(dcfg.eval) if dcfg.eval is not None else None},
        format=kind, template_note=note, tokenizer=tokenizer,
    )  # fmt: skip
    data.objective = extra  # whether prompts went through the chat template; GRPO: the reward functions, raw rows
    return data


def check_decoder(cfg) -> None:
    """dpo/orpo/grpo tune a language model: refuse a classifier or encoder before anything loads."""
    from .. import models

    try:
        config = models.load_config(cfg.model)
    except Exception:  # noqa: BLE001 - not knowable here: the real load will say
        return
    archs = getattr(config, "architectures", None) or []
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    decoder = any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs) if archs else (
        config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not getattr(config, "is_encoder_decoder", False))
    if not decoder:
        raise ConfigError(f"task {cfg.task} tunes a language model that generates text, and this model is "
                          f"{', '.join(archs) or config.model_type} (a classifier or encoder). Fix: use a causal LM "
                          "(e.g. SmolLM2, Qwen, Llama), or `task: seq-cls` for this one.", key="task")  # fmt: skip
