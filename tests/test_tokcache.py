"""Tokenization cache: a re-run with the same data, tokenizer and settings reuses the tokens; any change misses."""

from __future__ import annotations

import os

import pytest
from conftest import lm_rows, make_tokenizer, sentiment_rows


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_MAGIC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tokenized"


@pytest.fixture
def calls(monkeypatch):
    """Counts real tokenizations (cache misses)."""
    from peft_magic.data import prepare as data

    seen = []
    real = data.tokenize

    def counting(*args, **kwargs):
        seen.append(args[0]._fingerprint)
        return real(*args, **kwargs)

    monkeypatch.setattr(data, "tokenize", counting)
    return seen


def _dcfg(**kw):
    from peft_magic.config.schema import DataConfig

    return DataConfig(train="x", **kw)


def _ds(rows):
    import datasets

    return datasets.Dataset.from_list(rows)


def test_second_identical_call_reads_the_cache(cache, calls):
    from peft_magic.data.cache import cached_tokenize

    first = cached_tokenize(_ds(lm_rows()), make_tokenizer(), _dcfg(), "text", "causal-lm")
    # a new kernel rebuilds equal objects: a fresh dataset and tokenizer must give the same key
    second = cached_tokenize(_ds(lm_rows()), make_tokenizer(), _dcfg(), "text", "causal-lm")
    assert len(calls) == 1
    assert second["input_ids"] == first["input_ids"] and second["labels"] == first["labels"]
    assert second.cache_files and all(str(cache) in f["filename"] for f in second.cache_files)
    assert len(os.listdir(cache)) == 1


@pytest.mark.parametrize("change", ["rows", "max_length", "tokenizer", "labels", "column"])
def test_any_change_that_shapes_the_tokens_misses(cache, calls, change):
    from peft_magic.data.cache import cached_tokenize

    rows, tok, dcfg, labels = sentiment_rows(), make_tokenizer(), _dcfg(), ["neg", "pos"]
    cached_tokenize(_ds(rows), tok, dcfg, "classification", "seq-cls", labels)
    if change == "rows":
        rows = rows[:-1] + [{"text": "the film was not good", "label": "neg"}]
    elif change == "max_length":
        dcfg = _dcfg(max_length=4)
    elif change == "tokenizer":
        tok = make_tokenizer()
        tok.add_tokens(["film was"])
    elif change == "labels":
        labels = ["pos", "neg"]
    else:
        rows = [{"review": r["text"], "label": r["label"]} for r in rows]
        dcfg = _dcfg(text_column="review")
    out = cached_tokenize(_ds(rows), tok, dcfg, "classification", "seq-cls", labels)
    assert len(calls) == 2
    fresh = __import__("peft_magic.data.prepare", fromlist=["tokenize"])
    assert out["input_ids"] == fresh.tokenize(_ds(rows), tok, dcfg, "classification", "seq-cls", labels)["input_ids"]


def test_disabled_cache_writes_nothing(cache, calls):
    from peft_magic.data.cache import cached_tokenize

    for _ in range(2):
        cached_tokenize(_ds(lm_rows()), make_tokenizer(), _dcfg(), "text", "causal-lm", enabled=False)
    assert len(calls) == 2 and not cache.exists()


def test_an_interrupted_write_is_ignored(cache, calls):
    from peft_magic.data.cache import _READY, cached_tokenize

    cached_tokenize(_ds(lm_rows()), make_tokenizer(), _dcfg(), "text", "causal-lm")
    (entry,) = cache.iterdir()
    (entry / _READY).unlink()  # as if the process died before finishing the write
    again = cached_tokenize(_ds(lm_rows()), make_tokenizer(), _dcfg(), "text", "causal-lm")
    assert len(calls) == 2 and len(again) == len(lm_rows())
    assert (entry / _READY).is_file()


def test_prune_keeps_the_most_recently_used(cache):
    from peft_magic.data.cache import cached_tokenize, prune

    for n in (10, 11, 12):
        cached_tokenize(_ds(lm_rows(n)), make_tokenizer(), _dcfg(), "text", "causal-lm")
    entries = sorted(cache.iterdir(), key=lambda p: p.stat().st_mtime)
    os.utime(entries[0])  # the oldest is used again
    prune(str(cache), keep=2)
    assert sorted(cache.iterdir()) == sorted([entries[0], entries[2]])


def test_a_rerun_of_prepare_skips_tokenization(cache, calls, tiny_llama):
    from peft_magic.config.parse import parse_config
    from peft_magic.data.prepare import prepare

    cfg = parse_config({"model": tiny_llama, "data": {"train": lm_rows(), "eval": 0.25}})
    one = prepare(cfg, make_tokenizer())
    two = prepare(cfg, make_tokenizer())
    assert len(calls) == 2  # train and eval, once each
    assert two.train["input_ids"] == one.train["input_ids"] and two.eval["input_ids"] == one.eval["input_ids"]
    assert two.train_tokens == one.train_tokens


def _bert_tokenizer(extra=()):
    """A WordPiece tokenizer that keeps its 300-word vocabulary beside the backend, as BERT's and MiniLM's do."""
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(300)] + list(extra)
    return BertTokenizer(vocab={w: i for i, w in enumerate(words)})


def test_tokenizer_hash_follows_the_vocabulary_table():
    """The cheap hash (the vocabulary table as one string) is stable across fresh tokenizers and after a
    truncating call, and changes with the table and with a setting that shapes the tokens."""
    from peft_magic.data.cache import _plain_table, tokenizer_hash

    tok = _bert_tokenizer()
    assert any(_plain_table(v) for v in vars(tok).values())  # the compact path is the one tested
    key = tokenizer_hash(tok)
    tok(["w1 w2 w3 w4"], truncation=True, max_length=3)
    assert tokenizer_hash(tok) == key == tokenizer_hash(_bert_tokenizer())
    assert tokenizer_hash(_bert_tokenizer(extra=["w300"])) != key
    tok.truncation_side = "left"
    assert tokenizer_hash(tok) != key


def test_the_cache_key_is_the_tokenized_sets_fingerprint(cache, monkeypatch):
    """datasets does not hash the tokenizer a second time for the map: the cache key is its new fingerprint."""
    import datasets

    from peft_magic.data.cache import cached_tokenize, fingerprint

    given = []
    real = datasets.Dataset.map

    def recording(self, *args, **kwargs):
        given.append(kwargs.get("new_fingerprint"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "map", recording)
    tok, dcfg, ds = _bert_tokenizer(), _dcfg(), _ds([{"text": "w1 w2", "label": "a"}, {"text": "w3", "label": "b"}])
    out = cached_tokenize(ds, tok, dcfg, "classification", "seq-cls", ["a", "b"])
    assert given[0] == fingerprint(ds, tok, dcfg, "classification", "seq-cls", ["a", "b"])  # then the filter's
    assert out["input_ids"] == [[2, 6, 7, 3], [2, 8, 3]]
