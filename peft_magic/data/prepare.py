"""Data: resolve the user's source into a `datasets.Dataset`, check it, split it, tokenize it, collate it.

Sources: a `$name` of the notebook (pandas DataFrame, list of dicts or strings, dict of lists, datasets.Dataset /
DatasetDict), a local file (.csv .tsv .json .jsonl .parquet .txt), or a hub dataset id. Tokenization and
collation use transformers' tokenizers and collators; nothing here re-implements them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, did_you_mean

FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}


@dataclass
class PreparedData:
    """Tokenized train/eval sets plus what the task needs to know about them."""

    train: Any
    eval: Any
    collator: Any
    labels: list | None = None  # class names, index = id (classification)
    kind: str = "text"  # text | instruction | chat | classification | tokens (token-cls)
    train_rows: int = 0
    eval_rows: int = 0
    train_tokens: int = 0
    source_names: dict = field(default_factory=dict)
    train_collator: Any = None  # when training batches collate differently (packing); else `collator`
    grouping: str = ""  # whether and why training batches are length-grouped (sampling.decide), once decided
    order: Any = None  # the training order's torch.Generator (engine.make_loaders), reseeded by the loop each epoch
    format: str = ""  # the detected data format (data/formats.py), causal-lm only
    format_note: str = ""  # which format, from which columns, and how to choose another
    template_note: str = ""  # which chat template, and what is trained
    stats: dict = field(default_factory=dict)  # split -> preview.LengthStats
    full_lengths: dict = field(default_factory=dict)  # split -> each kept row's length before max_length's cut
    tokenizer: Any = None

    def preview(self, i=0, n: int = 1, split: str = "train"):
        """Example `i` (and the `n - 1` after it) with the trained tokens highlighted, plus the data's figures.

        Shows itself as HTML in a notebook and with colours in a terminal; `str()` marks trained text [[so]].
        """
        from .preview import make_preview

        indices = list(i) if isinstance(i, (list, tuple, range)) else list(range(i, i + n))
        return make_preview(self, indices, split)


def describe_source(src) -> str:
    """How a data source is named in the dry run and the model card (never its contents)."""
    if isinstance(src, str):
        return src
    if isinstance(src, float):
        return f"{src:.0%} of train"
    n = _safe_len(src)
    return f"<{type(src).__name__}{f' {n:,} rows' if n is not None else ''}>"


def _safe_len(obj):
    try:
        return len(obj)
    except TypeError:
        return None


def resolve(src, namespace=None, key="data.train", split="train", *, via=None):
    """Turn a source into a `datasets.Dataset`.

    Args:
        via: The ``$name`` the source was given as, so that messages name the variable, not just its type.
    """
    import datasets

    if isinstance(src, str) and src.strip().startswith("$"):
        name = src.strip()[1:]
        ns = namespace or {}
        if name not in ns:
            visible = [k for k in ns if not k.startswith("_")]
            raise ConfigError(f"'${name}' is not defined in the notebook.{did_you_mean(name, visible)} "
                              f"Fix: run the cell that creates `{name}` first.", key=key)  # fmt: skip
        return resolve(ns[name], namespace, key, split, via=f"${name}")
    what = via or "the data"
    if isinstance(src, datasets.DatasetDict):
        if split not in src:
            raise ConfigError(f"{what} is a DatasetDict with no '{split}' split (it has {', '.join(src)}). "
                              f"Fix: pick one, e.g. {via or 'ds'}['{next(iter(src), split)}'].", key=key)  # fmt: skip
        return src[split]
    if isinstance(src, datasets.Dataset):
        return src
    if type(src).__name__ == "DataFrame" and hasattr(src, "to_dict"):
        return datasets.Dataset.from_pandas(src, preserve_index=False)
    if isinstance(src, dict) and src and all(isinstance(v, (list, tuple)) for v in src.values()):
        return datasets.Dataset.from_dict({k: list(v) for k, v in src.items()})
    if isinstance(src, (list, tuple)):
        if not src:
            raise ConfigError(f"{what} is an empty {type(src).__name__}. Fix: give at least one row.", key=key)
        if all(isinstance(r, str) for r in src):
            return datasets.Dataset.from_dict({"text": list(src)})
        if all(isinstance(r, dict) for r in src):
            return _rows_table(list(src), what, key)
        odd = next(r for r in src if not isinstance(r, (str, dict)))
        raise ConfigError(f"{what} is a {type(src).__name__} holding {_a(type(odd).__name__)}; a list must hold dicts "
                          "(rows) or strings (texts).", key=key)  # fmt: skip
    if isinstance(src, (str, os.PathLike)):
        return _load_path_or_hub(os.fspath(src).strip(), key, split)
    subject = f"{via} is {_a(type(src).__name__)}" if via else f"{_a(type(src).__name__)} ({src!r:.40})"
    raise ConfigError(f"{subject}, which cannot be used as data. Fix: give a DataFrame, a list of dicts, a "
                      "datasets.Dataset, a file path or a hub dataset id.", key=key)  # fmt: skip


def _rows_table(rows: list, what: str, key: str):
    """A `datasets.Dataset` of a list of dicts; values of one column that Arrow cannot put in one type (a number
    beside text, a string where other rows hold a list) are one line naming the first row that differs."""
    import datasets
    import pyarrow as pa

    try:
        return datasets.Dataset.from_list(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        first = str(e).strip().splitlines()[0][:160]
        where = _first_odd_row(rows)
        raise ConfigError(f"{what}: {where + ': ' if where else ''}a column mixes types across rows ({first}). Fix: "
                          "give every row's value of a column the same type (e.g. text everywhere, or a list of "
                          "{role, content} everywhere).", key=key) from None  # fmt: skip


def _first_odd_row(rows: list) -> str:
    """``row 3, column 'messages'``: the first value whose shape differs from the first row's, nested lists and
    dicts included; '' when none is found."""

    def shape(v):
        if isinstance(v, dict):
            return ("dict", tuple(sorted((str(k), shape(x)) for k, x in v.items() if x is not None)))
        if isinstance(v, (list, tuple)):
            kinds = [shape(x) for x in v if x is not None]
            first = kinds[0] if kinds else None
            return ("list", "mixed" if any(k != first and not _compatible(first, k) for k in kinds) else first)
        return type(v).__name__ if v is not None else None

    seen: dict = {}
    for i, row in enumerate(rows):
        for col, v in row.items():
            if v is None:
                continue
            s = shape(v)
            if isinstance(s, tuple) and s[0] == "list" and s[1] == "mixed":
                return f"row {i}, column '{col}'"
            if col in seen and seen[col] != s and not _compatible(seen[col], s):
                return f"row {i}, column '{col}'"
            seen.setdefault(col, s)
    return ""


def _compatible(a, b) -> bool:
    """Shapes Arrow unifies: int/float, dicts with other keys, an empty list with any list."""
    if {a, b} <= {"int", "float"}:
        return True
    if isinstance(a, tuple) and isinstance(b, tuple) and a[0] == b[0]:
        if a[0] == "list":
            return a[1] is None or b[1] is None or _compatible(a[1], b[1])
        common = dict(a[1]).keys() & dict(b[1]).keys()
        return all(dict(a[1])[k] == dict(b[1])[k] or _compatible(dict(a[1])[k], dict(b[1])[k]) for k in common)
    return False


def _a(noun: str) -> str:
    """'an int', 'a DataFrame'."""
    return f"{'an' if noun[:1].lower() in 'aeio' else 'a'} {noun}"


def _load_path_or_hub(src: str, key: str, split: str):
    import datasets

    path = os.path.expanduser(src)
    ext = os.path.splitext(path)[1].lower()
    if os.path.isdir(path):
        try:
            return datasets.load_from_disk(path)
        except Exception:  # noqa: BLE001 - not a saved dataset: let load_dataset read the folder's files
            return _as_user_error(lambda: datasets.load_dataset(path, split=split), src, key)
    if os.path.isfile(path):
        if ext not in FILE_BUILDERS:
            raise ConfigError(f"cannot read '{ext}' files. Fix: use one of {', '.join(FILE_BUILDERS)}.", key=key)
        _check_utf8(path, key)
        kw = {"delimiter": "\t"} if ext == ".tsv" else {}
        return _as_user_error(
            lambda: datasets.load_dataset(FILE_BUILDERS[ext], data_files=path, split="train", **kw), src, key
        )
    if ext in FILE_BUILDERS or src.startswith((".", "/", "~")):
        raise ConfigError(f"file '{src}' does not exist. Fix: check the path (relative paths start from the "
                          f"notebook's folder, {os.getcwd()}).", key=key)  # fmt: skip
    return _as_user_error(lambda: datasets.load_dataset(src, split=split), src, key, hub=True)


def _as_user_error(fn, src, key, hub=False):
    try:
        return fn()
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - turn loader failures into one actionable line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "the hub dataset" if hub else "the data file"
        raise ConfigError(f"could not load {where} '{src}': {first}", key=key) from None


def _check_utf8(path: str, key: str) -> None:
    with open(path, "rb") as fh:
        head = fh.read(1 << 20)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not just a multi-byte character cut at the 1 MiB boundary
            raise ConfigError(f"'{path}' is not UTF-8 text (bad byte at offset {e.start}). Fix: re-save it as "
                              "UTF-8, e.g. pandas.read_csv(path, encoding='latin-1').to_csv(new_path).", key=key) from None  # fmt: skip


# ---------------------------------------------------------------- checking


def detect_kind(ds, dcfg, task: str, key="data.train") -> str:
    cols = list(ds.column_names)
    if task == "token-cls":
        _require_column(cols, dcfg.tokens_column, key, "tokens_column")
        _require_column(cols, dcfg.tags_column, key, "tags_column")
        return "tokens"
    if task == "seq-cls":
        for col in (dcfg.text_column, dcfg.label_column):
            _require_column(cols, col, key, "text_column" if col == dcfg.text_column else "label_column")
        return "classification"
    if task == "seq2seq":
        if dcfg.prompt_column in cols and dcfg.response_column in cols:
            return "instruction"
        _require_column(cols, dcfg.prompt_column, key, "prompt_column")
    from . import formats

    return formats.detect(ds, dcfg, key).kind


def _require_column(cols, col, key, setting):
    if col not in cols:
        raise ConfigError(f"no column '{col}' (columns: {', '.join(map(str, cols))}).{did_you_mean(col, cols)} "
                          f"Fix: rename the column or set `data.{setting}: <name>`.", key=key)  # fmt: skip


def check_rows(ds, kind, dcfg, key) -> None:
    if len(ds) == 0:
        raise ConfigError("the dataset has no rows. Fix: check the filter or file.", key=key)
    if kind == "tokens":
        return _check_tagged_rows(ds, dcfg, key)
    col = {"text": dcfg.text_column, "classification": dcfg.text_column, "instruction": dcfg.response_column}.get(kind)
    if col is None or col not in ds.column_names:  # alpaca / ShareGPT rows are checked by formats.normalize
        return
    values = ds[col]
    if all(not isinstance(v, str) or not v.strip() for v in values):
        raise ConfigError(f"every value of column '{col}' is empty or not text. Fix: check the column.", key=key)


def label_names(train, eval_, dcfg, key="data.eval") -> list:
    """Sorted label set of train; eval labels must be among them."""
    col = dcfg.label_column
    train_labels = set(train[col])
    if None in train_labels:
        raise ConfigError(f"column '{col}' has empty labels. Fix: drop or fill those rows.", key="data.train")
    if eval_ is not None:
        unseen = set(eval_[col]) - train_labels
        if unseen:
            raise ConfigError(f"labels {sorted(map(str, unseen))[:5]} appear in eval but never in train, so the "
                              "model cannot learn them. Fix: add them to train or drop them from eval.", key=key)  # fmt: skip
    if all(isinstance(x, int) and not isinstance(x, bool) for x in train_labels):
        if train_labels == set(range(len(train_labels))):
            return list(range(len(train_labels)))
    return sorted(train_labels, key=lambda v: (str(type(v)), v))


def _check_tagged_rows(ds, dcfg, key) -> None:
    """token-cls rows: a list of words and a list of as many tags."""
    for i, (words, tags) in enumerate(zip(ds[dcfg.tokens_column], ds[dcfg.tags_column])):
        if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) for w in words):
            raise ConfigError(f"row {i}: column '{dcfg.tokens_column}' must hold a list of words (strings), got "
                              f"{type(words).__name__}. Fix: split the text into words, e.g. text.split().", key=key)  # fmt: skip
        if not isinstance(tags, (list, tuple)) or len(tags) != len(words):
            n = len(tags) if isinstance(tags, (list, tuple)) else type(tags).__name__
            raise ConfigError(f"row {i}: {len(words)} words in '{dcfg.tokens_column}' but {n} tags in "
                              f"'{dcfg.tags_column}'. Fix: give exactly one tag per word.", key=key)  # fmt: skip


def tag_names(train, eval_, dcfg, key="data.eval") -> list:
    """token-cls: the sorted set of tags over every word of train (ids 0..n-1 stay as they are)."""
    col = dcfg.tags_column
    tags = {t for row in train[col] for t in row}
    if None in tags:
        raise ConfigError(f"column '{col}' has empty tags. Fix: tag every word (e.g. 'O' for none).", key="data.train")
    if eval_ is not None:
        unseen = {t for row in eval_[col] for t in row} - tags
        if unseen:
            raise ConfigError(f"tags {sorted(map(str, unseen))[:5]} appear in eval but never in train, so the model "
                              "cannot learn them. Fix: add them to train or drop them from eval.", key=key)  # fmt: skip
    if all(isinstance(t, int) and not isinstance(t, bool) for t in tags) and tags == set(range(len(tags))):
        return list(range(len(tags)))
    return sorted(tags, key=lambda v: (str(type(v)), v))


def unseen_labels(ds, kind, dcfg, labels) -> list:
    """Labels (seq-cls) or tags (token-cls) of `ds` that are not in `labels`."""
    if kind == "tokens":
        found = {t for row in ds[dcfg.tags_column] for t in row}
    else:
        found = set(ds[dcfg.label_column])
    return sorted(map(str, found - set(labels)))


# ---------------------------------------------------------------- tokenizing


def tokenize(ds, tokenizer, dcfg, kind: str, task: str, labels=None, keep_stats=False, key="data.train",
             fingerprint=None):  # fmt: skip
    """Add input_ids/attention_mask/labels; drop the source columns.

    Causal-LM data goes through `chat.tokenize_rows` (conversations normalised first when they are not yet).
    With `keep_stats` its per-row length columns stay (`preview.finish` reads and removes them); without, rows
    that train on nothing are dropped here. `fingerprint` (the tokenization cache's key, which covers the
    tokenizer, the settings and this code) becomes the tokenized set's datasets fingerprint; without it datasets
    derives one by hashing the encoding function, tokenizer included.
    """
    if task == "causal-lm":
        from . import chat, formats, preview

        if kind != "text" and "source_row" not in ds.column_names and "completion" not in ds.column_names:
            ds = formats.normalize(ds, formats.detect(ds, dcfg, key), dcfg.train_on, key)
        out = chat.tokenize_rows(ds, tokenizer, kind, dcfg.train_on, dcfg.max_length, key, dcfg.text_column,
                                 fingerprint)  # fmt: skip
        return out if keep_stats else preview.finish(out, dcfg.max_length)[0]
    max_len = dcfg.max_length
    label_ids = {lab: i for i, lab in enumerate(labels)} if labels is not None else None

    if kind == "tokens" and not getattr(tokenizer, "is_fast", False):
        raise ConfigError("token-cls needs a fast tokenizer (to map sub-tokens back to words). Fix: use a model "
                          "that ships a tokenizer.json.", key="task")  # fmt: skip

    def encode(batch):
        if kind == "tokens":
            enc = tokenizer(batch[dcfg.tokens_column], is_split_into_words=True, truncation=True, max_length=max_len)
            enc["labels"] = [_word_labels(enc.word_ids(i), tags, label_ids) for i, tags in enumerate(batch[dcfg.tags_column])]  # fmt: skip
            return enc
        if kind == "classification":
            enc = tokenizer(batch[dcfg.text_column], truncation=True, max_length=max_len)
            enc["labels"] = [label_ids[y] for y in batch[dcfg.label_column]]
            return enc
        enc = tokenizer(batch[dcfg.prompt_column], truncation=True, max_length=max_len)  # seq2seq
        enc["labels"] = tokenizer(text_target=batch[dcfg.response_column], truncation=True, max_length=max_len)["input_ids"]  # fmt: skip
        return enc

    out = ds.map(encode, batched=True, remove_columns=list(ds.column_names), desc=None, new_fingerprint=fingerprint)
    return out.filter(lambda r: len(r["input_ids"]) > 0)


def _word_labels(word_ids, tags, label_ids) -> list:
    """Each word's tag id on its first sub-token; -100 (ignored by the loss) on the others and on specials."""
    out, previous = [], None
    for w in word_ids:
        out.append(-100 if w is None or w == previous else label_ids[tags[w]])
        previous = w
    return out


def _packing_collator():
    from ..training.packing import PackingCollator

    return PackingCollator()


def make_collator(tokenizer, task: str):
    """transformers' own collators: label-aware padding for generation tasks, plain padding for classifiers."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorForTokenClassification, DataCollatorWithPadding

    if task == "seq-cls":
        return DataCollatorWithPadding(tokenizer)
    if task == "token-cls":
        return DataCollatorForTokenClassification(tokenizer)
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)


# ---------------------------------------------------------------- all together


def prepare(cfg, tokenizer, namespace=None) -> PreparedData:
    """Resolve, check, split and tokenize the config's data."""
    dcfg, task = cfg.data, cfg.task
    if task in ("dpo", "orpo", "grpo"):  # preference pairs or prompts (data/preference.py)
        from .preference import prepare_objective_data

        return prepare_objective_data(cfg, tokenizer, namespace)
    train = resolve(dcfg.train, namespace, "data.train", dcfg.split)
    train, kind, fmt = shape_rows(train, dcfg, task, "data.train")
    eval_, eval_kind = None, kind
    if isinstance(dcfg.eval, float):
        train, eval_ = hold_out(train, dcfg.eval, cfg.train.seed)
    elif dcfg.eval is not None:
        eval_ = resolve(dcfg.eval, namespace, "data.eval", "validation")
        eval_, eval_kind, _ = shape_rows(eval_, dcfg, task, "data.eval")
    if dcfg.max_samples is not None and dcfg.max_samples < len(train):
        train = train.shuffle(seed=cfg.train.seed).select(range(dcfg.max_samples))
    labels = label_names(train, eval_, dcfg) if kind == "classification" else None
    if kind == "tokens":
        labels = tag_names(train, eval_, dcfg)
    from ..training.packing import example_lengths
    from . import chat
    from .cache import cached_tokenize
    from .preview import finish

    template_note = chat.install(tokenizer, dcfg.chat_template) if task == "causal-lm" else ""
    stats, full = {}, {}
    train_tok = cached_tokenize(train, tokenizer, dcfg, kind, task, labels, enabled=dcfg.cache_tokenized)
    train_tok, stats["train"], full["train"] = finish(train_tok, dcfg.max_length)
    if len(train_tok) == 0:
        raise ConfigError("no example is left after tokenization (all texts empty, or every answer cut away by "
                          "max_length?). Fix: check the data, or raise `data.max_length`.", key="data.train")  # fmt: skip
    eval_tok = None
    if eval_ is not None:
        eval_tok = cached_tokenize(eval_, tokenizer, dcfg, eval_kind, task, labels, enabled=dcfg.cache_tokenized, key="data.eval")  # fmt: skip
        eval_tok, stats["eval"], full["eval"] = finish(eval_tok, dcfg.max_length)
    return PreparedData(
        train=train_tok,
        eval=eval_tok,
        collator=make_collator(tokenizer, task),
        train_collator=_packing_collator() if dcfg.packing else None,
        labels=labels,
        kind=kind,
        train_rows=len(train_tok),
        eval_rows=len(eval_tok) if eval_tok is not None else 0,
        train_tokens=sum(example_lengths(train_tok)),
        source_names={"train": describe_source(dcfg.train), "eval": describe_source(dcfg.eval) if dcfg.eval is not None else None},
        format=fmt.name if fmt else "",
        format_note=fmt.note if fmt else "",
        template_note=_template_note(template_note, kind, dcfg.train_on),
        stats={k: v for k, v in stats.items() if v is not None},
        full_lengths={k: v for k, v in full.items() if v is not None},
        tokenizer=tokenizer,
    )


def hold_out(train, fraction: float, seed: int):
    """(train, eval) with `fraction` of the rows held out (`data.eval: 0.1`)."""
    if len(train) < 2:
        raise ConfigError("too few rows to hold out an eval split. Fix: add rows or set `eval: null`.", key="data.eval")
    split = train.train_test_split(test_size=fraction, seed=seed)
    return split["train"], split["test"]


def shape_rows(ds, dcfg, task, key):
    """Detect the data's format (causal-lm) or kind, check the rows, and normalise conversations (before any
    split, so errors name the user's row). Returns (dataset, kind, `formats.Detected` or None)."""
    fmt = None
    if task == "causal-lm":
        from . import formats

        fmt = formats.detect(ds, dcfg, key)
        kind = fmt.kind
    else:
        kind = detect_kind(ds, dcfg, task, key)
    check_rows(ds, kind, dcfg, key)
    if fmt is not None:
        ds = formats.normalize(ds, fmt, dcfg.train_on, key)
    return ds, kind, fmt


def _template_note(note: str, kind: str, train_on: str) -> str:
    """What the dry run says about the chat template, for the kinds that use one."""
    if kind not in ("instruction", "chat"):
        return ""
    what = {"assistant": "every assistant turn trained", "last": "the last assistant turn trained",
            "all": "every token trained"}[train_on]  # fmt: skip
    return f"{note} · {what} (data.train_on)"
