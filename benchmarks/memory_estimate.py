"""How close is the memory pre-flight to the truth? Estimate vs measured peak, for several configs.

Each config trains for a few real steps (forward + backward + AdamW, LoRA through peft, `prepare_model_for_kbit_training`
for 4-bit/8-bit bases) in a fresh subprocess, so one config's allocations cannot inflate another's peak. The
model is built locally from a config (no download), saved, and loaded back with `from_pretrained` the way users
load theirs (that is also how bitsandbytes quantizes it).

Peak memory is, on CPU, the child's peak RSS. Two figures are read: `ru_maxrss` over the whole process, and the
peak over the training steps alone (`VmHWM` after resetting it through /proc/self/clear_refs once the model is
loaded), since loading can briefly map a whole checkpoint and that is not what training needs. On CUDA it is
`torch.cuda.max_memory_allocated()` over the training steps, compared with the estimate minus the CUDA context and
the allocator's cache (which it does not see), and `max_memory_reserved()` compared with the estimate minus the
context.

    python benchmarks/memory_estimate.py            # every config, a table at the end
    python benchmarks/memory_estimate.py --only tiny  # configs whose name contains "tiny"
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Architectures built from a config: small enough for a CPU, shaped like the real thing (Llama: SwiGLU, RMSNorm,
# grouped-query attention; BERT: GELU, LayerNorm, dropout everywhere).
ARCHS = {
    "llama-tiny": {"model_type": "llama", "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 8192,
                   "max_position_embeddings": 512},
    "llama-small": {"model_type": "llama", "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8,
                    "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 32000,
                    "max_position_embeddings": 512},
    "smollm2": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                "max_position_embeddings": 512, "tie_word_embeddings": True},  # SmolLM2-135M's shape
    "bert-small": {"model_type": "bert", "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
                   "num_attention_heads": 4, "vocab_size": 8192, "max_position_embeddings": 512},
}  # fmt: skip

# (name, arch, task, quantization, batch, seq_len, gradient_checkpointing[, loss]): loss "plain" (the model's own,
# positions x vocab logits) unless "chunked" (training/chunked_loss.py, peft_magic's default for causal-lm; every
# position trained, the estimate's upper bound)
CONFIGS = [
    ("tiny lora b4 s128", "llama-tiny", "causal-lm", "none", 4, 128, False),
    ("tiny lora b16 s256", "llama-tiny", "causal-lm", "none", 16, 256, False),
    ("tiny lora b16 s256 gc", "llama-tiny", "causal-lm", "none", 16, 256, True),
    ("tiny 4bit b16 s256", "llama-tiny", "causal-lm", "4bit", 16, 256, False),
    ("tiny 8bit b16 s256", "llama-tiny", "causal-lm", "8bit", 16, 256, False),
    ("small lora b4 s256", "llama-small", "causal-lm", "none", 4, 256, False),
    ("small lora b16 s128", "llama-small", "causal-lm", "none", 16, 128, False),
    ("small 4bit b16 s256", "llama-small", "causal-lm", "4bit", 16, 256, False),
    ("small 4bit b16 s256 gc", "llama-small", "causal-lm", "4bit", 16, 256, True),
    ("small 8bit b4 s256", "llama-small", "causal-lm", "8bit", 4, 256, False),
    ("bert seq-cls b16 s256", "bert-small", "seq-cls", "none", 16, 256, False),
    ("bert seq-cls 8bit b4 s128", "bert-small", "seq-cls", "8bit", 4, 128, False),
    ("bert seq-cls 4bit b16 s128 gc", "bert-small", "seq-cls", "4bit", 16, 128, True),
    ("small lora b16 s128 chunked", "llama-small", "causal-lm", "none", 16, 128, False, "chunked"),
    ("small lora b8 s256 gc chunked", "llama-small", "causal-lm", "none", 8, 256, True, "chunked"),
    ("small 4bit b16 s256 chunked", "llama-small", "causal-lm", "4bit", 16, 256, False, "chunked"),
    ("smollm2 lora b4 s256", "smollm2", "causal-lm", "none", 4, 256, False),
    ("smollm2 lora b4 s256 chunked", "smollm2", "causal-lm", "none", 4, 256, False, "chunked"),
    ("smollm2 lora b4 s256 gc chunked", "smollm2", "causal-lm", "none", 4, 256, True, "chunked"),
]
STEPS = 2  # the first step allocates the optimizer states; the second shows the steady state
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear"}


def build_config(arch: str):
    from transformers import AutoConfig

    spec = dict(ARCHS[arch])
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def _hwm_reset() -> bool:
    """Reset this process's peak RSS (VmHWM); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_one(arch: str, task: str, quantization: str, batch: int, seq_len: int, gc: bool, device: str,
            loss: str = "plain") -> dict:
    """Train `STEPS` steps in this process and return its peak memory (bytes)."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    torch.manual_seed(0)
    config = build_config(arch)
    cls = transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModelForSequenceClassification
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    with tempfile.TemporaryDirectory() as folder:
        cls.from_config(config).save_pretrained(folder)
        kw = {}
        # transformers' default skip list misses a classifier head; peft must train it, so keep it unquantized.
        skip = {"llm_int8_skip_modules": ["classifier", "score"]} if task != "causal-lm" else {}
        if quantization == "4bit":
            kw["quantization_config"] = transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype, **skip)  # fmt: skip
        elif quantization == "8bit":
            kw["quantization_config"] = transformers.BitsAndBytesConfig(load_in_8bit=True, **skip)
        model = cls.from_pretrained(folder, dtype=dtype, device_map={"": device} if device != "cpu" else None, **kw)
    if quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc)
    elif gc:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    task_type = "CAUSAL_LM" if task == "causal-lm" else "SEQ_CLS"
    model = get_peft_model(model, LoraConfig(task_type=task_type, **LORA))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    if loss == "chunked":
        from peft_magic.training.chunked_loss import ChunkedCausalLMLoss

        chunked = ChunkedCausalLMLoss(model)
    vocab = config.vocab_size
    loaded_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    reset = _hwm_reset() if device == "cpu" else False
    if device != "cpu":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(STEPS):
        ids = torch.randint(0, vocab, (batch, seq_len), device=device)
        labels = ids if task == "causal-lm" else torch.randint(0, 2, (batch,), device=device)
        # Same shape as the engine's loop: the outputs (and their logits) stay alive through backward.
        if loss == "chunked":
            out = chunked(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
            out.backward()
        else:
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
            out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del out
    result = {"seconds": time.perf_counter() - start, "trainable": sum(p.numel() for p in trainable)}
    if device == "cpu":
        result["process_peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result["train_peak"] = _hwm() if reset else result["process_peak"]
        result["loaded_peak"] = loaded_rss
    else:
        torch.cuda.synchronize()
        result["train_peak"] = torch.cuda.max_memory_allocated()
        result["process_peak"] = torch.cuda.max_memory_reserved()  # with the allocator's cache
    return result


def estimate(arch: str, task: str, quantization: str, batch: int, seq_len: int, gc: bool, device: str,
             loss: str = "plain"):
    from peft_magic.preflight import estimate_memory

    return estimate_memory(
        build_config(arch), task=task, quantization=quantization, dtype="float32" if device == "cpu" else "bfloat16",
        method="lora", method_params=dict(LORA), batch_size=batch, seq_len=seq_len, gradient_checkpointing=gc,
        device=device, loss=loss,
    )  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="Run only configs whose name contains this text.")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available).")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:  # one config, in a fresh process: print its JSON result
        print("RESULT " + json.dumps(run_one(*json.loads(args.child))))
        return
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for name, arch, task, quant, batch, seq, gc, *loss in CONFIGS:
        if args.only not in name:
            continue
        spec = [arch, task, quant, batch, seq, gc, device, *loss]
        proc = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(spec)], check=False, capture_output=True, text=True
        )
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        actual = json.loads(line[len("RESULT ") :])
        est = estimate(*spec)
        # max_memory_allocated sees neither the CUDA context nor the allocator's cache: compare without those parts;
        # max_memory_reserved includes the cache.
        predicted = est.total if device == "cpu" else est.total - est.runtime - est.slack
        predicted_whole = est.total if device == "cpu" else est.total - est.runtime
        rows.append((name, predicted, predicted_whole, actual))
        print(_row(name, predicted, actual, est), flush=True)
    print()
    print(table(rows, device))


def _gb(n: float) -> str:
    return f"{n / 2**30:.3f}"


def _row(name, predicted, actual, est) -> str:
    return (f"{name:28s} est {_gb(predicted)} GB  train peak {_gb(actual['train_peak'])} GB  "
            f"ratio {predicted / actual['train_peak']:.2f}  process peak {_gb(actual['process_peak'])} GB  "
            f"({actual['seconds']:.0f}s; weights {_gb(est.weights)} act {_gb(est.activations)} "
            f"overhead {_gb(est.overhead)})")  # fmt: skip


def table(rows, device) -> str:
    """A Markdown table: config, estimate, measured peaks, ratios."""
    if device == "cpu":
        peak, whole = "training peak RSS", "whole-process peak RSS (ru_maxrss)"
    else:
        peak, whole = "max_memory_allocated", "max_memory_reserved"
    lines = [
        f"| config | estimate (GB) | {peak} (GB) | ratio | {whole} (GB) | ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, predicted, predicted_whole, actual in rows:
        lines.append(
            f"| {name} | {_gb(predicted)} | {_gb(actual['train_peak'])} | {predicted / actual['train_peak']:.2f} "
            f"| {_gb(actual['process_peak'])} | {predicted_whole / actual['process_peak']:.2f} |"
        )
    ratios = [p / a["train_peak"] for _, p, _, a in rows]
    if ratios:
        lines.append(f"\nratio estimate/actual: min {min(ratios):.2f}, max {max(ratios):.2f} (target 0.80-1.20)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
