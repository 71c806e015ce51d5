"""Evaluation speed: batches in data order (what a plain DataLoader does) against longest first (what peft_magic
does, `sampling.longest_first`), on the same model and rows. Prints the time of each pass and the metrics, which
must be equal: the order only changes how much padding each batch carries.

Uses the throughput benchmark's classifier (`bert-256x4`, 256 held-out rows of 16..128 tokens, built locally).
Run: ``python benchmarks/eval_order.py`` (about a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=None, help="where the model and rows are built (default: a temp folder)")
    p.add_argument("--batch", type=int, default=8, help="eval batch size")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import torch

    torch.set_num_threads(1)
    from throughput import build_assets
    from torch.utils.data import DataLoader

    import peft_magic
    from peft_magic.training.evaluation import evaluate_model
    from peft_magic.training.packing import example_lengths
    from peft_magic.training.sampling import longest_first

    workdir = args.workdir or tempfile.mkdtemp(prefix="eval-order-")
    build_assets(workdir, ["bert-256x4"])
    folder = os.path.join(workdir, "bert-256x4")
    with open(os.path.join(folder, "rows.json")) as fh:
        rows = json.load(fh)
    config = {"model": os.path.join(folder, "model"), "task": "seq-cls",
              "data": {"train": rows["train"][:64], "eval": rows["eval"], "max_length": 128},
              "train": {"max_steps": 1, "eval_steps": 0, "output_dir": os.path.join(workdir, "out")}}  # fmt: skip
    run = peft_magic.train(config, display="none")
    ds = run.data.eval.with_format("python")
    orders = {"data order": None, "longest first": longest_first(example_lengths(run.data.eval))}
    times: dict = {k: [] for k in orders}
    metrics = {}
    for _ in range(args.repeats):
        for name, sampler in orders.items():
            dl = DataLoader(ds, batch_size=args.batch, sampler=sampler, collate_fn=run.data.collator)
            start = time.perf_counter()
            metrics[name] = evaluate_model(run.model, dl, None, task="seq-cls", labels=run.labels)
            times[name].append(time.perf_counter() - start)
    base = min(times["data order"])
    print(f"\n{len(ds)} eval rows, batch {args.batch}, best of {args.repeats}\n")
    print("| order | seconds | speed-up | loss | accuracy |\n| --- | ---: | ---: | ---: | ---: |")
    for name in orders:
        m = metrics[name]
        print(f"| {name} | {min(times[name]):.2f} | {base / min(times[name]):.2f}x | {m['loss']:.6f} | {m['accuracy']:.4f} |")


if __name__ == "__main__":
    main()
