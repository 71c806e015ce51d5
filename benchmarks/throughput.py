"""Training throughput of peft_magic against plain `transformers.Trainer` + `peft` (issue 6).

Same saved model, same rows, same LoRA (r=8, alpha 16, dropout 0.05 on all linear layers), same seed, batch
size, learning rate, linear schedule, clipping, max_length and number of epochs. The baseline is
`benchmarks/baseline_trainer.py` and imports nothing from peft_magic. Every run is a fresh process (clean timing
and peak memory) with one torch thread; sides alternate order between repeats and repeat ``r`` uses seed ``r`` on
every side, so the figures are means over seeds.

Measured per run:

- steps/s and tokens/s over all the epochs, from the start of the training loop (Trainer's `on_epoch_begin`, our
  `on_train_begin`) to the end of the last optimizer step; tokens are the real (non-padding) tokens, the same
  for every side. Tokens per CPU-second divides by the process's CPU time instead of wall time: on a shared
  machine it is the steadier figure (with one thread it equals wall time when the machine is idle);
- peak memory: the process's peak RSS on CPU, `torch.cuda.max_memory_allocated` on GPU;
- final eval loss, computed for every side by the same function of this file on the same held-out rows
  (token-weighted cross-entropy for causal-lm, per-example for classification), so no side's own evaluation
  code is compared;
- time from cell start to the end of the first optimizer step (the clock starts before torch is imported, so
  imports, tokenization, model loading and LoRA setup are inside).

Sides: ``trainer`` (Trainer defaults: dynamic padding, random batches), ``ours`` (peft_magic defaults, which
include ``train.group_by_length: auto``), ``ours+shuffled`` (``group_by_length: false``: Trainer's random
batches, so the loop alone), ``ours+packing`` (causal-lm: ``data.packing: true``) and ``trainer+grouped``
(Trainer's own ``train_sampling_strategy="group_by_length"``: what the baseline gets from the same idea).

Also per run: useful GFLOP/s, the counted FLOPs of a training step on unpadded tokens (`peft_magic.training.flops`) times
tokens/s, and on a GPU listed in `peft_magic.devices.KNOWN_GPUS` the model FLOPs utilisation against its peak.

Data: synthetic text from a first-order Markov chain over 8,000 pseudo-words (one token each with the benchmark's
word-level tokenizer), lengths spread uniformly between 16 and max_length tokens; the classifier's four labels
each bias the text towards their own topic words.

Run: ``python benchmarks/throughput.py`` (about 15 CPU-minutes on a 2-core machine, longer on a shared one);
``--quick`` for a smoke run (one seed, the small causal LM only).
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

MODELS = {
    # A Llama-style causal LM, hidden 256 / 4 layers (about 7M parameters with the 8k vocabulary).
    "llama-256x4": {"task": "causal-lm", "arch": "llama", "hidden": 256, "layers": 4, "heads": 4, "ffn": 688,
                    "max_length": 128, "batch": 8, "rows": 192, "lr": 5e-3},
    # A Llama-style causal LM, hidden 512 / 8 layers (about 33M parameters).
    "llama-512x8": {"task": "causal-lm", "arch": "llama", "hidden": 512, "layers": 8, "heads": 8, "ffn": 1376,
                    "max_length": 64, "batch": 8, "rows": 96, "lr": 3e-3},
    # A BERT-like encoder with a 4-way classification head, hidden 256 / 4 layers.
    # Three epochs: one leaves the classifier's loss mid-descent, where it depends mostly on the batch order.
    # A weak topic signal (10% of words) and 10% flipped labels keep the final loss well above zero, where a 2%
    # difference means something (with a strong signal the loss ends near 0.05 and moves +-50% between seeds).
    "bert-256x4": {"task": "seq-cls", "arch": "bert", "hidden": 256, "layers": 4, "heads": 4, "ffn": 1024,
                   "max_length": 128, "batch": 8, "rows": 512, "lr": 2e-3, "epochs": 3, "num_labels": 4,
                   "topic_p": 0.25, "label_noise": 0.1, "eval_rows": 256},
}  # fmt: skip
COMMON = {"seed": 0, "epochs": 1, "logging_steps": 10, "eval_rows": 64, "vocab_words": 8000}
SIDES = {
    "causal-lm": ("trainer", "ours", "ours+shuffled", "ours+packing"),
    "seq-cls": ("trainer", "ours", "ours+shuffled", "trainer+grouped"),
}


# ---------------------------------------------------------------- synthetic data and models


def pseudo_words(n: int, rng: random.Random) -> list[str]:
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    words = set()
    while len(words) < n:
        k = rng.choice((1, 2, 2, 3, 3, 4))
        words.add("".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(k)))
    return sorted(words)


class Corpus:
    """A first-order Markov chain over pseudo-words: each word has 8 likely successors (Zipf-weighted), so the
    text has learnable structure and realistic token frequencies. A labelled text draws 40% of its words from
    its label's 8 topic words (`topic_p`, 40% unless the model's spec says otherwise)."""

    def __init__(self, n_words: int, seed: int = 0):
        rng = random.Random(seed)
        self.words = pseudo_words(n_words, rng)
        n = len(self.words)
        self.zipf = [1.0 / (i + 1) for i in range(n)]
        self.next = [[rng.randrange(n) for _ in range(8)] for _ in range(n)]
        self.topics = [rng.sample(range(n), 8) for _ in range(4)]

    def text(self, length: int, rng: random.Random, label: int | None = None, topic_p: float = 0.4) -> str:
        w = rng.choices(range(len(self.words)), weights=self.zipf)[0]
        out = []
        for _ in range(length):
            out.append(self.words[w])
            if label is not None and rng.random() < topic_p:
                w = rng.choice(self.topics[label])
            elif rng.random() < 0.1:
                w = rng.choices(range(len(self.words)), weights=self.zipf)[0]
            else:
                w = rng.choices(self.next[w], weights=(8, 4, 3, 2, 2, 1, 1, 1))[0]
        return " ".join(out)

    def rows(self, n: int, max_length: int, seed: int, classes: int = 0, topic_p: float = 0.4,
             label_noise: float = 0.0) -> list[dict]:  # fmt: skip
        rng = random.Random(seed)
        rows = []
        for i in range(n):
            length = rng.randint(16, max_length - 1)  # -1: room for the EOS appended to causal-lm texts
            label = i % classes if classes else None
            row = {"text": self.text(length, rng, label, topic_p)}
            if classes:
                flip = rng.random() < label_noise  # a wrong label: the loss cannot reach zero
                row["label"] = rng.choice([c for c in range(classes) if c != label]) if flip else label
            rows.append(row)
        return rows


def make_tokenizer(words: list[str]):
    """A word-level tokenizer (one token per word), built locally: no hub download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=4096)  # fmt: skip


def build_model(spec: dict, tok, path: str) -> None:
    """A randomly initialised model saved to `path` (with its classification head, so both sides load it)."""
    import torch

    torch.manual_seed(0)
    ids = {"pad_token_id": tok.pad_token_id}
    if spec["arch"] == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=spec["hidden"], intermediate_size=spec["ffn"],
                          num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                          num_key_value_heads=spec["heads"], max_position_embeddings=spec["max_length"],
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
                          **ids)  # fmt: skip
        model = LlamaForCausalLM(cfg)
    else:
        from transformers import BertConfig, BertForSequenceClassification

        n = spec["num_labels"]
        cfg = BertConfig(vocab_size=len(tok), hidden_size=spec["hidden"], intermediate_size=spec["ffn"],
                         num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                         max_position_embeddings=spec["max_length"], num_labels=n,
                         id2label={i: str(i) for i in range(n)}, label2id={str(i): i for i in range(n)}, **ids)  # fmt: skip
        model = BertForSequenceClassification(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)


def build_assets(workdir: str, names: list[str]) -> None:
    """Save each model, its tokenizer and its train/eval rows under `workdir/<name>/`."""
    corpus = Corpus(COMMON["vocab_words"])
    tok = make_tokenizer(corpus.words)
    for name in names:
        spec = {**COMMON, **MODELS[name]}
        folder = os.path.join(workdir, name)
        if os.path.isfile(os.path.join(folder, "rows.json")):
            continue
        build_model(spec, tok, os.path.join(folder, "model"))
        task = {"classes": spec.get("num_labels", 0), "topic_p": spec.get("topic_p", 0.4),
                "label_noise": spec.get("label_noise", 0.0)}
        rows = {"train": corpus.rows(spec["rows"], spec["max_length"], seed=1, **task),
                "eval": corpus.rows(spec["eval_rows"], spec["max_length"], seed=2, **task)}  # fmt: skip
        with open(os.path.join(folder, "rows.json"), "w") as fh:
            json.dump(rows, fh)


# ---------------------------------------------------------------- the shared evaluation


def eval_loss(model, tok, rows: list[dict], spec: dict) -> float:
    """Cross-entropy on `rows`, the same computation for every side: token-weighted over next-token predictions
    (causal-lm), or averaged over examples (classification)."""
    import torch
    import torch.nn.functional as F
    from transformers import DataCollatorWithPadding

    collate = DataCollatorWithPadding(tok)
    causal = spec["task"] == "causal-lm"
    texts = [r["text"] + (tok.eos_token if causal else "") for r in rows]
    device = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(texts), 16):
            enc = collate([tok(t, truncation=True, max_length=spec["max_length"]) for t in texts[i : i + 16]])
            enc = {k: v.to(device) for k, v in enc.items()}
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()
            if causal:
                target = enc["input_ids"][:, 1:].masked_fill(enc["attention_mask"][:, 1:] == 0, -100)
                total += F.cross_entropy(
                    logits[:, :-1].transpose(1, 2), target, ignore_index=-100, reduction="sum"
                ).item()
                count += int((target != -100).sum())
            else:
                y = torch.tensor([r["label"] for r in rows[i : i + 16]], device=device)
                total += F.cross_entropy(logits, y, reduction="sum").item()
                count += len(y)
    return total / count


# ---------------------------------------------------------------- one run (a fresh process)


def train_ours(spec: dict, model_dir: str, train_rows: list, out_dir: str, clock: dict, variant: str):
    import peft_magic

    class Clock:
        def on_train_begin(self, state):
            clock["begin"] = (time.perf_counter(), time.process_time())

        def on_step_end(self, state):
            clock["step_times"].append((time.perf_counter(), time.process_time()))

    clock["step_times"] = []
    config = {
        "model": model_dir,
        "task": spec["task"],
        "method": {"name": "lora", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05},
        "data": {"train": train_rows, "max_length": spec["max_length"], "packing": variant == "packing"},
        "train": {"num_train_epochs": spec["epochs"], "per_device_train_batch_size": spec["batch"], "learning_rate": spec["lr"],
                  "lr_scheduler_type": "linear", "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
                  "logging_steps": spec["logging_steps"], "eval_steps": 0, "save_steps": 0, "seed": spec["seed"],
                  "group_by_length": "false" if variant == "shuffled" else "auto", "output_dir": out_dir},
    }  # fmt: skip
    if variant == "bf16":
        config["train"]["mixed_precision"] = "bf16"
    if _cuda():  # same precision as the baseline's: float32 weights, bf16 autocast
        config["model"] = {"name_or_path": model_dir, "dtype": "float32"}
        config["train"]["mixed_precision"] = "bf16"
    run = peft_magic.train(config, callbacks=[Clock()], display="none", name="bench")
    return run.model


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def worker(side: str, name: str, workdir: str, seed: int = 0) -> dict:
    cell_start = time.perf_counter()  # nothing heavy is imported yet: the clock includes every import
    spec = {**COMMON, **MODELS[name], "seed": seed}
    folder = os.path.join(workdir, name)
    with open(os.path.join(folder, "rows.json")) as fh:
        rows = json.load(fh)
    model_dir = os.path.join(folder, "model")
    out_dir = tempfile.mkdtemp(prefix="bench-out-", dir=workdir)
    clock: dict = {}
    base, _, variant = side.partition("+")
    if base == "trainer":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from baseline_trainer import train_baseline

        model = train_baseline(spec, model_dir, rows["train"], out_dir, clock, variant)
    else:
        sys.path.insert(0, str(ROOT))
        model = train_ours(spec, model_dir, rows["train"], out_dir, clock, variant)
    import resource

    import torch
    from transformers import AutoTokenizer

    peak_gb = (torch.cuda.max_memory_allocated() if _cuda() else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1024**3  # fmt: skip
    steps = clock["step_times"]
    seconds = steps[-1][0] - clock["begin"][0]
    cpu_seconds = steps[-1][1] - clock["begin"][1]
    tok = AutoTokenizer.from_pretrained(model_dir)
    lengths = [min(len(tok(r["text"])["input_ids"]) + (spec["task"] == "causal-lm"), spec["max_length"])
               for r in rows["train"]]  # fmt: skip
    tokens = spec["epochs"] * sum(lengths)
    sys.path.insert(0, str(ROOT))
    from peft_magic.training.flops import mfu, peak_tflops, train_flops_per_token

    # useful work: the counted FLOPs of an unpadded sequence of the mean length, per real token
    per_token = train_flops_per_token(model, seq_len=round(statistics.mean(lengths)))
    return {
        "side": side,
        "model": name,
        "seed": seed,
        "steps": len(steps),
        "train_s": seconds,
        "steps_per_s": len(steps) / seconds,
        "tokens_per_s": tokens / seconds,
        "tokens_per_cpu_s": tokens / cpu_seconds,
        "gflops": per_token * tokens / seconds / 1e9,  # useful (non-padding) FLOP/s achieved
        "mfu": mfu(per_token, tokens / seconds, peak_tflops()),  # None off a known GPU
        "peak_gb": peak_gb,
        "eval_loss": eval_loss(model, tok, rows["eval"], spec),
        "first_step_s": steps[0][0] - cell_start,
    }


# ---------------------------------------------------------------- orchestration and the table


def run_side(side: str, name: str, workdir: str, threads: int, seed: int, timeout: float) -> dict:
    env = {**os.environ, "PEFT_MAGIC_CACHE": tempfile.mkdtemp(prefix="cache-", dir=workdir),  # cold: no reuse
           "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}  # fmt: skip
    cmd = [sys.executable, __file__, "--worker", side, "--model", name, "--workdir", workdir, "--seed", str(seed)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{side} on {name} failed:\n{proc.stderr[-3000:]}")


def machine() -> str:
    import platform

    model = platform.processor() or "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import peft
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{model}, {os.cpu_count()} cores, {gpu}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, peft {peft.__version__}")  # fmt: skip


FIELDS = ("steps_per_s", "tokens_per_s", "tokens_per_cpu_s", "gflops", "peak_gb", "eval_loss", "first_step_s")


def table(results: list[dict]) -> str:
    """The Markdown table: means over repeats, and each side's ratios to the trainer side of the same model."""
    by: dict = {}
    for r in results:
        by.setdefault((r["model"], r["side"]), []).append(r)
    mean = {k: {f: statistics.mean(x[f] for x in v) for f in FIELDS} for k, v in by.items()}
    sd = {k: statistics.stdev(x["eval_loss"] for x in v) if len(v) > 1 else 0.0 for k, v in by.items()}
    mfus = {k: [x["mfu"] for x in v if x.get("mfu") is not None] for k, v in by.items()}
    header = ("| model | side | steps/s | tokens/s | tokens per CPU-s | useful GFLOP/s (MFU) | peak memory (GB) "
              "| final eval loss (± sd over seeds) | cell start → 1st step (s) | speed vs trainer (wall / CPU) "
              "| eval loss vs trainer |")  # fmt: skip
    lines = [header, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (model, side), m in mean.items():
        base = mean.get((model, "trainer"))
        speed = dloss = "—"
        if base and side != "trainer":
            speed = f"{m['tokens_per_s'] / base['tokens_per_s']:.2f}× / {m['tokens_per_cpu_s'] / base['tokens_per_cpu_s']:.2f}×"
            dloss = (
                f"{(m['eval_loss'] / base['eval_loss'] - 1) * 100:+.1f}% ({m['eval_loss'] - base['eval_loss']:+.3f})"
            )
        util = f" ({statistics.mean(mfus[(model, side)]):.1%})" if mfus[(model, side)] else ""
        lines.append(f"| {model} | {side} | {m['steps_per_s']:.2f} | {m['tokens_per_s']:,.0f} | {m['tokens_per_cpu_s']:,.0f} "
                     f"| {m['gflops']:,.1f}{util} | {m['peak_gb']:.2f} | {m['eval_loss']:.4f} ± {sd[(model, side)]:.4f} "
                     f"| {m['first_step_s']:.1f} | {speed} | {dloss} |")  # fmt: skip
    return "\n".join(lines)


def equivalence(workdir: str, name: str = "bert-256x4", n_rows: int = 64) -> list[tuple]:
    """Both loops on the same batches in the same order, with every dropout off: (step, trainer loss, our loss).

    The benchmark's sides draw different random batch orders and dropout masks, so their final losses differ by
    that noise. With both removed the two loops must produce the same loss at every step. Our order is made
    sequential by rebuilding the training DataLoader without shuffling (instrumentation of this check only).
    """
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from baseline_trainer import train_baseline
    from torch.utils.data import DataLoader
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    import peft_magic
    from peft_magic.training import engine

    spec = {**COMMON, **MODELS[name], "epochs": 1, "logging_steps": 1, "lora_dropout": 0.0}
    folder = os.path.join(workdir, name)
    with open(os.path.join(folder, "rows.json")) as fh:
        rows = json.load(fh)["train"][:n_rows]
    model_dir = os.path.join(workdir, f"{name}-no-dropout")
    if not os.path.isdir(model_dir):
        model = AutoModelForSequenceClassification.from_pretrained(os.path.join(folder, "model"))
        model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
        model.save_pretrained(model_dir)
        AutoTokenizer.from_pretrained(os.path.join(folder, "model")).save_pretrained(model_dir)
    theirs = []

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                theirs.append(float(logs["loss"]))

    import transformers

    init = transformers.Trainer.__init__

    def with_losses(self, *a, **kw):
        kw["callbacks"] = [*kw.get("callbacks", []), Losses()]
        init(self, *a, **kw)

    transformers.Trainer.__init__ = with_losses
    try:
        train_baseline(spec, model_dir, rows, tempfile.mkdtemp(dir=workdir), {}, "sequential")
    finally:
        transformers.Trainer.__init__ = init
    make_loaders = engine.make_loaders

    def in_order(data, cfg, accelerator):
        _, eval_dl = make_loaders(data, cfg, accelerator)
        train = DataLoader(data.train.with_format("python"), batch_size=cfg.train.per_device_train_batch_size,
                           shuffle=False, collate_fn=data.collator)  # fmt: skip
        return train, eval_dl

    engine.make_loaders = in_order
    try:
        config = {"model": model_dir, "task": spec["task"], "method": {"name": "lora", "lora_dropout": 0.0},
                  "data": {"train": rows, "max_length": spec["max_length"]},
                  "train": {"num_train_epochs": 1, "per_device_train_batch_size": spec["batch"], "learning_rate": spec["lr"],
                            "logging_steps": 1, "eval_steps": 0, "seed": 0, "output_dir": tempfile.mkdtemp(dir=workdir)}}  # fmt: skip
        run = peft_magic.train(config, display="none")
    finally:
        engine.make_loaders = make_loaders
    ours = [r["loss"] for r in run.history if "loss" in r]
    return list(zip(range(1, len(ours) + 1), theirs, ours))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated, from: " + ", ".join(MODELS))
    p.add_argument("--sides", default=None, help="comma-separated sides (default: trainer, ours and ours' fast option)")
    p.add_argument("--repeats", type=int, default=2, help="runs per side; the order of sides alternates")
    p.add_argument("--quick", action="store_true", help="one repeat, the tiny causal LM only (a smoke run)")
    p.add_argument("--workdir", default=None, help="where models and rows are built (default: a temp folder)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (1: CPU time measures the work)")
    p.add_argument("--json", default=None, help="also write every run's figures to this file")
    p.add_argument(
        "--equivalence",
        action="store_true",
        help="check that both loops give the same per-step losses on the same batches without dropout (about 1 minute)",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.model, args.workdir, args.seed)), flush=True)
        return
    if args.equivalence:
        workdir = args.workdir or tempfile.mkdtemp(prefix="peft-magic-bench-")
        build_assets(workdir, ["bert-256x4"])
        pairs = equivalence(workdir)
        worst = max(abs(a - b) for _, a, b in pairs)
        print("| step | Trainer loss | peft_magic loss |\n| ---: | ---: | ---: |")
        print("\n".join(f"| {i} | {a:.6f} | {b:.6f} |" for i, a, b in pairs))
        print(f"\nlargest difference: {worst:.2e} over {len(pairs)} steps")
        return
    names = ["llama-256x4"] if args.quick else [n.strip() for n in args.models.split(",") if n.strip()]
    repeats = 1 if args.quick else args.repeats
    workdir = args.workdir or tempfile.mkdtemp(prefix="peft-magic-bench-")
    start = time.time()
    load_before = os.getloadavg()
    build_assets(workdir, names)
    results = []
    for name in names:
        sides = args.sides.split(",") if args.sides else list(SIDES[MODELS[name]["task"]])
        for rep in range(repeats):
            for side in sides if rep % 2 == 0 else sides[::-1]:
                r = run_side(side, name, workdir, args.threads, seed=rep, timeout=900)
                results.append(r)
                print(f"  {name:12} {side:16} {r['steps_per_s']:6.2f} steps/s {r['tokens_per_s']:8,.0f} tok/s "
                      f"loss {r['eval_loss']:.4f} peak {r['peak_gb']:.2f} GB first step {r['first_step_s']:.1f} s",
                      file=sys.stderr, flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine(), "results": results}, fh, indent=1)
    load_after = os.getloadavg()
    print(f"\nMachine: {machine()}. Load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after; "
          f"{repeats} run(s) per side, {args.threads} torch thread(s) each, {time.time() - start:.0f} s in all.\n")  # fmt: skip
    print(table(results))


if __name__ == "__main__":
    main()
