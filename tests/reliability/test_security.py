"""Safe defaults: no remote code unless asked, YAML that cannot run anything, hub tokens that never leak, and
paths that cannot be steered outside the chosen folder."""

from __future__ import annotations

import os

import pytest
from conftest import lm_rows

import peft_magic
from peft_magic.config.parse import parse_config
from peft_magic.errors import ConfigError

SENTINEL = "hf_SENTINEL0123456789abcdefTOKEN"


@pytest.fixture
def calls(monkeypatch):
    """The keyword arguments of every from_pretrained / from_config call transformers receives."""
    import transformers

    seen = []
    for cls_name in ("AutoModelForCausalLM", "AutoTokenizer", "AutoConfig"):
        cls = getattr(transformers, cls_name)
        for meth in ("from_pretrained", "from_config"):
            real = getattr(cls, meth, None)
            if real is None:
                continue

            def spy(*a, _real=real, _name=f"{cls_name}.{meth}", **kw):
                seen.append((_name, kw))
                return _real(*a, **kw)

            monkeypatch.setattr(cls, meth, spy)
    return seen


def _config(model, out, **model_kw):
    return {"model": {"name_or_path": model, **model_kw}, "data": {"train": lm_rows(8)},
            "train": {"max_steps": 1, "output_dir": str(out)}}  # fmt: skip


def test_remote_code_stays_off_unless_set(tiny_llama, workdir, calls):
    peft_magic.train(_config(tiny_llama, workdir / "a"), display="none")
    peft_magic.dry_run(_config(tiny_llama, workdir / "b"))  # the meta-device path too
    loads = [(name, kw) for name, kw in calls if "from_pretrained" in name or "from_config" in name]
    assert {n for n, _ in loads} >= {"AutoTokenizer.from_pretrained", "AutoModelForCausalLM.from_pretrained",
                                     "AutoConfig.from_pretrained", "AutoModelForCausalLM.from_config"}  # fmt: skip
    assert [(n, kw) for n, kw in loads if kw.get("trust_remote_code", False) is not False] == []
    assert all(kw["trust_remote_code"] is False for n, kw in loads if n.endswith("from_pretrained"))
    calls.clear()
    peft_magic.train(_config(tiny_llama, workdir / "c", trust_remote_code=True), display="none")
    assert calls and all(kw.get("trust_remote_code") is True for _, kw in calls)


def test_peft_model_magic_keeps_remote_code_off(tiny_llama, shell, calls):
    assert shell.run_cell(f"%peft_model {tiny_llama}").error_in_exec is None
    assert calls and all(kw.get("trust_remote_code") is False for _, kw in calls)


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system ['touch pwned']",
                                 "!!python/name:os.system", "!!python/object:builtins.object {}"])  # fmt: skip
def test_yaml_tags_that_run_python_are_refused(tag, workdir):
    with pytest.raises(ConfigError, match="yaml: the YAML cannot be read at line 1"):
        parse_config(f"model: {tag}\ndata: {{train: x.csv}}\n")
    assert not (workdir / "pwned").exists()


def test_strings_are_never_evaluated(workdir):
    cfg = parse_config({"model": "__import__('os').system('touch pwned')", "data": {"train": "$__builtins__"}},
                       overrides=["train.output_dir=!!python/object/apply:os.system [touch pwned]"])  # fmt: skip
    assert cfg.train.output_dir == "!!python/object/apply:os.system [touch pwned]"  # a plain string
    assert not (workdir / "pwned").exists()


def test_a_hub_token_never_reaches_files_history_or_output(tiny_llama, shell, monkeypatch, capfd):
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN"):
        monkeypatch.setenv(var, SENTINEL)
    shell.peft.display = "auto"  # printed progress is output too
    shell.user_ns["rows"] = lm_rows(8)
    cell = (f"%%peft_train run\nmodel: {tiny_llama}\ndata: {{train: $rows, eval: 0.25}}\n"
            "train: {max_steps: 2, save_steps: 1, logging_steps: 1, eval_steps: 1, output_dir: ./out}\n")  # fmt: skip
    assert shell.run_cell(cell).error_in_exec is None
    for line in ("run", "run.history", "print(run.summary())", "%peft_eval run", "%peft_export run ./adapter",
                 "%peft_export run ./merged --merge"):  # fmt: skip
        assert shell.run_cell(line).error_in_exec is None, line
    run = shell.user_ns["run"]
    assert SENTINEL not in repr(run.history) + repr(run) + run.config.to_yaml()
    out = capfd.readouterr()
    assert "exported" in out.out and SENTINEL not in out.out + out.err
    scanned = 0
    for root in ("out", "adapter", "merged"):
        for folder, _, files in os.walk(root):
            for name in files:
                with open(os.path.join(folder, name), "rb") as fh:
                    assert SENTINEL.encode() not in fh.read(), os.path.join(folder, name)
                scanned += 1
    assert scanned > 15  # adapter_config.json, peft_magic.yaml, README.md, tokenizer files, checkpoints...


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", "", "x\\..\\y"])
def test_run_names_cannot_write_outside_peft_runs(name, tiny_llama, workdir):
    cfg = {"model": tiny_llama, "data": {"train": lm_rows(8)}, "train": {"max_steps": 1}}
    with pytest.raises(ConfigError, match="cannot be a run name"):
        peft_magic.train(cfg, display="none", name=name)
    assert os.listdir(workdir) == []


def test_exporting_over_a_link_replaces_the_link_not_what_it_points_to(tiny_llama, workdir):
    run = peft_magic.train(_config(tiny_llama, workdir / "out"), display="none")
    (workdir / "elsewhere").mkdir()
    (workdir / "elsewhere" / "precious.txt").write_text("keep")
    os.symlink(workdir / "elsewhere", workdir / "adapter")
    run.export(workdir / "adapter", overwrite=True)
    assert not os.path.islink(workdir / "adapter") and os.path.isfile(workdir / "adapter" / "adapter_config.json")
    assert os.listdir(workdir / "elsewhere") == ["precious.txt"]
    assert sorted(os.listdir(workdir)) == ["adapter", "elsewhere", "out"]  # no leftover link or temp folder
