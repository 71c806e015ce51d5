"""The four tasks on tiny models (causal-lm plain and instruction/chat with the prompt masked, seq-cls,
token-cls with sub-token alignment, seq2seq on a tiny T5), their evaluation metrics, and how `%peft_eval` and
`%peft_generate` show them."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import instruction_rows, lm_rows, make_tokenizer, publishing_shell, sentiment_rows

import peft_magic
from peft_magic.config.parse import parse_config
from peft_magic.data.prepare import prepare
from peft_magic.errors import ConfigError

torch.set_num_threads(1)  # two shared CPU cores: one intra-op thread is much faster for tiny matmuls


def losses(run):
    return [r["loss"] for r in run.history if "loss" in r]


def cfg_of(model, task="causal-lm", data=None, **train):
    return {"model": model, "task": task, "method": {"name": "lora", "r": 4}, "data": data,
            "train": {"max_steps": 12, "learning_rate": 1e-2, "logging_steps": 4, "eval_steps": 0, **train}}  # fmt: skip


def prepared(model, task, data, tokenizer=None):
    cfg = parse_config({"model": model, "task": task, "data": data})
    return prepare(cfg, tokenizer or make_tokenizer())


# ---------------------------------------------------------------- causal-lm


def test_plain_text_trains_on_every_token_and_reports_perplexity(tiny_llama, tmp_path):
    data = prepared(tiny_llama, "causal-lm", {"train": lm_rows(4)})
    row = data.train[0]
    assert data.kind == "text" and row["labels"] == row["input_ids"]
    run = peft_magic.train(cfg_of(tiny_llama, data={"train": lm_rows(), "eval": lm_rows(8, seed=3)}, output_dir=str(tmp_path)), display="none")  # fmt: skip
    assert losses(run)[-1] < losses(run)[0]
    assert set(run.metrics) == {"loss", "perplexity"}
    assert run.metrics["perplexity"] == pytest.approx(torch.tensor(run.metrics["loss"]).exp().item(), rel=1e-6)


def test_instruction_rows_mask_exactly_the_prompt(tiny_llama, tokenizer):
    data = prepared(tiny_llama, "causal-lm", {"train": instruction_rows(4)})
    assert data.kind == "instruction"
    for i, source in enumerate(instruction_rows(4)):
        row = data.train[i]
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": source["prompt"]}], tokenize=True,
                                               add_generation_prompt=True)  # fmt: skip
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        n = len(prompt)
        assert row["input_ids"][:n] == prompt
        assert row["labels"][:n] == [-100] * n  # the whole prompt, template markers included, is masked
        assert row["labels"][n:] == row["input_ids"][n:]  # and nothing else is
        assert tokenizer.decode(row["labels"][n:]) == f"{source['response']} </s>"


def test_chat_messages_train_every_answer_or_only_the_last(tiny_llama, tokenizer):
    chat = [{"messages": [{"role": "system", "content": "say yes"}, {"role": "user", "content": "hello"},
                          {"role": "assistant", "content": "yes"}, {"role": "user", "content": "say no"},
                          {"role": "assistant", "content": "no ok"}]}]  # fmt: skip
    data = prepared(tiny_llama, "causal-lm", {"train": chat})
    assert data.kind == "chat"
    kept = [t for t in data.train[0]["labels"] if t != -100]
    assert tokenizer.decode(kept) == "yes </s> no ok </s>"  # data.train_on: assistant (the default)
    row = prepared(tiny_llama, "causal-lm", {"train": chat, "train_on": "last"}).train[0]
    kept = [t for t in row["labels"] if t != -100]
    assert tokenizer.decode(kept) == "no ok </s>"  # the earlier answer "yes" is context, not target
    n = row["labels"].index(kept[0])
    assert row["labels"][n:] == row["input_ids"][n:] and set(row["labels"][:n]) == {-100}


def test_instruction_without_chat_template_masks_the_prompt_line(tiny_llama):
    tok = make_tokenizer()
    tok.chat_template = None
    data = prepared(tiny_llama, "causal-lm", {"train": [{"prompt": "say hello", "response": "hello world"}]}, tok)
    row = data.train[0]
    prompt = tok("say hello\n")["input_ids"]
    assert row["labels"][: len(prompt)] == [-100] * len(prompt)
    assert tok.decode(row["labels"][len(prompt):]) == "hello world </s>"


def test_instruction_tuning_learns_the_answers(tiny_llama, tmp_path):
    run = peft_magic.train(cfg_of(tiny_llama, data={"train": instruction_rows(), "eval": instruction_rows(8)},
                                  max_steps=30, output_dir=str(tmp_path)), display="none")  # fmt: skip
    assert losses(run)[-1] < losses(run)[0] * 0.85
    assert run.metrics["perplexity"] < 20


# ---------------------------------------------------------------- seq-cls


def test_seq_cls_reports_classification_metrics(separable_bert, tmp_path):
    run = peft_magic.train(cfg_of(separable_bert, "seq-cls", {"train": sentiment_rows(), "eval": sentiment_rows(20, seed=5)},
                                  output_dir=str(tmp_path)), display="none")  # fmt: skip
    m = run.metrics
    assert {"loss", "accuracy", "precision", "recall", "f1", "f1_per_class", "confusion_matrix"} <= set(m)
    assert run.labels == ["neg", "pos"] and set(m["f1_per_class"]) == {"neg", "pos"}
    cm = m["confusion_matrix"]
    assert len(cm) == 2 and sum(map(sum, cm)) == 20
    assert m["accuracy"] == pytest.approx((cm[0][0] + cm[1][1]) / 20)
    assert losses(run)[-1] < losses(run)[0]


# ---------------------------------------------------------------- token-cls

TAGS = {"paris": "LOC", "london": "LOC", "cat": "ANIMAL", "dog": "ANIMAL", "walking": "ACT", "played": "ACT",
        "walked": "ACT", "playing": "ACT"}  # fmt: skip
FILLER = ["the", "sat", "on", "mat", "in", "visit"]


def wordpiece_tokenizer():
    """A WordPiece tokenizer that splits walking/played into two sub-tokens (walk ##ing, play ##ed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "paris", "london", "cat", "dog", "walk", "play", "##ing", "##ed",
             *FILLER]  # fmt: skip
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")  # fmt: skip


def tagged_rows(n=48, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(list(TAGS) + FILLER) for _ in range(rng.randint(3, 7))]
        rows.append({"tokens": words, "tags": [TAGS.get(w, "O") for w in words]})
    return rows


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    """A tiny BERT body saved with the WordPiece tokenizer (no dropout, wider init so 20 steps can learn)."""
    from transformers import BertConfig, BertModel

    tok = wordpiece_tokenizer()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=64, pad_token_id=0, initializer_range=0.2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    path = tmp_path_factory.mktemp("tagger")
    BertModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_token_cls_labels_sit_on_the_first_sub_token(tagger):
    tok = wordpiece_tokenizer()
    rows = [{"tokens": ["the", "cat", "walking", "in", "paris"], "tags": ["O", "ANIMAL", "ACT", "O", "LOC"]}]
    data = prepared(tagger, "token-cls", {"train": rows}, tok)
    assert data.kind == "tokens" and data.labels == ["ACT", "ANIMAL", "LOC", "O"]
    row = data.train[0]
    assert tok.convert_ids_to_tokens(row["input_ids"]) == ["[CLS]", "the", "cat", "walk", "##ing", "in", "paris", "[SEP]"]  # fmt: skip
    ids = {name: i for i, name in enumerate(data.labels)}
    assert row["labels"] == [-100, ids["O"], ids["ANIMAL"], ids["ACT"], -100, ids["O"], ids["LOC"], -100]


def test_token_cls_integer_tags_keep_their_ids(tagger):
    rows = [{"tokens": ["the", "cat"], "tags": [0, 2]}, {"tokens": ["paris"], "tags": [1]}]
    data = prepared(tagger, "token-cls", {"train": rows}, wordpiece_tokenizer())
    assert data.labels == [0, 1, 2] and data.train[0]["labels"] == [-100, 0, 2, -100]


def test_token_cls_trains_and_reports_per_tag_metrics(tagger, tmp_path):
    run = peft_magic.train(cfg_of(tagger, "token-cls", {"train": tagged_rows(), "eval": tagged_rows(16, seed=1)},
                                  max_steps=20, learning_rate=2e-2, output_dir=str(tmp_path)), display="none")  # fmt: skip
    m = run.metrics
    assert losses(run)[-1] < losses(run)[0] * 0.8
    words = sum(len(r["tokens"]) for r in tagged_rows(16, seed=1))
    assert sum(map(sum, m["confusion_matrix"])) == words  # one prediction per word, not per sub-token
    assert set(m["f1_per_class"]) == {"ACT", "ANIMAL", "LOC", "O"} and m["accuracy"] > 0.5
    metrics = run.evaluate(tagged_rows(8, seed=2))  # other data: same metrics, recorded in history
    assert run.history[-1]["eval_accuracy"] == metrics["accuracy"] and run.metrics is metrics


@pytest.mark.parametrize(
    "rows, fragment, key",
    [
        ([{"tokens": ["the", "cat"], "tags": ["O"]}], "2 words", "data.train"),
        ([{"tokens": "the cat", "tags": ["O", "O"]}], "list of words", "data.train"),
        ([{"words": ["the"], "tags": ["O"]}], "tokens_column", "data.train"),
    ],
)
def test_token_cls_data_mistakes_name_the_fix(tagger, rows, fragment, key):
    with pytest.raises(ConfigError, match=fragment) as e:
        prepared(tagger, "token-cls", {"train": rows}, wordpiece_tokenizer())
    assert e.value.key == key


def test_token_cls_unseen_eval_tags_are_refused(tagger):
    with pytest.raises(ConfigError, match="PER"):
        prepared(tagger, "token-cls", {"train": [{"tokens": ["cat"], "tags": ["ANIMAL"]}],
                                       "eval": [{"tokens": ["cat"], "tags": ["PER"]}]}, wordpiece_tokenizer())  # fmt: skip


# ---------------------------------------------------------------- seq2seq


@pytest.fixture(scope="module", params=["t5", "bart"])
def encoder_decoder(request, tmp_path_factory):
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    tok = make_tokenizer()
    torch.manual_seed(0)
    if request.param == "t5":
        model = T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=32, d_ff=64, d_kv=16, num_layers=2,
                                                    num_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                                    decoder_start_token_id=tok.pad_token_id))  # fmt: skip
    else:
        model = BartForConditionalGeneration(BartConfig(vocab_size=len(tok), d_model=32, encoder_layers=2, decoder_layers=2,
                                                        encoder_attention_heads=2, decoder_attention_heads=2,
                                                        encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                                                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                                        eos_token_id=tok.eos_token_id,
                                                        decoder_start_token_id=tok.eos_token_id, dropout=0.0,
                                                        init_std=0.2))  # fmt: skip  (0.02: too flat to learn in 20 steps)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_seq2seq_trains_on_prompt_response_pairs(encoder_decoder, tmp_path):
    data = prepared(encoder_decoder, "seq2seq", {"train": instruction_rows(4)})
    assert data.kind == "instruction"
    assert make_tokenizer().decode(data.train[0]["labels"], skip_special_tokens=True) == "yes"  # targets = response
    run = peft_magic.train(cfg_of(encoder_decoder, "seq2seq", {"train": instruction_rows(), "eval": instruction_rows(8)},
                                  max_steps=20, learning_rate=2e-2, output_dir=str(tmp_path)), display="none")  # fmt: skip
    assert losses(run)[-1] < losses(run)[0] * 0.8
    assert set(run.metrics) == {"loss", "perplexity"}
    assert isinstance(run.generate("say yes", max_new_tokens=3), str)


# ---------------------------------------------------------------- %peft_eval / %peft_generate


@pytest.fixture
def shell():
    yield from publishing_shell()


@pytest.fixture(scope="module")
def classifier(separable_bert, tmp_path_factory):
    return peft_magic.train(cfg_of(separable_bert, "seq-cls", {"train": sentiment_rows(), "eval": sentiment_rows(12, seed=4)},
                                   max_steps=4, output_dir=str(tmp_path_factory.mktemp("cls"))), display="none")  # fmt: skip


def test_peft_eval_shows_metrics_and_confusion_matrix_and_records_them(shell, classifier, sentiment):
    shell.user_ns.update(clf=classifier, holdout=sentiment.head(10))
    before = len(classifier.history)
    assert shell.run_line_magic("peft_eval", "clf --data $holdout") is None
    row = classifier.history[-1]
    assert len(classifier.history) == before + 1 and row["step"] == 4
    assert row["eval_accuracy"] == classifier.metrics["accuracy"]
    assert sum(map(sum, classifier.metrics["confusion_matrix"])) == 10
    (data,) = shell.published
    assert "accuracy" in data["text/plain"] and "F1" in data["text/plain"]
    html = data["text/html"]
    assert "<svg" in html and "peft-confusion-matrix" in html and "neg" in html and "pos" in html


def test_model_card_has_the_evaluated_metrics(classifier, tmp_path):
    classifier.evaluate(sentiment_rows(10, seed=9))
    card = open(f"{classifier.export(tmp_path / 'card')}/README.md").read()
    assert "| accuracy | " + format(classifier.metrics["accuracy"], ".4g") + " |" in card


def test_peft_eval_without_eval_data_says_how(shell, tiny_llama, tmp_path):
    shell.user_ns["lm"] = peft_magic.train(cfg_of(tiny_llama, data={"train": lm_rows(8)}, max_steps=1,
                                                  output_dir=str(tmp_path)), display="none")  # fmt: skip
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match="data.eval"):
        shell.run_line_magic("peft_eval", "lm")


def test_peft_generate_shows_base_and_adapter_side_by_side(shell, tiny_llama, tmp_path):
    run = peft_magic.train(cfg_of(tiny_llama, data={"train": instruction_rows()}, max_steps=30,
                                  output_dir=str(tmp_path)), display="none")  # fmt: skip
    shell.user_ns["chat"] = run
    shell.run_line_magic("peft_generate", 'chat "say hello"')
    (data,) = shell.published
    html, text = data["text/html"], data["text/plain"]
    tuned = run.generate("say hello")
    with run.model.disable_adapter():
        base = run.generate("say hello")
    assert tuned.startswith("hello") and tuned != base  # trained: the answer changed
    assert "<table" in html and html.index("base model") < html.index("with adapter")
    assert html.index(base) < html.index(tuned) if base else tuned in html
    assert text.splitlines() == ["prompt: say hello", f"base:   {base}", f"tuned:  {tuned}"]
