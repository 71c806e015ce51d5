"""Counted training FLOPs and model FLOPs utilisation (peft_magic.training.flops, used by benchmarks/throughput.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peft_magic.devices import DeviceInfo, known_device
from peft_magic.events import mfu
from peft_magic.training.flops import peak_tflops, train_flops_per_token

CFG = dict(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=4)  # fmt: skip


def dense_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)


def test_full_fine_tuning_counts_the_textbook_6n_per_token():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CFG))
    per_token = train_flops_per_token(model, seq_len=16, batch_size=2)
    assert per_token / dense_params(model) == pytest.approx(6.0, rel=0.05)  # 2N forward + 4N backward
    assert all(p.grad is None for p in model.parameters())  # the probe leaves no gradients behind


def test_lora_skips_the_frozen_weight_gradients():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    full = train_flops_per_token(LlamaForCausalLM(LlamaConfig(**CFG)), seq_len=16)
    model = get_peft_model(LlamaForCausalLM(LlamaConfig(**CFG)), LoraConfig(r=4, target_modules="all-linear"))
    lora = train_flops_per_token(model, seq_len=16)
    ratio = lora / dense_params(model.get_base_model())
    assert 3.5 < ratio < 5.0 and lora < 0.8 * full  # ~4N: no weight gradients for the frozen matrices


def test_mfu_needs_a_known_peak():
    t4 = known_device("T4")
    assert peak_tflops(t4) == 65.0
    assert mfu(6e9, 1e3, peak_tflops(t4)) == pytest.approx(6e12 / 65e12)
    cpu = DeviceInfo(kind="cpu", name="AMD EPYC", total_memory=2**34, free_memory=2**33)
    assert peak_tflops(cpu) is None and mfu(6e9, 1e3, None) is None


def test_the_live_line_shows_flops_and_mfu():
    from peft_magic.events import TrainState
    from peft_magic.ui.lines import compute_text, throughput_text

    assert compute_text(5.3e7, 1e3) == "53 GFLOP/s"
    assert compute_text(6.1e10, 1e3, 312.0) == "61 TFLOP/s (MFU 20%)"
    assert compute_text(0, 1e3) == ""
    state = TrainState(samples_seen=100, tokens_seen=10_000, start_time=0.0, flops_per_token=4e6)
    state.start_time = __import__("time").time() - 10  # 1,000 tokens/s for 10 s
    assert "GFLOP/s" in throughput_text(state)
    state.flops_per_token = None
    assert "FLOP/s" not in throughput_text(state)


def test_a_run_counts_its_flops_without_changing_its_training(tiny_llama, workdir, monkeypatch):
    from conftest import lm_rows

    import peft_magic
    from peft_magic.training import flops

    def run():
        config = {"model": tiny_llama, "method": {"name": "lora", "lora_dropout": 0.1},  # dropout: RNG matters
                  "data": {"train": lm_rows(24)},
                  "train": {"max_steps": 4, "logging_steps": 1, "eval_steps": 0, "per_device_train_batch_size": 4,
                            "output_dir": str(workdir / "o")}}  # fmt: skip
        return peft_magic.train(config, display="none")

    counted = run()
    assert counted.state.flops_per_token > 0 and counted.state.peak_tflops is None  # CPU: no MFU
    monkeypatch.setattr(flops, "probe", lambda *a: (None, None))
    plain = run()
    assert [r["loss"] for r in counted.history] == [r["loss"] for r in plain.history]  # bit for bit
