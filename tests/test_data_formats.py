"""Data shapes (alpaca, ShareGPT, messages, TRL prompt/completion, prompt/response, text), chat templates, the label
mask of multi-turn conversations, the preview of what is trained, and bad input: each one line naming row and fix."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tokenizer

import peft_magic
from peft_magic.config.parse import parse_config
from peft_magic.data import chat, formats
from peft_magic.data.prepare import prepare
from peft_magic.data.preview import LengthStats
from peft_magic.errors import ConfigError

torch.set_num_threads(1)

WORDS = ["the", "a", "cat", "sat", "on", "mat", "say", "yes", "no", "hello", "world", "ok", "be", "nice", "what",
         "is", "it", "user", "assistant", "system", "model", "[INST]", "[/INST]"]  # fmt: skip
MARKERS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
           "<start_of_turn>", "<end_of_turn>", "<|user|>", "<|assistant|>", "<|system|>"]  # fmt: skip
TWO_TURNS = [{"role": "user", "content": "say yes"}, {"role": "assistant", "content": "yes"},
             {"role": "user", "content": "say no"}, {"role": "assistant", "content": "no ok"}]  # fmt: skip
SYSTEM = [{"role": "system", "content": "be nice"}]


def word_tokenizer():
    """Whole words and every template's markers as single tokens: masks can be written out token by token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>", *MARKERS, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", additional_special_tokens=MARKERS)  # fmt: skip


def bpe_tokenizer():
    """Byte-level BPE, as most chat models use: newlines and spaces are tokens, merges cross turn boundaries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", *MARKERS]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["say yes. say no! hello world, what is it? the cat sat on the mat.\n\nok [INST] [/INST] user assistant"]
    tok.train_from_iterator(corpus * 20, trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", additional_special_tokens=MARKERS)  # fmt: skip


def prepared(data, tokenizer=None, model="unused/model"):
    cfg = parse_config({"model": model, "data": data})
    return prepare(cfg, tokenizer if tokenizer is not None else make_tokenizer())


def marked(tokenizer, row) -> list[str]:
    """The example's tokens, trained ones in [brackets]."""
    toks = tokenizer.convert_ids_to_tokens(row["input_ids"])
    return [f"[{t}]" if lab != -100 else t for t, lab in zip(toks, row["labels"])]


# ---------------------------------------------------------------- detecting each format

ROWS = {
    "alpaca": [{"instruction": "say", "input": "yes", "output": "yes"}, {"instruction": "say no", "input": "", "output": "no"}],
    "sharegpt": [{"conversations": [{"from": "system", "value": "be nice"}, {"from": "human", "value": "say yes"},
                                    {"from": "gpt", "value": "yes"}]}],
    "messages": [{"messages": SYSTEM + TWO_TURNS}],
    "prompt_completion": [{"prompt": "say yes", "completion": " yes"}],
    "prompt_response": [{"prompt": "say yes", "response": "yes"}],
    "text": [{"text": "the cat sat on the mat"}],
}  # fmt: skip


@pytest.mark.parametrize("name", list(ROWS))
def test_each_format_is_detected_from_its_columns(name):
    data = prepared({"train": ROWS[name] * 4})
    assert data.format == name
    assert data.format_note.startswith(name)


def test_conversational_prompt_completion_trains_the_completion_only():
    tok = word_tokenizer()
    row = {"prompt": SYSTEM + TWO_TURNS[:3], "completion": [TWO_TURNS[3]]}
    data = prepared({"train": [row], "chat_template": "chatml"}, tok)
    assert data.format == "prompt_completion" and data.kind == "chat"
    trained = [t for t in marked(tok, data.train[0]) if t.startswith("[")]
    assert trained == ["[no]", "[ok]", "[<|im_end|>]"]  # the earlier answer "yes" is part of the prompt


def test_plain_prompt_completion_continues_the_prompt_without_a_template():
    tok = make_tokenizer()
    data = prepared({"train": ROWS["prompt_completion"]}, tok)
    assert data.kind == "completion"
    assert marked(tok, data.train[0]) == ["say", "yes", "[yes]", "[</s>]"]


def test_when_two_formats_fit_the_note_says_which_and_how_to_pick_the_other():
    rows = [{"instruction": "say yes", "output": "yes", "text": "say yes yes"}] * 4
    data = prepared({"train": rows})
    assert data.format == "alpaca"
    assert "also fits text" in data.format_note and "`data.format: text`" in data.format_note
    assert prepared({"train": rows, "format": "text"}).format == "text"
    with pytest.raises(ConfigError, match=r"data.format: sharegpt.*needs a 'conversations' column.*instruction"):
        prepared({"train": rows, "format": "sharegpt"})


def test_messages_given_as_json_text_are_read():
    import json

    data = prepared({"train": [{"messages": json.dumps(TWO_TURNS)}]})
    assert data.format == "messages" and data.train_rows == 1


@pytest.mark.parametrize("name", list(ROWS))
def test_each_format_trains(name, tiny_llama, tmp_path):
    # no dropout: 12 steps at lr 2e-2 on a tiny model swing with the dropout's draws (what is tested is the format)
    run = peft_magic.train({"model": tiny_llama, "method": {"name": "lora", "r": 4, "lora_dropout": 0.0},
                            "data": {"train": ROWS[name] * 8},
                            "train": {"max_steps": 12, "learning_rate": 2e-2, "logging_steps": 4, "eval_steps": 0,
                                      "output_dir": str(tmp_path)}}, display="none")  # fmt: skip
    losses = [r["loss"] for r in run.history if "loss" in r]
    assert run.data.format == name and losses[-1] < losses[0]


# ---------------------------------------------------------------- the label mask, token by token


def masked(template, messages, train_on="assistant", tokenizer=None):
    tok = tokenizer or word_tokenizer()
    tok.chat_template = chat.builtin(template, tok)
    ids, labels, _ = chat.Encoder(tok, train_on=train_on, max_length=512).conversation(messages)
    return marked(tok, {"input_ids": ids, "labels": labels})


def test_chatml_two_turns_trains_both_answers_and_their_end_markers():
    assert masked("chatml", TWO_TURNS) == [
        "<|im_start|>", "user", "say", "yes", "<|im_end|>",
        "<|im_start|>", "assistant", "[yes]", "[<|im_end|>]",
        "<|im_start|>", "user", "say", "no", "<|im_end|>",
        "<|im_start|>", "assistant", "[no]", "[ok]", "[<|im_end|>]",
    ]  # fmt: skip


def test_llama3_two_turns_with_a_system_turn():
    assert masked("llama3", SYSTEM + TWO_TURNS) == [
        "<s>", "<|start_header_id|>", "system", "<|end_header_id|>", "be", "nice", "<|eot_id|>",
        "<|start_header_id|>", "user", "<|end_header_id|>", "say", "yes", "<|eot_id|>",
        "<|start_header_id|>", "assistant", "<|end_header_id|>", "[yes]", "[<|eot_id|>]",
        "<|start_header_id|>", "user", "<|end_header_id|>", "say", "no", "<|eot_id|>",
        "<|start_header_id|>", "assistant", "<|end_header_id|>", "[no]", "[ok]", "[<|eot_id|>]",
    ]  # fmt: skip


def test_mistral_folds_the_system_turn_into_the_first_question():
    assert masked("mistral", SYSTEM + TWO_TURNS) == [
        "<s>", "[INST]", "be", "nice", "say", "yes", "[/INST]", "[yes]", "[</s>]",
        "[INST]", "say", "no", "[/INST]", "[no]", "[ok]", "[</s>]",
    ]  # fmt: skip


def test_chatml_with_a_system_turn_and_the_other_train_on_choices():
    full = SYSTEM + TWO_TURNS
    assert masked("chatml", full, "last") == [
        "<|im_start|>", "system", "be", "nice", "<|im_end|>",
        "<|im_start|>", "user", "say", "yes", "<|im_end|>",
        "<|im_start|>", "assistant", "yes", "<|im_end|>",
        "<|im_start|>", "user", "say", "no", "<|im_end|>",
        "<|im_start|>", "assistant", "[no]", "[ok]", "[<|im_end|>]",
    ]  # fmt: skip
    assert all(t.startswith("[") for t in masked("chatml", full, "all"))


def test_a_base_tokenizer_learns_to_end_its_answer_with_eos():
    tok = make_tokenizer()  # <|im_end|> is not one of its tokens: the template adds </s> after it
    tok.chat_template = chat.builtin("chatml", tok)
    assert chat.render(tok, TWO_TURNS[:2], tok.chat_template).endswith("yes<|im_end|></s>\n")


@pytest.mark.parametrize("make", [word_tokenizer, bpe_tokenizer])
@pytest.mark.parametrize("template", list(chat.BUILTIN))
def test_generation_markers_and_turn_by_turn_rendering_agree(template, make):
    tok = make()
    tok.chat_template = chat.builtin(template, tok)
    encoder = chat.Encoder(tok)
    assert encoder.markers
    for messages in (TWO_TURNS, SYSTEM + TWO_TURNS, TWO_TURNS[:2]):
        by_markers = encoder._owners_by_markers(messages)
        assert by_markers == encoder._owners_by_turns(messages)
        assert any(o >= 0 for o in by_markers[1])


def test_a_template_without_markers_is_masked_turn_by_turn():
    tok = make_tokenizer()  # conftest's template has no {% generation %}
    encoder = chat.Encoder(tok)
    assert not encoder.markers
    ids, labels, _ = encoder.conversation(SYSTEM + TWO_TURNS)
    assert marked(tok, {"input_ids": ids, "labels": labels}) == [
        "<|system|>", "<unk>", "nice", "<|user|>", "say", "yes", "<|assistant|>", "[yes]", "[</s>]",
        "<|user|>", "say", "no", "<|assistant|>", "[no]", "[ok]", "[</s>]",
    ]  # fmt: skip


# ---------------------------------------------------------------- chat templates


def test_chat_template_is_saved_with_the_tokenizer_and_used_to_generate(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    from peft_magic.inference import format_prompt

    run = peft_magic.train({"model": tiny_llama, "method": {"name": "lora", "r": 4},
                            "data": {"train": ROWS["messages"] * 8, "chat_template": "zephyr"},
                            "train": {"max_steps": 2, "output_dir": str(tmp_path / "run")}}, display="none")  # fmt: skip
    assert run.data.template_note.startswith("zephyr")
    assert format_prompt(run.tokenizer, "say yes") == "<|user|>\nsay yes</s>\n<|assistant|>\n"
    out = run.export(str(tmp_path / "adapter"))
    assert AutoTokenizer.from_pretrained(out).chat_template == chat.builtin("zephyr", run.tokenizer)


def test_a_jinja_string_and_a_file_are_accepted(tmp_path):
    text = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    (tmp_path / "t.jinja").write_text(text)
    for spec in (text, str(tmp_path / "t.jinja")):
        tok = make_tokenizer()
        data = prepared({"train": ROWS["prompt_response"], "chat_template": spec}, tok)
        assert tok.chat_template == text and data.template_note.startswith("custom")


# ---------------------------------------------------------------- preview and truncation


def test_preview_html_highlights_exactly_the_trained_text():
    tok = word_tokenizer()
    data = prepared({"train": [{"messages": TWO_TURNS}], "chat_template": "chatml"}, tok)
    html = data.preview(0)._repr_html_()
    assert "<span style='background:#bbf7d0;color:#14532d' title='trained'>yes &lt;|im_end|&gt;</span>" in html
    assert "messages (messages)" in html and "chatml" in html and "trained" in html
    assert html.count("title='trained'") == 2  # the two answers, nothing else


def test_preview_in_a_terminal_brackets_or_colours_the_trained_text():
    tok = word_tokenizer()
    data = prepared({"train": [{"messages": TWO_TURNS}], "chat_template": "chatml"}, tok)
    text = str(data.preview(0))
    assert "[[yes <|im_end|>]]" in text and "[[no ok <|im_end|>]]" in text and "\x1b[" not in text
    assert "example 0 · 19 tokens · 5 trained (26%)" in text
    coloured = data.preview(0).text(color=True)
    assert "\x1b[1;32myes <|im_end|>\x1b[0m" in coloured and "[[" not in coloured


def test_preview_of_a_list_or_a_range_of_examples():
    from IPython.lib.pretty import pretty

    tok = word_tokenizer()
    rows = [{"messages": TWO_TURNS}, {"messages": TWO_TURNS[:2]}, {"messages": SYSTEM + TWO_TURNS[:2]}]
    data = prepared({"train": rows, "chat_template": "chatml"}, tok)
    assert [e.index for e in data.preview([2, 0]).examples] == [2, 0]
    assert [(e.index, e.tokens) for e in data.preview(range(1, 3)).examples] == [(1, 9), (2, 14)]
    html = data.preview(range(3))._repr_html_()
    assert html.count("<pre") == 3 and html.count("title='trained'") == 4  # 2 answers + 1 + 1
    assert pretty(data.preview([1])) == str(data.preview(1))  # IPython's terminal, not a tty here: brackets
    assert "example 1 · 9 tokens · 2 trained (22%)" in pretty(data.preview([1]))
    with pytest.raises(ConfigError, match=r"preview: there is no example 3: the train split has 3\. Fix: pick 0 to 2"):
        data.preview([0, 3])


def test_truncation_is_counted_and_rows_that_lose_their_answer_are_dropped():
    tok = word_tokenizer()
    short = {"prompt": "say yes", "response": "yes"}  # chatml: 9 tokens
    long_ = {"prompt": "say " + "yes " * 20, "response": "ok"}  # 28 tokens: the answer is past token 12
    cut = {"prompt": "say yes", "response": "no " * 5}  # 13 tokens: cut at 12, part of the answer survives
    rows = [short] * 16 + [long_] * 3 + [cut]
    data = prepared({"train": rows, "chat_template": "chatml", "max_length": 12}, tok)
    stats = data.stats["train"]
    assert (stats.rows, stats.truncated, stats.dropped) == (20, 4, 3)
    assert data.train_rows == 17  # the three long rows trained on nothing: gone
    assert stats.keep_whole == 28  # 17 of 20 rows fit in 13 tokens: 95% whole needs the long ones' 28
    assert "20% of rows are longer than max_length 12" in stats.warning()
    assert "3 lost their whole answer" in stats.warning() and "`data.max_length: 28`" in stats.warning()
    assert "cut from 13" in str(data.preview(16))


def test_length_figures_of_a_crafted_set():
    full = [10] * 95 + [40] * 5
    stats = LengthStats.measure(full, [min(n, 32) for n in full], [3] * 100, max_length=32)
    assert (stats.truncated, stats.dropped, stats.keep_whole) == (5, 0, 10)
    assert stats.warning() and "5% of rows" in stats.warning()
    assert LengthStats.measure([10] * 100, [10] * 100, [3] * 100, 32).warning() is None


# ---------------------------------------------------------------- bad input: one line naming the row and the fix


@pytest.mark.parametrize(
    "rows, extra, pattern",
    [
        ([{"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yes"}]}], {},
         r"data.train: row 0, turn 1: unknown ShareGPT role 'bot'.*Fix: use human, gpt or system"),
        ([{"messages": TWO_TURNS}, {"messages": []}], {}, r"row 1: the conversation is empty\. Fix:"),
        ([{"messages": TWO_TURNS[:3]}], {}, r"row 0: the conversation ends with a user turn.*Fix: end it with"),
        ([{"messages": [TWO_TURNS[0], TWO_TURNS[2], TWO_TURNS[1]]}], {"chat_template": "mistral"},
         r"row 0: the chat template refuses it: Conversation roles must alternate.*Fix: merge consecutive"),
        ([{"messages": "say yes"}], {}, r"row 0: column 'messages' holds a str, not a list of \{role, content\}.*Fix:"),
        ([{"messages": [1, 2]}], {}, r"row 0: column 'messages' holds a list of int.*Fix:"),
        ([{"messages": [{"role": "user", "text": "hi"}]}], {}, r"row 0, message 0: no 'content' key.*Fix:"),
        (ROWS["prompt_response"], {"chat_template": "{% for m in messages %}{{ m.content }"},
         r"data.chat_template: the template does not render: .*Fix: check its Jinja syntax"),
        (ROWS["prompt_response"], {"chat_template": "chatlm"}, r"unknown chat template 'chatlm'. Did you mean 'chatml'"),
        # ShareGPT's own spellings of the same mistakes
        ([*ROWS["sharegpt"], {"conversations": []}], {}, r"row 1: the conversation is empty\. Fix:"),
        ([{"conversations": [{"from": "human", "value": "say yes"}, {"from": "gpt", "value": "yes"},
                             {"from": "human", "value": "say no"}]}], {},
         r"row 0: the conversation ends with a user turn.*Fix: end it with"),
        ([{"conversations": [{"from": "human", "text": "hi"}, {"from": "gpt", "value": "yes"}]}], {},
         r"row 0, turn 0: no 'value' in this ShareGPT turn \(keys: from, text\)\. Fix: give each turn"),
        ([{"messages": {"role": "user", "content": "say yes"}}], {}, r"row 0: column 'messages' holds a dict, not a list.*Fix:"),
        ([{"messages": TWO_TURNS}, {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "ok"}]}],
         {}, r"row 1, column 'messages': a column mixes types across rows.*Fix: give every row's value"),
        ([*ROWS["sharegpt"], {"conversations": [{"from": "human", "value": "say"}, {"from": "human", "value": "yes"},
                                                {"from": "gpt", "value": "yes"}]}], {"chat_template": "gemma"},
         r"row 1: the chat template refuses it: Conversation roles must alternate.*Fix: merge consecutive"),
    ],
)  # fmt: skip
def test_bad_conversations_are_one_line_naming_the_row_and_the_fix(rows, extra, pattern):
    with pytest.raises(ConfigError, match=pattern) as err:
        prepared({"train": rows, **extra}, word_tokenizer())
    assert "\n" not in str(err.value)


def test_the_row_number_is_the_users_even_after_the_eval_split():
    rows = [{"messages": TWO_TURNS}] * 9 + [{"messages": [TWO_TURNS[0], TWO_TURNS[2], TWO_TURNS[1]]}]
    with pytest.raises(ConfigError, match="row 9: the chat template refuses"):
        prepared({"train": rows, "eval": 0.3, "chat_template": "mistral"}, word_tokenizer())


def test_unknown_format_name_suggests_the_right_one():
    with pytest.raises(ConfigError, match="unknown data format 'sharegtp'. Did you mean 'sharegpt'"):
        formats.canonical_name("sharegtp")


# ---------------------------------------------------------------- the dry run and %peft_data


def test_dry_run_shows_the_format_the_template_the_cuts_and_what_is_trained(shell, tiny_llama, capsys):
    shell.user_ns["rows"] = [{"instruction": "say yes", "output": "yes " * n, "text": "x"} for n in range(1, 21)]
    cell = f"model: {tiny_llama}\ndata: {{train: $rows, max_length: 12, chat_template: zephyr}}\ntrain: {{max_steps: 2}}\n"
    shell.run_cell_magic("peft_train", "run --dry-run", cell)
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines() if line and line[0].isalpha()}
    assert list(rows)[:5] == ["model", "method", "data", "format", "template"]
    assert rows["format"] == "alpaca (instruction, output); also fits text: set `data.format: text` to use that"
    assert rows["template"] == "zephyr (data.chat_template) · every assistant turn trained (data.train_on)"
    assert "tokens/example" in rows["tokens"] and "14 of 20 rows cut at max_length 12" in rows["tokens"]
    assert rows["warning"].endswith("Fix: `data.max_length: 25` keeps 95% of rows whole.")
    assert "example 0 · " in out and "[[yes" in out  # the preview, trained text bracketed


def test_peft_data_shows_a_trained_runs_examples(shell, tiny_llama, capsys):
    shell.user_ns["rows"] = ROWS["sharegpt"] * 8
    shell.run_cell_magic("peft_train", "run", f"model: {tiny_llama}\ndata: {{train: $rows}}\ntrain: {{max_steps: 1}}\n")
    capsys.readouterr()
    shell.run_line_magic("peft_data", "run -i 1 -n 2")
    out = capsys.readouterr().out
    assert "format     sharegpt (conversations)" in out
    assert "example 1 · 9 tokens · 2 trained (22%)" in out and "example 2 · " in out
    assert "<|system|> <unk> nice <|user|> say yes <|assistant|>[[yes </s>]]" in out
    assert str(shell.user_ns["run"].data.preview(1)).count("── example") == 1


def test_the_panel_and_the_terminal_warn_when_many_rows_are_cut(tiny_llama, tmp_path, capsys):
    from peft_magic.ui.panel import LivePanel

    rows = [{"instruction": "say yes", "output": "yes " * n} for n in range(1, 21)]
    run = peft_magic.train({"model": tiny_llama, "method": {"name": "lora", "r": 4},
                            "data": {"train": rows, "max_length": 12, "chat_template": "zephyr"},
                            "train": {"max_steps": 1, "output_dir": str(tmp_path / "run")}}, display="terminal")  # fmt: skip
    out = capsys.readouterr().out
    want = run.data.stats["train"].warning()
    assert want.endswith("Fix: `data.max_length: 25` keeps 95% of rows whole.") and f"warning: {want}" in out
    panel = LivePanel(auto_show=False)
    panel._redraw(run.state, force=True)
    assert "⚠ data" in panel.stats.value and "data.max_length: 25" in panel.stats.value
