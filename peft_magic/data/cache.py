"""Tokenized datasets kept on disk across re-runs, keyed by a fingerprint of everything that decides the tokens.

Re-running a `%%peft_train` cell with a new learning rate re-tokenizes the same rows with the same tokenizer.
This stores the tokenized set (arrow files, `Dataset.save_to_disk`) and reloads it memory-mapped instead. The
key is datasets' own `Hasher` over:

- the source dataset's `_fingerprint` (datasets derives it from the content for in-memory data, and from the
  files and their modification times for files and hub datasets; splits, shuffles and selections derive theirs
  from it deterministically);
- the tokenizer (datasets hashes its full serialised state: vocabulary, normaliser, special tokens, chat
  template, truncation side; see `tokenizer_hash`);
- the settings that shape the tokens (task, data kind, max_length, the columns read, the label list);
- the source of the tokenizing modules (`prepare`, `formats`, `chat`), so a change to them never reuses stale tokens.

Where: ``$PEFT_MAGIC_CACHE/tokenized`` (default ``~/.cache/peft_magic/tokenized``). The newest `KEEP` entries
are kept; older ones are deleted when a new one is written. `data.cache_tokenized: false` turns it off.
"""

from __future__ import annotations

import os
import shutil
import time

KEEP = 16  # entries kept; each is one tokenized split
_READY = "peft_magic_ok"  # written last: a folder without it is an interrupted write and is ignored


def cache_root() -> str:
    """The cache folder (``$PEFT_MAGIC_CACHE`` or ``~/.cache/peft_magic``), plus ``/tokenized``."""
    base = os.environ.get("PEFT_MAGIC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "peft_magic")
    return os.path.join(base, "tokenized")


def fingerprint(ds, tokenizer, dcfg, kind: str, task: str, labels=None) -> str | None:
    """The cache key, or None when the source has no stable fingerprint (then nothing is cached)."""
    from datasets.fingerprint import Hasher

    source = getattr(ds, "_fingerprint", None)
    if not source:
        return None
    columns = (dcfg.text_column, dcfg.label_column, dcfg.prompt_column, dcfg.response_column, dcfg.messages_column)
    settings = {"kind": kind, "task": task, "max_length": dcfg.max_length, "columns": columns,
                "labels": None if labels is None else [repr(x) for x in labels], "train_on": dcfg.train_on,
                "format": dcfg.format}  # fmt: skip
    code = b"".join(_read(os.path.join(os.path.dirname(__file__), f"{name}.py")) for name in _CODE)
    hasher = Hasher()
    for part in (source, tokenizer_hash(tokenizer), repr(sorted(settings.items())), code):
        hasher.update(part)
    return hasher.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """datasets' `Hasher.hash` of the tokenizer, with each large plain table in its attributes (a vocabulary
    kept beside the backend, merges) hashed as one `repr` string.

    datasets' pickler visits a dict entry by entry in Python: MiniLM's 30,522-entry vocabulary took 0.14 s of
    its 0.15 s hash. The repr of a table of strings and ints says everything the table holds, so the key
    changes exactly when the table does. The copy shares the backend, which datasets' own tokenizer rule
    still hashes (normaliser, model, post-processor, without the truncation/padding a call leaves set).
    """
    from datasets.fingerprint import Hasher

    state = vars(tokenizer)
    if not any(_plain_table(v) for v in state.values()):
        return Hasher.hash(tokenizer)
    compact = object.__new__(type(tokenizer))
    compact.__dict__.update({k: ("repr", type(v).__name__, repr(v)) if _plain_table(v) else v for k, v in state.items()})
    return Hasher.hash(compact)


_PLAIN = (str, int, bytes)


def _plain_table(value) -> bool:
    """A dict or list of at least 256 entries made of strings, ints and tuples of them (a vocabulary, merges)."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((x, 0) for x in value)
    else:
        return False
    if len(value) < 256:
        return False
    return all(_plain(k) and _plain(v) for k, v in items)


def _plain(x) -> bool:
    return isinstance(x, _PLAIN) or (isinstance(x, tuple) and all(isinstance(y, _PLAIN) for y in x))


_CODE = ("prepare", "formats", "chat")  # the modules whose code decides the tokens


def _read(path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def cached_tokenize(ds, tokenizer, dcfg, kind: str, task: str, labels=None, enabled: bool = True, key="data.train"):
    """`data.tokenize(...)`, reusing the result of an earlier identical call when there is one.

    Args:
        ds: The source `datasets.Dataset` (split, filtered and sampled as it will be trained on).
        tokenizer, dcfg, kind, task, labels: As for `data.tokenize`.
        enabled: False: tokenize and store nothing.
        key: The config key that errors name.

    Returns:
        The tokenized `datasets.Dataset`, memory-mapped from the cache when an earlier call stored it.
    """
    from .prepare import tokenize

    found = fingerprint(ds, tokenizer, dcfg, kind, task, labels) if enabled else None
    if found is None:
        return tokenize(ds, tokenizer, dcfg, kind, task, labels, keep_stats=True, key=key)
    hit = lookup(found)
    if hit is not None:
        return hit
    out = tokenize(ds, tokenizer, dcfg, kind, task, labels, keep_stats=True, key=key, fingerprint=found)
    try:
        return _store(found, out)
    except OSError:  # a full or read-only disk must not fail the run: train from memory
        return out


def lookup(key: str):
    """The cached dataset for `key`, or None."""
    import datasets

    path = os.path.join(cache_root(), key)
    if not os.path.isfile(os.path.join(path, _READY)):
        return None
    try:
        ds = datasets.load_from_disk(path)
    except (OSError, ValueError, FileNotFoundError):  # damaged entry: forget it and tokenize again
        shutil.rmtree(path, ignore_errors=True)
        return None
    os.utime(path)  # newest-used entries survive pruning
    return ds


def _store(key: str, ds):
    """Write `ds` under `key` (temp folder + rename, so a crash leaves no half entry); return the on-disk copy."""
    import datasets

    root = cache_root()
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, key)
    tmp = os.path.join(root, f".tmp-{key}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    ds.save_to_disk(tmp)
    open(os.path.join(tmp, _READY), "w").close()
    if os.path.isdir(final) and not os.path.isfile(os.path.join(final, _READY)):
        shutil.rmtree(final, ignore_errors=True)  # a damaged entry (its marker is written before the rename)
    try:
        os.replace(tmp, final)
    except OSError:  # another process stored the same key first: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)
    prune(root, KEEP)
    return datasets.load_from_disk(final)


def prune(root: str | None = None, keep: int = KEEP) -> None:
    """Delete all but the `keep` most recently used entries (and leftovers of interrupted writes)."""
    root = root or cache_root()
    if not os.path.isdir(root):
        return
    entries = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith(".tmp-"):
            if time.time() - os.path.getmtime(path) > 3600:  # an hour old: its writer is gone
                shutil.rmtree(path, ignore_errors=True)
            continue
        if os.path.isdir(path):
            entries.append((os.path.getmtime(path), path))
    for _, path in sorted(entries, reverse=True)[keep:]:
        shutil.rmtree(path, ignore_errors=True)


def clear() -> None:
    """Delete every cached tokenized dataset."""
    shutil.rmtree(cache_root(), ignore_errors=True)
