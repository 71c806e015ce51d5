"""Defaults for peft methods that depend on the model or the run, so every method works out of the box.

peft's own defaults assume a real model and a training script that knows the method: AdaLoRA needs the run's
length and a call after every optimizer step, BOFT needs a block size that divides every targeted layer,
LN-tuning knows the norm names of a few architectures only, and LLaMA-Adapter a handful of model types. Each
helper below fills in a value only where the user gave none, and refuses clearly where nothing would work.
"""

from __future__ import annotations

import contextlib
import math
import re

from ..errors import ConfigError

# Placeholder run length for AdaLoRA when the number of steps is unknown (a dry run counting parameters only:
# the schedule does not change the parameter count).
DRY_RUN_STEPS = 1000
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")


def adapt_params(name: str, merged: dict, user: dict, cfg, model=None, calibration=None) -> dict:
    """Return `merged` (our defaults + the user's parameters) with model- and run-dependent defaults added.

    Args:
        name: Our method name (``adalora``, ``boft``...).
        merged: Parameters about to be given to the peft config class.
        user: The parameters the user wrote (never overridden).
        cfg: The run's `Config`.
        model: The base model (None when only the config is built).
        calibration: Callable returning the training DataLoader (to count steps), or None.
    """
    if name == "adalora" and "total_step" not in user:
        merged["total_step"] = total_steps(cfg, calibration)
    if model is None:
        return merged
    if cfg.task == "token-cls" and merged.get("target_modules") == "all-linear":
        # peft's all-linear leaves out the head of seq-cls models only; a token-cls head would be both adapted
        # and fully trained (modules_to_save), which peft refuses. Name the body's linear layers instead.
        merged["target_modules"] = sorted({n.rsplit(".", 1)[-1] for n in targeted_linears(model, "all-linear")})
    if name == "boft" and "boft_block_size" not in user and "boft_block_num" not in user:
        merged["boft_block_size"] = boft_block_size(model, merged.get("target_modules"), merged.get("boft_block_size", 4))
    if name == "ln-tuning" and "target_modules" not in user:
        merged.setdefault("target_modules", norm_module_names(model))
    if name == "llama-adapter":
        check_adaption_prompt(model)
        if "adapter_layers" not in user:
            # LLaMA-Adapter puts prompts in the top layers (30 of 32 in the paper): all layers of a small model.
            merged["adapter_layers"] = min(int(getattr(model.config, "num_hidden_layers", 1)), 30)
    return merged


def total_steps(cfg, calibration=None) -> int:
    """The run's optimizer steps: ``train.max_steps``, or epochs x steps per epoch of the training data, as the
    engine plans them (with N processes each takes its own batches: an epoch is 1/N of the steps)."""
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    if calibration is None:
        return DRY_RUN_STEPS
    from ..distributed.ranks import world_size
    from ..training.schedule import plan_steps

    return plan_steps(cfg, len(calibration().dataset), world_size())[0]


def targeted_linears(model, target_modules) -> dict:
    """{name: in_features} of the nn.Linear layers that `target_modules` selects (peft's matching rules:
    ``all-linear`` = every linear but the output head; a list = names or name suffixes; a string = a regex)."""
    import torch.nn as nn

    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        last = name.rsplit(".", 1)[-1]
        if target_modules in (None, "all-linear"):
            hit = module is not out_emb and last not in HEAD_NAMES
        elif isinstance(target_modules, str):
            hit = re.fullmatch(target_modules, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in target_modules)
        if hit:
            found[name] = module.in_features
    return found


def boft_block_size(model, target_modules, preferred: int = 4) -> int:
    """The largest even block size <= `preferred` that divides the input size of every targeted layer."""
    dims = sorted(set(targeted_linears(model, target_modules).values()))
    if not dims:
        return preferred
    common = math.gcd(*dims)
    for size in range(preferred - preferred % 2, 1, -2):
        if common % size == 0:
            return size
    raise ConfigError(
        f"boft needs an even block size that divides the input size of every targeted layer, and these sizes "
        f"({', '.join(map(str, dims))}) share none. Fix: set `target_modules` to layers of even width, set "
        "`boft_block_num`, or use `oft` (which adapts its block size per layer).",
        key="method.boft_block_size",
    )


def norm_module_names(model) -> list | None:
    """Names (last component) of the model's normalisation layers, when peft knows none for its type."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING as KNOWN

    if getattr(model.config, "model_type", None) in KNOWN:
        return None  # peft's own choice for this architecture
    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and type(m).__name__.endswith("Norm")})
    if not names:
        raise ConfigError(f"ln-tuning found no normalisation layer in {type(model).__name__}. Fix: give "
                          "`target_modules` (the norm layers' names), or pick another method.", key="method.target_modules")  # fmt: skip
    return names


def check_adaption_prompt(model) -> None:
    from peft.tuners.adaption_prompt.config import TRANSFORMERS_MODEL_CONFIG

    model_type = getattr(model.config, "model_type", "?")
    if model_type not in TRANSFORMERS_MODEL_CONFIG:
        raise ConfigError(
            f"llama-adapter (peft's adaption prompt) works only on {', '.join(sorted(TRANSFORMERS_MODEL_CONFIG))} "
            f"models; this one is '{model_type}'. Fix: use prompt-tuning, p-tuning or lora for this model.",
            key="method.name",
        )


def follow_adalora_schedule(model) -> None:
    """Make AdaLoRA re-allocate its rank budget as training goes.

    peft's AdaLoRA must be told after every optimizer step, while the gradients still exist
    (``model.base_model.update_and_allocate(step)`` between ``optimizer.step()`` and ``zero_grad()``). The
    training loop knows nothing of AdaLoRA, so a global post-step hook makes that call for whichever optimizer
    holds this model's parameters. The hook keeps only weak references; hooks of models that are gone are
    removed at the next registration (never from inside a hook: torch is iterating over them then).
    """
    import weakref

    from torch.optim.optimizer import register_optimizer_step_post_hook

    for handle, ref in list(_ADALORA_HOOKS):
        if ref() is None:
            handle.remove()
            _ADALORA_HOOKS.remove((handle, ref))
    probe = next(p for n, p in model.named_parameters() if "lora_E" in n and p.requires_grad)
    model_ref, probe_ref = weakref.ref(model), weakref.ref(probe)
    counter = {"step": 0}

    def after_step(optimizer, args, kwargs):
        model_, probe_ = model_ref(), probe_ref()
        if model_ is None or probe_ is None:
            return
        if not any(p is probe_ for group in optimizer.param_groups for p in group["params"]):
            return  # another model's optimizer
        model_.base_model.update_and_allocate(counter["step"])
        counter["step"] += 1

    _ADALORA_HOOKS.append((register_optimizer_step_post_hook(after_step), model_ref))
    model._peft_magic_adalora = counter  # the step count, readable by tests and for debugging


_ADALORA_HOOKS: list = []  # (hook handle, weak reference to its model)


def fix_loaded(model):
    """peft sets AdaLoRA's `trainable_adapter_name` only for trainable adapters, yet its forward reads it
    whenever labels are given, so a reloaded AdaLoRA adapter fails on any batch with labels (peft issue
    #571, back again). Name the active adapter so evaluation works."""
    base = getattr(model, "base_model", None)
    if type(base).__name__ == "AdaLoraModel" and "trainable_adapter_name" not in vars(base):
        base.trainable_adapter_name = model.active_adapter
    return model


@contextlib.contextmanager
def evaluation_loss(model):
    """AdaLoRA adds its orthogonality regulariser to `outputs.loss` in eval mode too; evaluation reports the
    task loss (and perplexity) alone, so switch the regulariser off for the duration."""
    configs = [c for c in (getattr(model, "peft_config", None) or {}).values() if getattr(c, "orth_reg_weight", 0)]
    saved = [c.orth_reg_weight for c in configs]
    for c in configs:
        c.orth_reg_weight = 0.0
    try:
        yield model
    finally:
        for c, w in zip(configs, saved):
            c.orth_reg_weight = w


def adalora_state(model) -> dict | None:
    """What AdaLoRA's schedule knows besides the weights, for a checkpoint: the step count, the rank allocator's
    importance averages and the current rank pattern (None for a model not following the schedule)."""
    counter = getattr(model, "_peft_magic_adalora", None)
    if counter is None:
        return None
    base = model.base_model
    alloc = base.rankallocator
    # peft saves AdaLoRA's adapter cut down to the ranks kept so far, the standard format for loading it; the
    # training state needs the full matrices (pruned ranks still train through the orthogonality term)
    weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if "lora_" in k}
    return {"step": counter["step"], "ipt": alloc.ipt, "exp_avg_ipt": alloc.exp_avg_ipt,
            "exp_avg_unc": alloc.exp_avg_unc, "weights": weights,
            "rank_pattern": base.peft_config[base.trainable_adapter_name].rank_pattern}  # fmt: skip


def load_adalora_state(model, state: dict) -> None:
    """Put `adalora_state` back, so a resumed run re-allocates ranks exactly as an uninterrupted one."""
    counter = getattr(model, "_peft_magic_adalora", None)
    if counter is None or not state:
        return
    device = next(model.parameters()).device
    base = model.base_model
    alloc = base.rankallocator
    counter["step"] = state["step"]
    for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        setattr(alloc, key, {name: t.to(device) for name, t in state[key].items()})
    base.peft_config[base.trainable_adapter_name].rank_pattern = state["rank_pattern"]
