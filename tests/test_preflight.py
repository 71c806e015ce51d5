"""The memory pre-flight: counts from the meta device, the activation model, fitting, devices."""

import os
import subprocess
import sys

import pytest

from peft_magic.devices import DeviceInfo, device_info, known_device, resolve_dtype, resolve_mixed_precision
from peft_magic.errors import ConfigError
from peft_magic.preflight import FitReport, MemoryEstimate, check_fit, estimate_memory

GB = 2**30


def llama_config(vocab=256, hidden=64, layers=2):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=False)  # fmt: skip


def bert_config():
    from transformers import BertConfig

    return BertConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=128)  # fmt: skip


def lora_model(config, task, dropout=0.05):
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cls = transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModelForSequenceClassification
    model = cls.from_config(config)
    task_type = "CAUSAL_LM" if task == "causal-lm" else "SEQ_CLS"
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear", task_type=task_type)
    return model, get_peft_model(cls.from_config(config), lora)


@pytest.mark.parametrize("make, task", [(llama_config, "causal-lm"), (bert_config, "seq-cls")])
def test_counts_from_meta_equal_a_real_model(make, task):
    config = make()
    real, adapted = lora_model(config, task)
    est = estimate_memory(config, task=task, method="lora", method_params={"r": 8, "lora_dropout": 0.05})
    assert est.params == sum(p.numel() for p in real.parameters())
    assert est.trainable_params == sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    assert est.weights == 4 * est.params  # float32
    assert est.optimizer == 8 * est.trainable_params  # AdamW: two fp32 moments


def test_estimate_reads_a_model_folder_without_weights(tmp_path):
    config = llama_config()
    config.save_pretrained(tmp_path)  # config.json only: there are no weights to load
    assert estimate_memory(str(tmp_path)).params == estimate_memory(config).params > 0


def test_given_trainable_count_is_used():
    est = estimate_memory(llama_config(), trainable_params=1000)
    assert (est.trainable_params, est.trainable, est.gradients, est.optimizer) == (1000, 4000, 4000, 8000)


def test_quantization_shrinks_weights():
    config = llama_config(hidden=128)
    none, q8, q4 = (estimate_memory(config, quantization=q).weights for q in ("none", "8bit", "4bit"))
    assert q4 < q8 < none
    # Only the block's linear layers are quantized: the embeddings and lm_head stay, so 4-bit is not 1/8 of fp32.
    assert none / 8 < q4


def test_gradient_checkpointing_lowers_activations():
    config = llama_config(layers=4)
    plain = estimate_memory(config, batch_size=8, seq_len=128)
    checkpointed = estimate_memory(config, batch_size=8, seq_len=128, gradient_checkpointing=True)
    assert checkpointed.activations < plain.activations
    assert checkpointed.weights == plain.weights


def test_activations_scale_with_batch_and_length():
    config = llama_config()
    a4 = estimate_memory(config, batch_size=4, seq_len=64).activations
    a8 = estimate_memory(config, batch_size=8, seq_len=64).activations
    assert a8 == pytest.approx(2 * a4, rel=1e-6)
    assert estimate_memory(config, batch_size=4, seq_len=128).activations > a4


def _saved_bytes(model, inputs) -> int:
    """Bytes autograd actually keeps for backward (distinct storages, parameters excluded)."""
    import torch

    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in params:
            seen[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs)
    return sum(seen.values())


@pytest.mark.parametrize("dropout", [0.05, 0.0])
def test_activation_model_matches_what_autograd_keeps(dropout):
    """The per-layer arithmetic against the tensors a real forward saves (no allocator noise in this figure)."""
    import torch

    config = llama_config(vocab=512, hidden=64, layers=2)
    _, model = lora_model(config, "causal-lm", dropout)
    model.train()
    batch, seq = 4, 64
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    saved = _saved_bytes(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    est = estimate_memory(config, method_params={"r": 8, "lora_dropout": dropout}, batch_size=batch, seq_len=seq)
    # autograd keeps the log-softmax; the estimate adds the logits and the two gradients alive at the loss.
    expected = saved + 3 * batch * seq * config.vocab_size * 4
    assert est.activations == pytest.approx(expected, rel=0.12)


def test_estimate_validates_its_arguments():
    with pytest.raises(ConfigError, match="model.quantization"):
        estimate_memory(llama_config(), quantization="3bit")
    with pytest.raises(ConfigError, match="train.per_device_train_batch_size"):
        estimate_memory(llama_config(), batch_size=0)


def test_summary_is_the_preflight_memory_row():
    est = estimate_memory(llama_config(), batch_size=4, seq_len=64)
    line = est.summary()
    assert line.startswith("~") and " GB peak (weights " in line
    assert "adapter+optimizer" in line and "activations" in line
    assert est.total == est.weights + est.trainable + est.gradients + est.optimizer + est.activations + est.overhead
    roomy = DeviceInfo("cpu", "test CPU", 64 * GB, 64 * GB)
    assert est.summary(roomy).endswith("fits CPU RAM (64 GB free)")


def test_check_fit_fits_on_a_roomy_device():
    est = estimate_memory(llama_config(), batch_size=4, seq_len=64)
    report = check_fit(est, known_device("A100", 80))
    assert isinstance(report, FitReport) and report.fits and report.suggestions == []
    assert report.message == "fits A100 (80 GB free)"


def _apply(est: MemoryEstimate, change: dict) -> MemoryEstimate:
    keys = {"model.quantization": "quantization", "train.per_device_train_batch_size": "batch_size",
            "train.gradient_checkpointing": "gradient_checkpointing", "data.max_length": "seq_len"}  # fmt: skip
    return est.replace(**{keys[k]: v for k, v in change.items() if k in keys})


def test_check_fit_suggests_settings_that_fit():
    config = llama_config(vocab=4096, hidden=256, layers=4)
    tiny_gpu = known_device("T4")
    est = estimate_memory(config, batch_size=32, seq_len=512, device=tiny_gpu)
    small = est.replace(batch_size=4)
    tiny_gpu.free_memory = (est.total + small.total) // 2
    report = check_fit(est, tiny_gpu, gradient_accumulation_steps=2)
    assert not report.fits
    assert report.message.startswith("needs ~") and "T4" in report.message and "try" in report.message
    assert report.suggestions and len(report.suggestions) == len(report.changes)
    for change in report.changes:
        assert check_fit(_apply(est, change), tiny_gpu).fits, change
    batch = next(c for c in report.changes if "train.per_device_train_batch_size" in c)
    # a smaller batch keeps the effective batch (32 x 2) through accumulation
    assert batch["train.per_device_train_batch_size"] * batch["train.gradient_accumulation_steps"] >= 64
    assert any("data.max_length" in c for c in report.changes)


def test_check_fit_combines_changes_when_none_is_enough_alone():
    config = llama_config(vocab=512, hidden=256, layers=8)
    gpu = known_device("T4")
    est = estimate_memory(config, batch_size=64, seq_len=1024, device=gpu)
    # each lever at its limit (max_length is never cut below a quarter)
    singles = [est.replace(gradient_checkpointing=True), est.replace(batch_size=1), est.replace(quantization="4bit"),
               est.replace(seq_len=256)]  # fmt: skip
    combined = est.replace(quantization="4bit", gradient_checkpointing=True, batch_size=1)
    assert combined.total < min(e.total for e in singles)
    gpu.free_memory = (combined.total + min(e.total for e in singles)) // 2
    report = check_fit(est, gpu)
    assert not report.fits and len(report.changes) == 1 and len(report.changes[0]) >= 2
    assert check_fit(_apply(est, report.changes[0]), gpu).fits, report.changes[0]


def test_check_fit_with_nothing_that_fits():
    est = estimate_memory(llama_config(), device="cuda")
    report = check_fit(est, DeviceInfo("cuda", "toy", 2**20, 2**20))
    assert not report.fits and report.suggestions == [] and "needs ~" in report.message


@pytest.mark.parametrize("gpu, expected", [("T4", "fp16"), ("V100", "fp16"), ("A100", "bf16"), ("H100", "bf16")])
def test_mixed_precision_auto_follows_the_gpu(gpu, expected):
    assert resolve_mixed_precision("auto", known_device(gpu)) == expected


def test_mixed_precision_on_cpu_and_explicit_choices():
    cpu = DeviceInfo("cpu", "test CPU", 8 * GB, 4 * GB)
    assert resolve_mixed_precision("auto", cpu) == "no"
    assert resolve_mixed_precision("fp16", known_device("T4")) == "fp16"
    with pytest.raises(ConfigError, match="train.mixed_precision"):
        resolve_mixed_precision("bf16", known_device("T4"))
    with pytest.raises(ConfigError, match="train.mixed_precision"):
        resolve_mixed_precision("fp16", cpu)
    assert resolve_dtype("auto", known_device("T4")) == "float16"
    assert resolve_dtype("auto", known_device("L4")) == "bfloat16"
    assert resolve_dtype("auto", cpu) == "float32"


def test_known_gpus():
    t4 = known_device("t4")
    assert (t4.kind, t4.bf16, t4.capability, t4.label) == ("cuda", False, (7, 5), "T4")
    assert known_device("A100", 40).total_memory < known_device("A100", 80).total_memory
    assert DeviceInfo("cuda", "Tesla T4", 1, 1).label == "T4"
    assert DeviceInfo("cuda", "NVIDIA A10G", 1, 1).label == "A10G"
    assert DeviceInfo("cuda", "NVIDIA A100-SXM4-40GB", 1, 1).label == "A100"
    with pytest.raises(ConfigError, match="device"):
        known_device("TPU")


def test_device_info_here():
    info = device_info()
    assert info.kind in ("cpu", "cuda", "mps")
    assert 0 < info.free_memory <= info.total_memory


def test_importing_preflight_imports_no_torch():
    code = "import sys, peft_magic.preflight, peft_magic.devices; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_estimate_for_config_maps_the_config_keys(tmp_path):
    from peft_magic.config.schema import Config, DataConfig, MethodConfig, ModelConfig, TrainConfig
    from peft_magic.preflight import estimate_for_config

    config = llama_config()
    config.save_pretrained(tmp_path)
    cfg = Config(
        model=ModelConfig(name_or_path=str(tmp_path)),
        method=MethodConfig(name="lora", params={"r": 4}),
        data=DataConfig(max_length=64),
        train=TrainConfig(per_device_train_batch_size=2, gradient_checkpointing=True),
    )
    t4 = known_device("T4")
    est = estimate_for_config(cfg, t4)
    same = estimate_memory(config, dtype="float16", mixed_precision="fp16", method_params={"r": 4}, batch_size=2,
                           seq_len=64, gradient_checkpointing=True, device=t4, loss="chunked", kernels=True)  # fmt: skip
    assert (est.device, est.total, est.trainable_params) == ("cuda", same.total, same.trainable_params)
    assert est.trainable_params < estimate_memory(config).trainable_params  # r=4 against the default r=8


def test_deepspeed_is_told_the_cpu_is_meant_only_on_a_machine_without_an_accelerator(monkeypatch):
    import importlib.util
    import sys

    import torch

    from peft_magic.devices import quiet_deepspeed

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.delitem(sys.modules, "deepspeed", raising=False)
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "deepspeed" else found(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    quiet_deepspeed()
    assert "DS_ACCELERATOR" not in os.environ  # a GPU: DeepSpeed finds it and says nothing
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("DS_ACCELERATOR", "xpu")
    quiet_deepspeed()
    assert os.environ["DS_ACCELERATOR"] == "xpu"  # the user's choice stays
    monkeypatch.delenv("DS_ACCELERATOR")
    quiet_deepspeed()
    assert os.environ["DS_ACCELERATOR"] == "cpu"


def test_the_chunked_loss_estimate_drops_the_logits():
    """With `loss="chunked"` (causal-lm, `train.kernels: auto`) no positions x vocab tensor is counted: the
    estimate falls by about the logits, their float32 copies and gradients."""
    config = llama_config(vocab=32000, hidden=256, layers=2)
    plain = estimate_memory(config, batch_size=8, seq_len=256)
    chunked = estimate_memory(config, batch_size=8, seq_len=256, loss="chunked")
    logits = 8 * 256 * 32000 * 4
    assert plain.activations - chunked.activations > 2.5 * logits  # 4 logits-sized tensors, less one chunk
    assert chunked.total < 0.6 * plain.total
    assert estimate_memory(config, task="seq-cls", loss="chunked").total == estimate_memory(config, task="seq-cls").total


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's per-process peak RSS reset")
def test_the_chunked_loss_estimate_is_within_20_percent_of_a_measured_peak():
    """A real LoRA training step with the chunked loss (benchmarks/memory_estimate.py's child, a fresh process):
    the peak RSS of the training steps against the estimate."""
    import json

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = ["llama-small", "causal-lm", "none", 16, 128, False, "cpu", "chunked"]
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "memory_estimate.py"), "--child",
                           json.dumps(spec)], capture_output=True, text=True, check=False, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root})  # fmt: skip
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, proc.stderr[-2000:]
    measured = json.loads(line[len("RESULT ") :])["train_peak"]
    sys.path.insert(0, os.path.join(root, "benchmarks"))
    from memory_estimate import estimate

    assert estimate(*spec).total == pytest.approx(measured, rel=0.2)


def test_block_model_under_bf16_kernels_matches_what_autograd_keeps():
    """bf16 autocast with the CPU kernels of a run (one-bit dropout masks inside A, SwiGLU keeping 2 of 3, norms
    keeping no float32, pre-norm outputs cast once): the per-block arithmetic against the activations the blocks
    save (autocast's weight casts aside: a run keeps one copy of each for the run, counted with the weights)."""
    import torch

    from peft_magic import preflight
    from peft_magic.training.dropout import use_mask_dropout
    from peft_magic.training.frozen_casts import half_norm_outputs
    from peft_magic.training.lora_casts import skip_input_casts
    from peft_magic.training.rms_norm import norms_keep_16_bit
    from peft_magic.training.swiglu import keep_two_of_three

    config = llama_config(vocab=512, hidden=128, layers=2)
    _, model = lora_model(config, "causal-lm", 0.05)
    model.train()
    base = model.get_base_model()
    use_mask_dropout(model, "cpu")
    keep_two_of_three(base)
    norms_keep_16_bit(base, "bf16")
    skip_input_casts(model, "bf16")
    half_norm_outputs(base, "bf16")
    batch, seq = 3, 50
    tokens = batch * seq
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    embeds = base.model.embed_tokens(ids).requires_grad_()  # as under LoRA on every block: the stream needs grad
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen = {}

    def pack(t):
        per_token = t.dim() != 2 or t.shape[0] == tokens  # not a weight's cast
        if t.untyped_storage()._cdata not in params and per_token:
            seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        base.model(inputs_embeds=embeds)
    an = preflight._anatomy(config, "causal-lm")
    ad = preflight._adapter(config, "causal-lm", "lora", {"r": 8, "lora_dropout": 0.05}, an)
    assert an.norms16 and an.swiglu
    _, layers = preflight._activation_bytes(an, ad, tokens, seq, 2, "cpu", "none", False, "bf16", "causal-lm",
                                            chunked=True, kernels=True)  # fmt: skip
    final_norm = tokens * config.hidden_size * 2  # the final norm keeps its output's copy (nothing reads it)
    assert layers + final_norm == pytest.approx(sum(seen.values()), rel=0.1)


def test_a_4bit_bf16_run_counts_the_float32_outputs_its_4bit_layers_hand_on(monkeypatch):
    """training/quantized_cpu.py: under bf16 with the CPU kernels a 4-bit layer hands its output on in float32;
    each block frees four float32 tensors of the intermediate size per token into glibc's heap, trimmed every
    heap_trim.EVERY-th block. Not counted without quantization, kernels or 16-bit mixed precision, or with the
    outputs left in bf16."""
    from peft_magic.training.heap_trim import EVERY

    config = llama_config(hidden=64)
    args = {"quantization": "4bit", "batch_size": 4, "seq_len": 100, "mixed_precision": "bf16", "kernels": True}

    def total(**kw):
        return estimate_memory(config, **{**args, **kw}).total

    glibc, pooled = total(allocator="glibc"), total(allocator="tcmalloc")
    monkeypatch.setenv("PEFT_MAGIC_4BIT_OUT", "16")
    glibc16, pooled16 = total(allocator="glibc"), total(allocator="tcmalloc")
    monkeypatch.delenv("PEFT_MAGIC_4BIT_OUT")
    one_block = 4 * config.intermediate_size * 4 * 4 * 100
    if sys.platform.startswith("linux"):
        assert glibc - glibc16 == EVERY * one_block
    assert pooled - pooled16 == one_block
    for kw in ({"kernels": False}, {"mixed_precision": "no"}):
        monkeypatch.setenv("PEFT_MAGIC_4BIT_OUT", "16")
        off = total(allocator="tcmalloc", **kw)
        monkeypatch.delenv("PEFT_MAGIC_4BIT_OUT")
        assert total(allocator="tcmalloc", **kw) == off
