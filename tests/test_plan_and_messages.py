"""What the plan and the error messages say: figures a newcomer reads (epochs, eval schedule) and messages that
name the culprit (the $variable, not just its type)."""

from __future__ import annotations

import pytest
from conftest import lm_rows

import peft_magic
from peft_magic.errors import ConfigError


def _plan(model, **train):
    cfg = {"model": model, "method": {"name": "lora", "r": 2}, "data": {"train": lm_rows(56)}, "train": train}
    return peft_magic.dry_run(cfg).rows["plan"]


def test_a_short_run_without_eval_says_no_eval_schedule_and_rounds_epochs(tiny_llama, workdir):
    plan = _plan(tiny_llama, max_steps=4, eval_steps=50)
    assert "eval" not in plan
    assert plan.startswith("4 steps (0.57 epochs) · ")  # 56 rows, batch 8: 7 steps an epoch


def test_eval_every_n_only_when_n_comes_before_the_end(tiny_llama, workdir):
    cfg = {"model": tiny_llama, "method": {"name": "lora", "r": 2}, "data": {"train": lm_rows(40), "eval": 0.2}}
    short = peft_magic.dry_run({**cfg, "train": {"max_steps": 20, "eval_steps": 50}}).rows["plan"]
    long = peft_magic.dry_run({**cfg, "train": {"max_steps": 120, "eval_steps": 50}}).rows["plan"]
    assert "eval at the end" in short and "eval every" not in short
    assert "eval every 50 and at the end" in long


@pytest.mark.parametrize(
    "value, fragment",
    [(3, "$some_value is an int, which cannot be used as data"),
     (4.5, "$some_value is a float"), ([], "$some_value is an empty list"),
     ([{"text": "a"}, 7], "$some_value is a list holding an int")],
)  # fmt: skip
def test_a_wrong_variable_is_named_in_the_message(tiny_llama, workdir, value, fragment):
    cfg = {"model": tiny_llama, "data": {"train": "$some_value"}, "train": {"max_steps": 1}}
    with pytest.raises(ConfigError) as e:
        peft_magic.dry_run(cfg, namespace={"some_value": value})
    assert fragment in str(e.value) and str(e.value).startswith("data.train: ")


# ---------------------------------------------------------------- hub ids that cannot be fetched

HUB_ID = "peft-magic-tests/not-in-any-cache"


def _one_line_hub_refusal(message):
    assert "'peft-magic-tests/not-in-any-cache' is not in the local cache and the hub cannot be reached" in message
    assert "give a local model folder or .gguf file" in message and "\n" not in message
    assert "demo_models()" in message or "none installed" in message


def test_an_uncached_hub_id_offline_is_refused_at_once_by_every_entry_point(shell, tmp_path, capsys):
    import time

    from IPython.core.error import UsageError

    from peft_magic.cli import main

    start = time.time()
    with pytest.raises(UsageError) as e:  # never "base model: ..." for a model that was not found
        shell.run_line_magic("peft_model", HUB_ID)
    _one_line_hub_refusal(str(e.value))
    assert "HF_HUB_OFFLINE" in str(e.value) and shell.peft.default_model is None
    with pytest.raises(UsageError) as e:
        shell.run_cell_magic("peft_train", "--dry-run", f"model: {HUB_ID}\ndata:\n  train: [{{text: hi}}]\n")
    _one_line_hub_refusal(str(e.value))
    with pytest.raises(ConfigError) as e:
        peft_magic.train({"model": HUB_ID, "data": {"train": lm_rows(8)}}, display="none")
    _one_line_hub_refusal(str(e.value))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {HUB_ID}\ndata:\n  train: [{{text: hi}}]\n")
    assert main(["train", str(cfg), "--dry-run"]) != 0
    err = capsys.readouterr().err
    _one_line_hub_refusal(err.strip().splitlines()[-1])
    assert "Traceback" not in err
    assert time.time() - start < 30  # no minute of retries


def test_an_uncached_hub_id_with_the_hub_unreachable_is_refused_after_one_quick_probe(monkeypatch):
    import time

    import huggingface_hub

    from peft_magic import models

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.time()
    with pytest.raises(ConfigError) as e:
        models.check_hub_reachable(HUB_ID)
    assert time.time() - start < 10
    _one_line_hub_refusal(str(e.value))
    assert "http://127.0.0.1:9 did not answer" in str(e.value) and "connect and run again" in str(e.value)


def test_demo_models_are_the_installed_offline_models():
    import os

    paths = peft_magic.demo_models()
    assert set(paths) <= {"smollm2", "minilm"}
    for key, path in paths.items():
        assert os.path.exists(path), key
    if "smollm2" in paths:
        assert paths["smollm2"].endswith(".gguf")
    if "minilm" in paths:
        assert os.path.isfile(os.path.join(paths["minilm"], "config.json"))


# ---------------------------------------------------------------- the task, when the cell names none


def test_an_encoder_without_a_task_is_planned_as_a_classifier_and_the_plan_says_so(tiny_bert, workdir, sentiment):
    plan = peft_magic.dry_run({"model": tiny_bert, "method": {"name": "lora", "r": 2},
                               "data": {"train": sentiment, "label_column": "label"}})  # fmt: skip
    assert plan.config.task == "seq-cls"
    assert plan.rows["task"].startswith("seq-cls, inferred: BertModel is an encoder")
    assert "BertForSequenceClassification" in plan.rows["model"] and "LMHead" not in plan.text()
    explicit = peft_magic.dry_run({"model": tiny_bert, "task": "seq-cls", "data": {"train": sentiment}})
    assert "task" not in explicit.rows  # nothing inferred, nothing to say


def test_a_causal_lm_with_a_label_column_and_no_task_is_refused_with_both_fixes(tiny_llama, workdir, sentiment):
    with pytest.raises(ConfigError) as e:
        peft_magic.dry_run({"model": tiny_llama, "data": {"train": sentiment, "label_column": "label"}})
    assert str(e.value).startswith("task: data.label_column is set but no task is")
    assert "`task: seq-cls`" in str(e.value) and "remove `label_column`" in str(e.value)
    plan = peft_magic.dry_run({"model": tiny_llama, "data": {"train": sentiment}, "train": {"max_steps": 2}})
    assert plan.config.task == "causal-lm" and "task" not in plan.rows  # a decoder's default stays


# ---------------------------------------------------------------- the command line fails before the work, in its words


def _cli_config(tmp_path, model):
    import yaml

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model": model, "method": {"name": "lora", "r": 2}, "data": {"train": lm_rows(16)},
                                   "train": {"max_steps": 2, "output_dir": str(tmp_path / "out")}}))  # fmt: skip
    return cfg


def test_cli_refuses_a_full_export_folder_before_training_in_cli_words(tiny_llama, tmp_path, capsys):
    from peft_magic.cli import main

    cfg = _cli_config(tmp_path, tiny_llama)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep me")
    assert main(["train", str(cfg), "--export", str(tmp_path / "full")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: export: '{tmp_path / 'full'}' already holds files. Fix: choose a new folder, or add " \
                  "--overwrite to replace it."  # fmt: skip
    assert not (tmp_path / "out").exists()  # nothing trained
    assert (tmp_path / "full" / "notes.txt").read_text() == "keep me"


def test_cli_names_the_missing_config_file_as_its_positional_argument(tmp_path, capsys):
    from peft_magic.cli import main

    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: CONFIG: '{tmp_path / 'nope.yaml'}' does not exist.") and "--config" not in err


def test_cli_export_failing_after_training_says_where_the_run_is_kept(tiny_llama, tmp_path, capsys, monkeypatch):
    """A folder filled while training (another process) is found only at export: the message says where the
    trained run is, and the fix it gives exports it without training again."""
    import peft_magic.api as api
    from peft_magic.cli import main

    cfg = _cli_config(tmp_path, tiny_llama)
    real_train = api.train

    def train_then_someone_writes(*args, **kwargs):
        run = real_train(*args, **kwargs)
        (tmp_path / "late").mkdir(exist_ok=True)
        (tmp_path / "late" / "theirs.txt").write_text("not ours")
        return run

    monkeypatch.setattr(api, "train", train_then_someone_writes)
    assert main(["train", str(cfg), "--export", str(tmp_path / "late")]) == 2
    err = capsys.readouterr().err
    assert "already holds files" in err and "overwrite=True" not in err
    assert f"the trained run is kept in {tmp_path / 'out'}" in err
    trained = (tmp_path / "out" / "checkpoint-2" / "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "out" / "checkpoint-2").is_dir()
    monkeypatch.setattr(api, "train", real_train)
    assert main(["train", str(cfg), "--resume", "--export", str(tmp_path / "adapter")]) == 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert "completed 2/2 steps" in capsys.readouterr().out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == trained  # not trained again


# ---------------------------------------------------------------- the same model, named and counted the same way


def test_peft_model_and_the_plan_count_the_same_base_parameters(shell, tiny_llama, capsys):
    import re

    shell.run_line_magic("peft_model", tiny_llama)
    said = re.search(r"\((\w+), ([\d.]+k?M? params)\)", capsys.readouterr().out).groups()
    plan = peft_magic.dry_run({"model": tiny_llama, "method": {"name": "lora", "r": 8},
                               "data": {"train": lm_rows(16)}, "train": {"max_steps": 2}})  # fmt: skip
    assert f"({said[0]}, {said[1]})" in plan.rows["model"]  # the base model, not base + adapter
    assert plan.total > plan.trainable > 0


def test_a_model_folder_with_a_generic_name_is_titled_with_its_parent(tmp_path, tiny_llama):
    import os

    from peft_magic.config.schema import ModelConfig

    (tmp_path / "support-classifier").mkdir()
    os.symlink(tiny_llama, tmp_path / "support-classifier" / "model")
    assert ModelConfig(name_or_path=str(tmp_path / "support-classifier" / "model")).display_name == \
        "support-classifier/model"  # fmt: skip
    assert ModelConfig(name_or_path=tiny_llama).display_name == os.path.basename(tiny_llama)
    assert ModelConfig(name_or_path="org/model").display_name == "org/model"  # a hub id stays whole


def test_peft_model_never_reports_a_model_it_cannot_read(shell, tmp_path):
    from IPython.core.error import UsageError

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{ not json")
    with pytest.raises(UsageError) as e:
        shell.run_line_magic("peft_model", str(tmp_path / "broken"))
    assert "cannot be read as a model" in str(e.value) and "\n" not in str(e.value)
    assert shell.peft.default_model is None
