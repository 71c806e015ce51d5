"""Start-up costs in a notebook (issue 6): `%load_ext peft_magic`, and cell start → first training step.

1. `%load_ext peft_magic` in a fresh IPython shell (a fresh process each time, so nothing is imported yet):
   the time of the magic itself, median of `--repeats`; also checks that it imported no torch/transformers.
2. A notebook session per side, in a fresh process with an IPython shell: the same training cell run twice,
   timing cell start → end of the first optimizer step.
   - ``peft_magic``: ``%load_ext peft_magic`` then a ``%%peft_train`` cell (YAML body, data as ``$rows``).
   - ``trainer``: a cell that tokenizes with ``Dataset.map``, loads the model, applies LoRA with ``get_peft_model``
     and calls ``Trainer.train()``, as the transformers/peft docs show.
   The first run pays the imports (cold kernel); the re-run is what changing a learning rate and re-running the
   cell costs. peft_magic's re-run reads the tokenized data from its cache (``data.cache_tokenized``); the
   Trainer cell tokenizes again, as a plain notebook does (an in-memory dataset has no datasets cache).
   Each side also reports the tokenization cache's cost on the first run (hashing + writing) and the saving on
   the re-run.

Data: ``--rows`` (default 20,000) synthetic texts of 16..256 tokens and the 256x4 Llama-style model of
``benchmarks/throughput.py``. Run: ``python benchmarks/startup.py`` (about 2 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "datasets", "accelerate", "bitsandbytes")

LOAD_EXT = """
import sys, time
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()
t = time.perf_counter()
shell.run_line_magic("load_ext", "peft_magic")
dt = time.perf_counter() - t
print("RESULT", dt, [m for m in {heavy!r} if m in sys.modules])
"""

OURS_CELL = """model: {model}
data:
  train: $rows
  max_length: 256
train:
  max_steps: 2
  per_device_train_batch_size: 8
  learning_rate: 1e-3
  output_dir: {out}
"""

TRAINER_CELL = """
import torch, datasets
from peft import LoraConfig, get_peft_model
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainerCallback,
                          TrainingArguments)
tok = AutoTokenizer.from_pretrained({model!r})
ds = datasets.Dataset.from_list(rows)
def encode(batch):
    enc = tok([t + tok.eos_token for t in batch["text"]], truncation=True, max_length=256)
    enc["labels"] = [list(x) for x in enc["input_ids"]]
    return enc
_t = time.perf_counter()
ds = ds.map(encode, batched=True, remove_columns=ds.column_names)
_marks["tokenize_s"] = time.perf_counter() - _t
model = AutoModelForCausalLM.from_pretrained({model!r})
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                         task_type="CAUSAL_LM"))
class FirstStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        _marks.setdefault("first_step", time.perf_counter())
args = TrainingArguments(output_dir={out!r}, max_steps=2, per_device_train_batch_size=8, learning_rate=1e-3,
                         report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True)
Trainer(model=model, args=args, train_dataset=ds,
        data_collator=DataCollatorForSeq2Seq(tok, label_pad_token_id=-100, padding=True),
        callbacks=[FirstStep()]).train()
"""


def session(side: str, workdir: str) -> dict:
    """One notebook session (this process): the training cell twice; cell start -> first step each time."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    with open(os.path.join(workdir, "rows.json")) as fh:
        rows = json.load(fh)
    model = os.path.join(workdir, "model")
    marks: dict = {}
    shell.user_ns.update({"rows": rows, "_marks": marks, "time": time})
    out = []
    for attempt in range(2):
        marks.clear()
        out_dir = tempfile.mkdtemp(dir=workdir)
        start = time.perf_counter()
        if side == "peft_magic":
            if attempt == 0:
                shell.run_line_magic("load_ext", "peft_magic")
                shell.run_line_magic("config", "PeftMagics.display = 'none'")
                _mark_first_step(marks)
                _time_tokenization(marks)
            shell.run_cell_magic("peft_train", "run", OURS_CELL.format(model=model, out=out_dir))
        else:
            result = shell.run_cell(TRAINER_CELL.format(model=model, out=out_dir))
            result.raise_error()
        out.append({"first_step_s": marks["first_step"] - start, "tokenize_s": marks.get("tokenize_s")})
    return {"side": side, "cold": out[0], "rerun": out[1]}


def _mark_first_step(marks: dict) -> None:
    """Instrument peft_magic's event bus: note when the first `on_step_end` is emitted (measurement only)."""
    from peft_magic import events

    emit = events.EventBus.emit

    def timed_emit(self, hook, *args, **kwargs):
        if hook == "on_step_end":
            marks.setdefault("first_step", time.perf_counter())
        return emit(self, hook, *args, **kwargs)

    events.EventBus.emit = timed_emit


def _time_tokenization(marks: dict) -> None:
    """Time `tokcache.cached_tokenize` (tokenization, or the cache read on a hit) for the report."""
    from peft_magic.data import cache as tokcache

    inner = tokcache.cached_tokenize

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            marks["tokenize_s"] = marks.get("tokenize_s", 0.0) + time.perf_counter() - t

    tokcache.cached_tokenize = timed  # data.prepare imports it from tokcache at each call


def load_ext_times(repeats: int) -> tuple[list[float], list[str]]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    times, heavy = [], set()
    for _ in range(repeats):
        proc = subprocess.run([sys.executable, "-c", LOAD_EXT.format(heavy=HEAVY)], env=env, capture_output=True,
                              text=True, timeout=120, check=False)  # fmt: skip
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT")), None)
        if line is None:
            raise RuntimeError(proc.stderr[-2000:])
        _, dt, mods = line.split(" ", 2)
        times.append(float(dt))
        heavy.update(ast.literal_eval(mods))
    return times, sorted(heavy)


def build(workdir: str, n_rows: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import throughput as tp

    if os.path.isfile(os.path.join(workdir, "rows.json")):
        return
    corpus = tp.Corpus(tp.COMMON["vocab_words"])
    tok = tp.make_tokenizer(corpus.words)
    tp.build_model({**tp.MODELS["llama-256x4"], "max_length": 256}, tok, os.path.join(workdir, "model"))
    with open(os.path.join(workdir, "rows.json"), "w") as fh:
        json.dump(corpus.rows(n_rows, 256, seed=1), fh)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=20000, help="training rows (tokenization cost grows with them)")
    p.add_argument("--repeats", type=int, default=5, help="fresh processes timing %%load_ext")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: a shared machine's load does not "
        "stall OpenMP barriers, which made 2-thread steps 10x slower here)",
    )
    p.add_argument("--workdir", default=None)
    p.add_argument("--session", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.session:
        sys.path.insert(0, str(ROOT))
        print("RESULT " + json.dumps(session(args.session, args.workdir)), flush=True)
        return
    workdir = args.workdir or tempfile.mkdtemp(prefix="peft-magic-startup-")
    times, heavy = load_ext_times(args.repeats)
    build(workdir, args.rows)
    sessions = []
    for side in ("peft_magic", "trainer"):
        env = {**os.environ, "PEFT_MAGIC_CACHE": tempfile.mkdtemp(dir=workdir), "TOKENIZERS_PARALLELISM": "false",
               "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # fmt: skip
        proc = subprocess.run([sys.executable, __file__, "--session", side, "--workdir", workdir], env=env,
                              capture_output=True, text=True, timeout=900, check=False)  # fmt: skip
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(f"{side} session failed:\n{proc.stderr[-3000:]}")
        sessions.append(json.loads(line[7:]))
    print(f"`%load_ext peft_magic`: median {statistics.median(times) * 1000:.0f} ms over {len(times)} fresh processes "
          f"(min {min(times) * 1000:.0f}, max {max(times) * 1000:.0f}); heavy modules imported: {heavy or 'none'}.\n")  # fmt: skip
    print(
        f"Cell start → end of the first optimizer step ({args.rows:,} rows of 16..256 tokens, Llama 256x4, LoRA r=8):\n"
    )
    print("| side | first run (cold kernel) (s) | re-run of the same cell (s) | tokenization, first run / re-run (s) |")
    print("| --- | ---: | ---: | ---: |")
    for s in sessions:
        tok = f"{s['cold']['tokenize_s']:.1f} / {s['rerun']['tokenize_s']:.2f}"
        print(f"| {s['side']} | {s['cold']['first_step_s']:.1f} | {s['rerun']['first_step_s']:.1f} | {tok} |")


if __name__ == "__main__":
    main()
