"""Formatting helpers: the exact strings the panel, summary and terminal show."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peft_magic.ui.format import (
    build_title,
    format_bytes,
    format_count,
    format_duration,
    format_epochs,
    format_gb,
    format_lr,
    format_memory,
    format_number,
    format_params,
    format_rate,
    metric_name,
)


@pytest.mark.parametrize(
    "seconds, text",
    [
        (0, "00:00"),
        (59.4, "00:59"),
        (192, "03:12"),
        (3599, "59:59"),
        (3600, "1:00:00"),
        (3723, "1:02:03"),
        (90061, "25:01:01"),
        (None, "--:--"),
        (float("nan"), "--:--"),
        (-5, "--:--"),
        (float("inf"), "--:--"),
    ],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@given(st.integers(min_value=0, max_value=10**7))
def test_format_duration_reads_back_as_the_same_seconds(seconds):
    fields = [int(f) for f in format_duration(seconds).split(":")]
    if len(fields) == 2:
        fields = [0, *fields]
    h, m, s = fields
    assert m < 60 and s < 60
    assert h * 3600 + m * 60 + s == seconds


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0"),
        (950, "950"),
        (12.5, "12.5"),
        (1000, "1.0k"),
        (12345, "12.3k"),
        (1_700_000, "1.7M"),
        (999_960, "1.0M"),
        (135e6, "135.0M"),
        (1.2e9, "1.2B"),
        (-2500, "-2.5k"),
        (None, "–"),
        (float("nan"), "–"),
    ],
)
def test_format_count(n, text):
    assert format_count(n) == text


@given(st.floats(min_value=0, max_value=1e14, allow_nan=False))
def test_format_count_is_short_and_close(n):
    text = format_count(n)
    scale = {"k": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}.get(text[-1], 1)
    value = float(text.rstrip("kMBT")) * scale
    assert len(text) <= 6
    assert math.isclose(value, n, rel_tol=0.06, abs_tol=0.05)


def test_format_sizes():
    assert format_gb(5.123) == "5.1 GB"
    assert format_gb(None) == "–"
    assert format_bytes(512) == "512 B"
    assert format_bytes(3.4e6) == "3.4 MB"
    assert format_bytes(1.25e9) == "1.2 GB"


@pytest.mark.parametrize(
    "lr, text",
    [(1.6e-4, "1.6e-4"), (2e-5, "2e-5"), (0.001, "1e-3"), (3e-2, "3e-2"), (0, "0"), (None, "–"), (1.65e-4, "1.6e-4")],
)
def test_format_lr(lr, text):
    assert format_lr(lr) == text


def test_format_number_and_rate():
    assert format_number(2.3125) == "2.312"
    assert format_number(0.86666, 3) == "0.867"
    assert format_number(7) == "7"
    assert format_number(float("nan")) == "–"
    assert format_number("n/a") == "n/a"
    assert format_rate(38.24, "samples") == "38.2 samples/s"
    assert format_rate(4900, "tokens") == "4.9k tokens/s"
    assert format_rate(0, "tokens") == "– tokens/s"


def test_format_params_and_memory():
    assert format_params(1_700_000, 135_000_000) == "1.7M trainable (1.3%)"
    assert format_params(200_000, 100_000_000) == "200.0k trainable (0.2%)"
    assert format_params(0, 10) == ""
    assert format_memory({"gpu_gb": 5.1, "gpu_peak_gb": 5.6, "gpu_total_gb": 15}) == "5.1 GB GPU (peak 5.6 / 15.0 GB)"
    assert format_memory({"gpu_gb": 5.1}) == "5.1 GB GPU"
    assert format_memory({"rss_gb": 1.24}) == "1.2 GB RSS"
    assert format_memory({}) == "–"


def test_metric_names():
    assert metric_name("eval_accuracy") == "accuracy"
    assert metric_name("eval_f1") == "F1"
    assert metric_name("eval_loss") == "loss"
    assert metric_name("learning_rate") == "learning rate"
    assert metric_name("eval_reward_starts_with_answer") == "reward starts_with_answer"  # as the function is named
    assert metric_name("reward_std") == "reward std"


def test_build_title():
    title = build_title(
        "HuggingFaceTB/SmolLM2-135M-Instruct", "4-bit NF4", "LoRA r=16 on all-linear", 1_700_000, 135_000_000
    )
    assert title == "SmolLM2-135M-Instruct · 4-bit NF4 · LoRA r=16 on all-linear · 1.7M trainable (1.3%)"
    assert build_title("/tmp/models/tiny/", method="IA3") == "tiny · IA3"
    assert build_title() == ""


@pytest.mark.parametrize(
    "epochs, text",
    [(4 / 7, "0.57 epochs"), (1.0, "1 epoch"), (3, "3 epochs"), (4 / 1000, "<0.01 epochs"), (0.005, "0.01 epochs"),
     (0, "– epochs"), (None, "– epochs")],
)
def test_epochs_two_decimals_never_zero_for_a_run_that_trains(epochs, text):
    assert format_epochs(epochs) == text
