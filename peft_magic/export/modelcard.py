"""The README.md written beside every export: what was trained, on what, how it did, and how to load it.

It names data sources (a path, a hub id, a `$variable`), never their contents, and holds no credentials.
"""

from __future__ import annotations

import importlib.metadata

LIBRARIES = ("peft_magic", "torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes")


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def model_card(run, merged: bool = False, folder: str = "ADAPTER_DIR", extra=()) -> str:
    """The card's Markdown; `extra` lines (the GGUF files, the list of files) go after "How to load"."""
    from ..data.prepare import describe_source
    from ..methods import method_label
    from ..ui.format import format_params

    cfg, s = run.config, run.state
    full = getattr(run.method, "exports_full_model", False)  # full fine-tuning: the export is a whole model
    base = cfg.model.name_or_path + (f" (GGUF file {cfg.model.gguf_file})" if cfg.model.gguf_file else "")
    lines = [
        "---",
        "library_name: peft" if not merged and run.method.is_peft else "library_name: transformers",
        f"base_model: {cfg.model.name_or_path}",
        "tags: [peft_magic, " + cfg.method.name + "]",
        "---",
        f"# {run.name}: {method_label(cfg.method)} on {cfg.model.display_name}",
        "",
        "| | |",
        "|---|---|",
        f"| base model | {base} |",
        f"| quantization | {cfg.model.quantization} |",
        f"| task | {cfg.task} |",
        f"| method | {method_label(cfg.method)} |",
        f"| method parameters | {', '.join(f'{k}={v}' for k, v in cfg.method.params.items()) or 'defaults'} |",
        f"| trainable parameters | {format_params(s.trainable_params, s.total_params) or 'n/a'} |",
        f"| training data | {describe_source(cfg.data.train)} |",
        f"| eval data | {describe_source(cfg.data.eval) if cfg.data.eval is not None else 'none'} |",
        f"| steps | {s.step} of {s.max_steps} ({s.stop_reason or s.status}) |",
        f"| gradient checkpointing | {_checkpointing(cfg.train)} |",
        f"| export | {'merged full model' if merged else 'full model' if full else 'adapter only'} |",
        "",
    ]
    scalars = {k: v for k, v in (run.metrics or {}).items() if isinstance(v, (int, float)) and not k.startswith("forgetting_")}
    if scalars:
        lines += ["## Final evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in scalars.items()]
        lines.append("")
    lines += _forgetting_section(run)
    from ..ui.objective import card_lines

    lines += card_lines(run.history)  # dpo/orpo/grpo: rewards, margins, accuracy
    from ..ui.answers import card_lines as answer_card_lines

    lines += answer_card_lines(run.history)  # eval.samples: the greedy answers at each evaluation
    last = next((r for r in reversed(run.history) if "loss" in r), None)
    if last:
        lines += [f"Final training loss: {last['loss']:.4f} at step {last['step']}.", ""]
    if run.cell:
        lines += ["## The cell that trained it", "", "```", run.cell.strip(), "```", ""]
    lines += ["## How to load", "", "```python", *_load_snippet(run, merged, folder), "```", ""]
    lines += list(extra)
    lines += ["## Versions", "", ", ".join(f"{n} {_version(n)}" for n in LIBRARIES), ""]
    return "\n".join(lines)


def _checkpointing(train) -> str:
    """``on (auto)``: what the run used, and whether the pre-flight chose it (`gradient_checkpointing: auto`)."""
    return ("on" if train.checkpointing else "off") + (" (auto)" if train.gradient_checkpointing == "auto" else "")


def _load_snippet(run, merged, folder):
    from ..models import AUTO_CLASSES

    cls = AUTO_CLASSES[run.config.task]
    if merged or getattr(run.method, "exports_full_model", False):
        return [f"from transformers import {cls}", f"model = {cls}.from_pretrained({folder!r})"]
    if not run.method.is_peft:
        return ["import peft_magic", f"run = peft_magic.load({folder!r})  # base model + this delta"]
    gguf = f", gguf_file={run.config.model.gguf_file!r}" if run.config.model.gguf_file else ""
    return [
        f"from transformers import {cls}",
        "from peft import PeftModel",
        f"base = {cls}.from_pretrained({run.config.model.name_or_path!r}{gguf})",
        f"model = PeftModel.from_pretrained(base, {folder!r})",
        "# or: import peft_magic; run = peft_magic.load(" + repr(folder) + ")",
    ]


def _forgetting_section(run) -> list:
    """What the run measured on general text (see `peft_magic.training.forgetting`), or nothing."""
    from ..training.forgetting import last, source_label

    row = last(run.history)
    if row is None:
        return []
    return [
        "## Forgetting (general text)",
        "",
        f"Loss on {source_label(run.config.data.forgetting)}, text unrelated to the task, measured on the base model and "
        "on the tuned one (mean over every predicted token; lower is better):",
        "",
        "| | base | tuned | change |",
        "|---|---|---|---|",
        f"| loss | {row['forgetting_base_loss']:.4f} | {row['forgetting_loss']:.4f} | {row['forgetting_loss_delta']:+.4f} |",
        f"| perplexity | {row['forgetting_base_ppl']:.4g} | {row['forgetting_ppl']:.4g} | ×{row['forgetting_ppl_ratio']:.4g} |",
        "",
    ]
