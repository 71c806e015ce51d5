"""Runs whose weights are sharded over the processes (FSDP, DeepSpeed ZeRO-3): what every rank must do so that
rank 0 can write a whole adapter and a whole optimizer state, and how a checkpoint goes back in.

With one process, DDP or ZeRO-1/2, every process holds the whole model, and rank 0 saves its own copy. With FSDP
and ZeRO-3 each process holds a slice of every weight, so the slices are gathered first. Gathering is a
collective: every rank calls the functions here at the same point, and rank 0 alone receives the result.

The gathering itself is torch's (`torch.distributed.checkpoint.state_dict`: only the trainable weights travel) for
FSDP, and Accelerate's `get_state_dict` for ZeRO-3. Accelerate only enables FSDP and DeepSpeed on GPUs (and the
like); see docs/scale-out.md for what was run here and how.
"""

from __future__ import annotations

import inspect

from ..errors import ConfigError

LABELS = {None: "a one-process or DDP", "fsdp": "an FSDP", "deepspeed": "a DeepSpeed"}
GATHERED = "_peft_magic_gathered"  # rank 0's copy of the weights gathered at the latest checkpoint, on the model


def kind(accelerator) -> str | None:
    """``"fsdp"`` or ``"deepspeed"`` (any ZeRO stage) for a run whose state is split over the processes, else None."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp"
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return "deepspeed"
    return None


def shards_weights(accelerator) -> bool:
    """Whether each process holds only a slice of the weights (FSDP, ZeRO-3), so saving them needs a gather."""
    if kind(accelerator) == "fsdp":
        return True
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return kind(accelerator) == "deepspeed" and plugin is not None and plugin.zero_stage == 3


def launched_sharded() -> bool:
    """Whether `accelerate launch` asked for FSDP or ZeRO-3 (read from its environment: usable before any
    `Accelerator` exists, e.g. while choosing how to load a 4-bit model)."""
    import os

    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return True
    return (os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
            and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3")  # fmt: skip


def quant_storage(dtype):
    """``bnb_4bit_quant_storage`` for a 4-bit base: the compute dtype under FSDP or ZeRO-3, which can only shard
    a model whose tensors share one dtype (the documented requirement); bitsandbytes' default (uint8) otherwise."""
    import torch

    return dtype if launched_sharded() and isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.uint8


def check(accelerator, method, model, resume=None) -> None:
    """Refuse, before training, what cannot be saved or resumed under this run's sharding.

    Args:
        accelerator: The run's Accelerator (not yet prepared the model).
        method: The run's method: its ``save`` must take the gathered ``state_dict`` when weights are sharded.
        model: The unwrapped model.
        resume: The checkpoint being resumed (`checkpoint.load`), or None.
    """
    how = kind(accelerator)
    if how is None and launched_sharded():
        import warnings

        warnings.warn("peft_magic: the launcher asked for FSDP or ZeRO-3, but Accelerate did not enable it (it does "
                      "so only on GPUs): every process holds the whole model, as with DDP.", stacklevel=2)  # fmt: skip
    if how == "deepspeed" and resume is not None:
        raise ConfigError("resuming under DeepSpeed is not supported: ZeRO splits the optimizer state over the "
                          "processes and peft_magic's checkpoints do not save it. Fix: train again from the start "
                          "(`method: {from: CHECKPOINT}` keeps the weights), or train with DDP or FSDP.",
                          key="--resume")  # fmt: skip
    if resume is not None and resume.get("sharded") != how:
        saved, now = (LABELS.get(x, x) for x in (resume.get("sharded"), how))
        raise ConfigError(f"checkpoint {resume['path']} was written by {saved} run, and this is {now} run; their "
                          "optimizer states differ in layout. Fix: resume with the accelerate config and process "
                          "count the run started with.", key="--resume")  # fmt: skip
    if not shards_weights(accelerator):
        return
    name = getattr(method, "name", "this method")
    if "state_dict" not in inspect.signature(method.save).parameters:
        raise ConfigError(f"'{name}' cannot save its weights from FSDP or ZeRO-3 shards yet. Fix: use a peft "
                          "method (lora, dora, ...), or train with DDP or ZeRO-1/2.", key="method.name")  # fmt: skip
    if name == "adalora":  # its rank allocator reads and masks whole matrices each step
        raise ConfigError("AdaLoRA re-allocates ranks over whole matrices, which FSDP and ZeRO-3 split over the "
                          "processes. Fix: train it with DDP or ZeRO-1/2, or use lora/dora.", key="method.name")  # fmt: skip
    configs = getattr(model, "peft_config", {}) or {}
    if any(getattr(c, "is_prompt_learning", False) for c in configs.values()):
        raise ConfigError(f"'{name}' computes its saved prompt with a forward pass, which FSDP and ZeRO-3 do not "
                          "allow on one rank. Fix: train it with DDP or ZeRO-1/2.", key="method.name")  # fmt: skip


def gather_weights(accelerator, model) -> dict | None:
    """The trainable weights, whole, for rank 0 to save; call it on every rank.

    Returns:
        None when each process holds the whole model (save the unwrapped model as usual). Otherwise a state dict
        keyed like the unwrapped model's own ``state_dict()``, on CPU, on rank 0; an empty dict on the other ranks.
    """
    if not shards_weights(accelerator):
        return None
    if kind(accelerator) == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # frozen base weights stay where they are: only the adapter is all-gathered (FSDP2; FSDP1 gathers all)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        return get_model_state_dict(model, options=options)
    try:
        full = accelerator.get_state_dict(model)  # ZeRO-3: DeepSpeed's consolidated 16-bit state dict on rank 0
    except ValueError as e:
        raise ConfigError(f"DeepSpeed cannot gather the weights ({e}). Fix: set `zero3_save_16bit_model: true` "
                          "under deepspeed_config in the accelerate config.", key="accelerate config") from None
    trainable = {n for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
    return {k: v for k, v in (full or {}).items() if k in trainable} if accelerator.is_main_process else {}


def gather_optimizer(accelerator, model, optimizer) -> dict | None:
    """The optimizer state to write as ``optimizer.pt``, on rank 0 (None elsewhere); call it on every rank.

    Under FSDP it is gathered whole and keyed by parameter name (torch's `get_optimizer_state_dict`). Under
    DeepSpeed it is None everywhere: ZeRO keeps it partitioned and peft_magic does not save it (see `check`).
    """
    how = kind(accelerator)
    if how == "deepspeed":
        return None
    if how == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(model, _inner(optimizer), options=options)
        return state if accelerator.is_main_process else None
    return optimizer.state_dict() if accelerator.is_main_process else None


def load_optimizer(accelerator, model, optimizer, state: dict) -> None:
    """Put a state written by `gather_optimizer` back into the prepared optimizer (every rank, same file)."""
    if kind(accelerator) == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        # each rank keeps the slice of the whole state that matches its own shards
        set_optimizer_state_dict(model, _inner(optimizer), state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


# ---------------------------------------------------------------- the model rank 0 keeps after training


def remember(model, weights: dict) -> None:
    """Keep rank 0's gathered weights on the (sharded) model, for an export after training (`gathered`)."""
    setattr(model, GATHERED, weights)  # a dict: a plain attribute, never a parameter or part of state_dict


def is_sharded_model(model) -> bool:
    """Whether `model` holds FSDP or ZeRO-3 slices of its weights (so one rank alone cannot read them)."""
    import torch.distributed

    if not torch.distributed.is_available():  # a torch build without distributed support shards nothing
        return False
    from torch.distributed.tensor import DTensor

    # FSDP2 parameters are DTensors; FSDP1 flags the ones it manages; ZeRO-3 gives each partitioned one an id
    return any(isinstance(p, DTensor) or getattr(p, "_fsdp_flattened", False) or hasattr(p, "ds_id")
               for p in model.parameters())  # fmt: skip


def gathered(model) -> dict | None:
    """The whole trainable weights of a sharded `model`, as gathered at its latest checkpoint; None for a model
    that holds its weights whole.

    Raises:
        TrainingFailed: `model` is sharded and no checkpoint gathered its weights on this rank.
    """
    if not is_sharded_model(model):
        return None
    kept = getattr(model, GATHERED, None)
    if kept is None:  # e.g. on another rank than 0, or a sharded model that never reached a checkpoint
        from ..errors import TrainingFailed

        raise TrainingFailed("this model is sharded over several processes (FSDP or ZeRO-3) and no checkpoint "
                             "gathered its weights on this process. Fix: export from rank 0 after training (its "
                             "final checkpoint holds the whole adapter), or load that checkpoint's folder with "
                             "peft_magic.load.")  # fmt: skip
    return kept
