"""The bad-input corpus (bad_cells.yaml): every malformed cell, run in a real IPython shell, fails with one plain
UsageError line that names the problem and the fix, and leaves the previous run and every variable untouched."""

from __future__ import annotations

import importlib.util
import os

import pandas as pd
import pytest
import torch
import yaml
from conftest import instruction_rows, lm_rows, sentiment_rows
from IPython.core.error import UsageError

import peft_magic

with open(os.path.join(os.path.dirname(__file__), "bad_cells.yaml"), encoding="utf-8") as _fh:
    CORPUS = yaml.safe_load(_fh)


def test_the_corpus_is_large_and_covers_every_class():
    assert len(CORPUS) >= 40 and len({c["id"] for c in CORPUS}) == len(CORPUS)
    classes = {c["class"] for c in CORPUS}
    assert {"unknown or misspelled keys", "wrong types", "zero or negative values", "missing columns",
            "a method's parameter given to another method", "labels missing in eval", "non-UTF-8 files",
            "empty or all-whitespace datasets", "undefined or wrong-type $name", "model paths",
            "quantization the machine cannot do", "export into a file path", "YAML syntax errors"} <= classes  # fmt: skip


@pytest.fixture(scope="module")
def previous(tiny_llama, tmp_path_factory):
    """The notebook's earlier run, which no bad cell may touch."""
    out = tmp_path_factory.mktemp("previous")
    return peft_magic.train({"model": tiny_llama, "data": {"train": lm_rows(8)}, "method": {"name": "lora", "r": 2},
                             "train": {"max_steps": 1, "output_dir": str(out)}}, display="none")  # fmt: skip


@pytest.fixture
def notebook(shell, workdir, previous):
    """The shell with the corpus's variables and files."""
    sentiment = sentiment_rows(16)
    shell.user_ns.update(
        run=previous, keep={"a": [1, 2]}, number=42, lm=pd.DataFrame(lm_rows(8)), sentiment=pd.DataFrame(sentiment),
        pairs=pd.DataFrame(instruction_rows(8)),
        eval_unseen=pd.DataFrame([{"text": "the film was dull", "label": "meh"}]),
        eval_nolabel=pd.DataFrame([{"text": "the film was dull"}]), empty_df=pd.DataFrame({"text": []}),
        blank=pd.DataFrame({"text": ["  ", "\n\t", ""]}),
    )  # fmt: skip
    (workdir / "latin1.csv").write_bytes(("text\n" + "caf\xe9 the movie was good\n" * 20).encode("latin-1"))
    (workdir / "notamodel").mkdir()
    (workdir / "notamodel" / "README.md").write_text("notes")
    (workdir / "weights.bin").write_bytes(b"\0" * 16)
    (workdir / "table.xlsx").write_bytes(b"PK\3\4")
    (workdir / "full").mkdir()
    (workdir / "full" / "mine.txt").write_text("mine")
    (workdir / "broken.yaml").write_text("model: x\ntrain:\n  max_steps: [1, 2\n")
    return shell


def _weights(run):
    return {k: v.clone() for k, v in run.model.state_dict().items() if "lora_" in k}


@pytest.mark.parametrize("case", CORPUS, ids=[c["id"] for c in CORPUS])
def test_bad_cell_is_one_usage_error_and_changes_nothing(case, notebook, tiny_llama, tiny_bert, monkeypatch, capsys):
    if "no_bitsandbytes" in case.get("needs", ()):
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a))
    ns = notebook.user_ns
    before = {k: id(v) for k, v in ns.items() if not k.startswith("_")}
    previous, weights = ns["run"], _weights(ns["run"])

    def fill(text):
        return text.replace("{llama}", tiny_llama).replace("{bert}", tiny_bert)

    if case.get("magic"):
        source = f"%{case['magic']} {fill(case['line'])}"
    else:
        source = f"%%peft_train {fill(case.get('line', 'run'))}\n{fill(case.get('cell', ''))}"
    result = notebook.run_cell(source)

    err = result.error_in_exec
    assert type(err) is UsageError, f"{type(err).__name__}: {err}"
    message = str(err)
    for expected in case["expect"]:
        assert expected in message, f"{expected!r} not in {message!r}"
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err and "----> " not in out.out
    assert out.err.strip().splitlines() == [f"UsageError: {message}"] if "\n" not in message else True
    assert {k: id(v) for k, v in ns.items() if not k.startswith("_")} == before  # no variable added or replaced
    assert ns["run"] is previous and previous.model is not None
    assert all(torch.equal(v, weights[k]) for k, v in _weights(previous).items())


def test_over_long_texts_are_truncated_and_train(tiny_llama, shell):
    """Not an error: a 5,000-word text is cut to max_length."""
    shell.user_ns["long"] = pd.DataFrame({"text": [" ".join(["the cat sat on the mat"] * 1000)] * 4})
    result = shell.run_cell(f"%%peft_train run\nmodel: {tiny_llama}\ndata: {{train: $long, max_length: 32}}\n"
                            "train: {max_steps: 2, per_device_train_batch_size: 2}\n")  # fmt: skip
    assert result.error_in_exec is None
    run = shell.user_ns["run"]
    assert run.state.stop_reason == "completed"
    assert max(len(ids) for ids in run.data.train["input_ids"]) == 32
