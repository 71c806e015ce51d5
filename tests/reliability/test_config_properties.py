"""Property-based: whatever the cell holds (any nested data, any YAML text, any --set), the parser returns a valid
Config or raises ConfigError (a UsageError) naming a key, never another exception."""

from __future__ import annotations

import dataclasses
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peft_magic.config.parse import parse_config
from peft_magic.config.schema import SECTIONS, Config
from peft_magic.errors import ConfigError

FIELDS = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in SECTIONS.items()}
METHOD_NAMES = ["lora", "dora", "qlora", "ia3", "prompt-tuning", "prefix-tuning", "p-tuning", "loha", "lokr",
                "adalora", "vera", "boft", "oft", "peft", "bitfit", "full", "LoRA", "lora_", "x"]  # fmt: skip
METHOD_PARAMS = ["r", "lora_alpha", "lora_dropout", "target_modules", "num_virtual_tokens", "use_dora", "peft_type",
                 "from", "task_type", "init_lora_weights", "layers_to_transform", "modules_to_save", "alpha",
                 "feedforward_modules", "name", "params"]  # fmt: skip

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["4bit", "nf4", "bf16", "auto", "$df", "-1", "1e-4", "yes", "none", ""]),
)  # fmt: skip
anything = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner, max_size=3)
), max_leaves=8)  # fmt: skip


def section(name):
    return st.dictionaries(st.sampled_from(FIELDS[name] + ["lr", "batch_size", "steps", "typo_key"]), anything,
                           max_size=4)  # fmt: skip


method = st.one_of(anything, st.sampled_from(METHOD_NAMES), st.fixed_dictionaries(
    {"name": st.one_of(st.sampled_from(METHOD_NAMES), anything)},
    optional={k: anything for k in METHOD_PARAMS if k != "name"},
))  # fmt: skip
configs = st.fixed_dictionaries({}, optional={
    "model": st.one_of(anything, st.just("org/model"), section("model")),
    "task": st.one_of(anything, st.sampled_from(["causal-lm", "seq-cls", "token-cls", "seq2seq"])),
    "method": method,
    "data": st.one_of(anything, section("data").map(lambda d: {"train": "$df", **d})),
    "train": st.one_of(anything, section("train")),
    "extra": anything,
})  # fmt: skip


def parses_or_usage_error(source, **kw):
    try:
        cfg = parse_config(source, **kw)
    except ConfigError as e:
        assert str(e).strip()
        return None
    assert isinstance(cfg, Config)
    cfg.validate()  # what came out is valid, and validating again is stable
    assert isinstance(cfg.to_yaml(), str)
    return cfg


SETTINGS = settings(
    max_examples=int(os.environ.get("PEFT_MAGIC_HYPOTHESIS_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@SETTINGS
@given(configs)
def test_any_nested_structure_parses_or_raises_config_error(raw):
    parses_or_usage_error(raw)


@SETTINGS
@given(anything)
def test_any_value_at_all_parses_or_raises_config_error(raw):
    parses_or_usage_error(raw)


yaml_text = st.one_of(
    st.text(max_size=80),
    st.lists(st.sampled_from(["model: org/m", "train:", "  max_steps: 3", "  lr: x", "method: {name: lora, r: 0}",
                              "data: {train: $df}", "  - a", "\t", ": :", "{", "[1, 2", "!!python/object:os.system",
                              "&a [*a]", "key: 'unterminated", "task: seq-cls", "  batch_size: -1", "---", "..."]),
             max_size=6).map("\n".join),
)  # fmt: skip


@SETTINGS
@given(yaml_text)
def test_any_yaml_text_parses_or_raises_config_error(text):
    parses_or_usage_error(text + "\n")


@SETTINGS
@given(st.lists(st.one_of(st.text(max_size=20), st.builds(
    lambda k, v: f"{k}={v}",
    st.sampled_from(["train.max_steps", "train.lr", "model", "model.quantization", "method.r", "method", "data",
                     "data.train", "train", "", ".", "a.b.c", "task", "train.max_steps.x"]),
    st.text(max_size=10),
)), max_size=3))  # fmt: skip
def test_any_set_override_parses_or_raises_config_error(overrides):
    parses_or_usage_error({"model": "org/m", "data": {"train": "$df"}}, overrides=overrides)


BASE = "model: org/m\ndata: {train: $df}\n"


@pytest.mark.parametrize("text, key", [
    (BASE + "method: {name: lora, target_modules: &a [*a]}\n", "yaml"),  # were RecursionErrors
    (BASE + "train: {report_to: &a [*a]}\n", "yaml"),
    ("model: org/m\ndata: {train: $df, eval: &a [*a]}\n", "yaml"),
    (BASE + "train: {learning_rate: .nan}\n", "train.learning_rate"),  # were accepted, then broke training
    (BASE + "train: {num_train_epochs: .inf}\n", "train.num_train_epochs"),
    (BASE + "train: {weight_decay: .nan}\n", "train.weight_decay"),
    (BASE + "train: {max_grad_norm: 1e400}\n", "train.max_grad_norm"),
    (BASE + "train: {seed: -5}\n", "train.seed"),
    (BASE + "method: {name: lora, lora_alpha: x}\n", "method.lora_alpha"),
    (BASE + "method: {name: lora, use_dora: maybe}\n", "method.use_dora"),
    (BASE + "method: {name: lora, target_modules: [q_proj, {a: 1}]}\n", "method.target_modules"),
    (BASE + "method: {name: lora, layers_to_transform: [a]}\n", "method.layers_to_transform"),
])  # fmt: skip
def test_inputs_found_by_fuzzing_are_config_errors(text, key):
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert info.value.key == key


def test_a_python_dict_that_contains_itself_is_a_config_error():
    loop: dict = {"name": "lora"}
    loop["params"] = loop
    with pytest.raises(ConfigError, match="contains itself"):
        parse_config({"model": "org/m", "data": {"train": "$df"}, "method": loop})


def test_method_parameters_are_converted_like_our_own():
    cfg = parse_config(BASE + "method: {name: lora, r: '8', lora_alpha: '16', target_modules: q_proj}\n")
    assert cfg.method.params == {"r": 8, "lora_alpha": 16, "target_modules": "q_proj"}
