"""Compare and sweep: planning variants (methods x grid), checking them all before training, training them one
after another on tiny models, the table / curves / hooks of the result, and the %%peft_compare magic."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from conftest import lm_rows, publishing_shell, sentiment_rows

import peft_magic
from peft_magic.comparison import run as compare_module
from peft_magic.comparison.plan import plan_variants
from peft_magic.comparison.result import Comparison, curves_svg
from peft_magic.comparison.run import compare, register_column
from peft_magic.errors import ConfigError
from peft_magic.events import Callback

torch.set_num_threads(1)  # two shared CPU cores: one intra-op thread is much faster for tiny matmuls


def base(model, tmp_path, **train):
    return {"model": model, "data": {"train": lm_rows(24), "eval": lm_rows(8, seed=7)},
            "train": {"max_steps": 4, "learning_rate": 1e-2, "logging_steps": 2, "eval_steps": 0,
                      "output_dir": str(tmp_path / "cmp"), **train}}  # fmt: skip


# ---------------------------------------------------------------- planning


def test_plan_is_methods_times_the_sweep_grid(tmp_path):
    variants = plan_variants({"model": "org/m", "data": {"train": "x.csv"}, "train": {"output_dir": str(tmp_path)},
                     "compare": ["lora", {"name": "lora", "r": 16}]},
                    sweep={"train.learning_rate": [1e-3, 5e-3], "data.max_samples": [100, None]})  # fmt: skip
    assert [v.label for v in variants[:3]] == ["lora · learning_rate=0.001 · max_samples=100",
                                               "lora · learning_rate=0.001 · max_samples=none",
                                               "lora · learning_rate=0.005 · max_samples=100"]  # fmt: skip
    assert len(variants) == 8 and variants[4].label.startswith("lora r=16 · ")
    v = variants[1]
    assert v.changes == {"method": "lora", "train.learning_rate": 1e-3, "data.max_samples": None}
    assert v.raw["data"] == {"train": "x.csv", "max_samples": None} and v.raw["method"] == "lora"
    dirs = {v.raw["train"]["output_dir"] for v in variants}
    assert len(dirs) == 8 and all(d.startswith(str(tmp_path)) for d in dirs)  # one folder per variant


def test_sweep_alone_and_method_keys_apply_over_the_base_method():
    variants = plan_variants({"model": "org/m", "data": {"train": "x.csv"}, "method": "lora",
                     "sweep": {"method.r": [4, 8]}})  # fmt: skip
    assert [v.label for v in variants] == ["r=4", "r=8"]
    assert variants[1].raw["method"] == {"name": "lora", "r": 8}


@pytest.mark.parametrize(
    "kw, key, fragment",
    [
        ({"sweep": {"train.learning_rate": 1e-3}}, "sweep.train.learning_rate", "list of values"),
        ({"sweep": {"learning_rate": [1e-3]}}, "sweep", "dotted key"),
        ({"sweep": [1, 2]}, "sweep", "mapping"),
        ({"methods": [{"r": 8}]}, "compare", "name"),
    ],
)
def test_plan_mistakes_name_the_key(kw, key, fragment):
    with pytest.raises(ConfigError, match=fragment) as e:
        plan_variants({"model": "org/m", "data": {"train": "x.csv"}}, **kw)
    assert e.value.key == key


def test_every_variant_is_checked_before_anything_trains(tiny_llama, tmp_path):
    # ia3 has no `r`: the second method fails validation, so not even the first may train
    with pytest.raises(ConfigError, match="in variant 'ia3 · r=4'") as e:
        compare(base(tiny_llama, tmp_path), methods=["lora", "ia3"], sweep={"method.r": [4]}, display="none")
    assert e.value.key == "method.r"
    assert not os.path.exists(tmp_path / "cmp")


def test_peft_train_points_compare_keys_to_the_compare_magic(tiny_llama):
    with pytest.raises(ConfigError, match="%%peft_compare") as e:
        peft_magic.parse_config({"model": tiny_llama, "data": {"train": lm_rows(4)}, "compare": ["lora"]})
    assert e.value.key == "compare"


# ---------------------------------------------------------------- running


@pytest.fixture(scope="module")
def lora_vs_ia3(tiny_llama, tmp_path_factory):
    seen = []

    def hook(run, row):
        seen.append(run.model is not None)  # the model is still there for hooks (e.g. forgetting evals)
        return {"adapter_tensors": sum(1 for p in run.model.parameters() if p.requires_grad)}

    result = compare(base(tiny_llama, tmp_path_factory.mktemp("c")), methods=["lora", "ia3"],
                     sweep={"train.learning_rate": [5e-3, 3e-2]}, display="none", columns=[hook])  # fmt: skip
    result.hook_saw_models = seen
    return result


def test_compare_trains_each_variant_and_tabulates_it(lora_vs_ia3):
    t = lora_vs_ia3.table
    assert list(t["variant"]) == ["lora · learning_rate=0.005", "lora · learning_rate=0.03",
                                  "ia3 · learning_rate=0.005", "ia3 · learning_rate=0.03"]  # fmt: skip
    assert list(t.columns[:6]) == ["variant", "method", "family", "trainable_params", "trainable_pct", "peak_memory_gb"]
    assert set(t["status"]) == {"completed"} and set(t["steps"]) == {4} and set(t["train_rows"]) == {24}
    assert list(t["family"]) == ["R", "R", "A", "A"] and list(t["train.learning_rate"]) == [5e-3, 3e-2, 5e-3, 3e-2]
    lora, ia3 = t["trainable_params"][0], t["trainable_params"][2]
    assert lora > ia3 > 0 and t["trainable_params"][1] == lora  # the learning rate does not change what trains
    assert (t["trainable_pct"] > 0).all() and (t["trainable_pct"] < 100).all()
    assert (t["train_time_s"] > 0).all() and (t["peak_memory_gb"] > 0).all()
    assert t["eval_loss"].notna().all() and (t["eval_perplexity"] > 1).all()
    # the faster learning rate ends lower for lora on this data: the rows hold each run's own result
    assert t["train_loss"][1] < t["train_loss"][0]


def test_compare_releases_models_and_keeps_histories(lora_vs_ia3):
    assert lora_vs_ia3.hook_saw_models == [True] * 4
    assert list(lora_vs_ia3.table["adapter_tensors"]) == [28, 28, 6, 6]  # lora A+B on 14 linears, ia3 on 6
    for label, run in lora_vs_ia3.runs.items():
        assert run.model is None and run.data is None
        assert [r["step"] for r in run.history if "loss" in r] == [2, 4]
        assert run.config.train.output_dir.endswith(label.replace(" · ", "_")[:60])
    assert set(lora_vs_ia3.histories()) == set(lora_vs_ia3.runs)
    assert lora_vs_ia3.best("eval_loss") in lora_vs_ia3.runs


def test_curves_and_html_show_every_variant(lora_vs_ia3):
    svg = lora_vs_ia3.plot_svg()
    assert svg.startswith("<svg") and svg.count('class="curve"') == 4
    for label in lora_vs_ia3.runs:
        assert f"<title>{label}</title>" in svg
    html = lora_vs_ia3._repr_html_()
    assert "<table" in html and "data:image/svg+xml;base64," in html and "ia3 · learning_rate=0.03" in html
    text = lora_vs_ia3.text()
    assert "lora · learning_rate=0.005" in text and "trainable_pct" in text


def test_registered_columns_join_every_comparison(tiny_llama, tmp_path):
    @register_column
    def lr_seen(run, row):
        return {"lr_seen": run.config.train.learning_rate}

    try:
        result = compare(base(tiny_llama, tmp_path, max_steps=1), sweep={"train.learning_rate": [1e-3, 2e-3]},
                         display="none")  # fmt: skip
    finally:
        compare_module.COLUMNS.remove(lr_seen)
    assert list(result.table["lr_seen"]) == [1e-3, 2e-3]


def test_sweep_over_data_size_including_all_rows(tiny_llama, tmp_path):
    result = compare(base(tiny_llama, tmp_path, max_steps=1), sweep={"data.max_samples": [8, None]}, display="none")
    assert list(result.table["variant"]) == ["max_samples=8", "max_samples=none"]
    assert list(result.table["train_rows"]) == [8, 24]


def test_a_failing_variant_is_recorded_and_the_others_still_run(tiny_bert, tmp_path):
    cfg = {"model": tiny_bert, "task": "seq-cls", "data": {"train": sentiment_rows(16)},
           "train": {"max_steps": 1, "output_dir": str(tmp_path)}}  # fmt: skip
    result = compare(cfg, methods=["prefix-tuning", "lora"], display="none")
    t = result.table
    assert t["status"][0].startswith("failed:") and "prompt-tuning" in t["status"][0]
    assert t["status"][1] == "completed" and result.runs["prefix-tuning"] is None
    assert isinstance(result.errors["prefix-tuning"], ConfigError)


class InterruptAtStep(Callback):
    """Sends the process a real SIGINT (what the notebook's interrupt button does) during a step."""

    def on_step_end(self, state):
        if state.step == 1:
            os.kill(os.getpid(), signal.SIGINT)


def test_an_interrupt_stops_the_comparison_after_the_current_variant(tiny_llama, tmp_path):
    result = compare(base(tiny_llama, tmp_path), methods=["lora", "ia3", "dora"], display="none",
                     callbacks=[InterruptAtStep()])  # fmt: skip
    assert list(result.table["status"]) == ["interrupted", "skipped (interrupted)", "skipped (interrupted)"]
    assert result.runs["lora"].state.step == 1 and result.runs["ia3"] is None


def test_curves_svg_edge_cases():
    assert "no curves yet" in curves_svg({})
    one = curves_svg({"a": [(1, 2.0)], "b": [(1, float("nan"))]})
    assert one.count("<circle") == 1 and ">b<" not in one  # non-finite points dropped, empty series too
    tall = curves_svg({f"v{i}": [(0, i), (1, i)] for i in range(30)}, height=100)
    assert 'height="' in tall and int(tall.split('height="')[1].split('"')[0]) >= 30 * 14


def test_peft_magic_compare_is_the_function_even_after_the_module_is_imported():
    assert compare_module.Comparison is Comparison  # the module is imported (at the top of this file)
    assert peft_magic.compare is compare and callable(peft_magic.compare)


# ---------------------------------------------------------------- %%peft_compare


@pytest.fixture
def shell():
    yield from publishing_shell()


CELL = """
model: {model}
data: {{train: $rows}}
train: {{max_steps: 2, logging_steps: 1, eval_steps: 0, output_dir: {out}}}
compare: [lora, {{name: lora, r: 2}}]
sweep: {{train.learning_rate: [0.001, 0.01]}}
"""


def test_peft_compare_magic_keeps_and_shows_the_comparison(shell, tiny_llama, tmp_path):
    shell.user_ns["rows"] = lm_rows(16)
    shell.run_cell_magic("peft_compare", "cmp --set train.max_steps=1", CELL.format(model=tiny_llama, out=tmp_path))
    result = shell.user_ns["cmp"]
    assert isinstance(result, Comparison) and len(result.rows) == 4
    assert list(result.table["variant"])[-1] == "lora r=2 · learning_rate=0.01"
    assert set(result.table["steps"]) == {1}  # --set reached every variant
    (data,) = shell.published
    assert "peft-comparison" in data["text/html"] and "lora r=2" in data["text/plain"]


def test_peft_compare_dry_run_lists_variants_and_trains_nothing(shell, tiny_llama, tmp_path, capsys):
    shell.user_ns["rows"] = lm_rows(16)
    shell.run_cell_magic("peft_compare", "plan --dry-run", CELL.format(model=tiny_llama, out=tmp_path / "dry"))
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "4 variants for 'plan', trained one after another:"
    assert "lora r=2 · learning_rate=0.001" in out and "method=lora r=2, train.learning_rate=0.001" in out
    assert "plan" not in shell.user_ns and not os.path.exists(tmp_path / "dry")


def test_peft_compare_magic_reports_a_bad_variant_as_usage_error(shell, tiny_llama, tmp_path):
    from IPython.core.error import UsageError

    shell.user_ns["rows"] = lm_rows(16)
    cell = CELL.format(model=tiny_llama, out=tmp_path).replace("{name: lora, r: 2}", "{name: lora, rank: 2}")
    with pytest.raises(UsageError, match="in variant 'lora rank=2"):
        shell.run_cell_magic("peft_compare", "bad", cell)
