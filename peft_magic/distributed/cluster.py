"""A notebook run as a cluster job: ``%peft_export NAME --script DIR`` writes the run's config, its in-memory data
as JSONL and a ``launch.sh`` with the exact ``accelerate launch`` command (plus an accelerate config with FSDP and
DeepSpeed as commented alternatives)."""

from __future__ import annotations

import os


def export_script(run, out_dir, namespace=None, num_processes=None, overwrite=False) -> str:
    """Write what a cluster needs to train `run` again with ``accelerate launch``.

    Files: ``config.yaml`` (the run's resolved config; data given as notebook variables is saved beside it as
    ``train.jsonl``/``eval.jsonl``, local paths are made absolute), ``launch.sh`` (the exact command, run from its
    own folder) and ``accelerate_config.yaml`` (one machine, every GPU, DDP; multi-node, FSDP and DeepSpeed as
    commented alternatives).

    Args:
        run: The run whose config to export (it need not have finished).
        out_dir: Folder to write.
        namespace: Where ``$name`` data references are looked up (the notebook's variables).
        num_processes: Processes for launch.sh (default: the run's `train.num_processes` when above 1, else every
            GPU of the machine the script runs on).
        overwrite: Write into a folder that already holds files.

    Returns:
        The folder's absolute path.
    """
    import yaml

    from ..export.folder import check_target

    path = check_target(out_dir, overwrite)
    os.makedirs(path, exist_ok=True)
    cfg = run.config
    raw = cfg.to_dict()
    for split in ("train", "eval"):
        raw["data"][split] = _portable_source(getattr(cfg.data, split), namespace, path, split)
    model = os.path.expanduser(cfg.model.name_or_path)
    if os.path.exists(model):
        raw["model"]["name_or_path"] = os.path.abspath(model)
    raw["train"]["output_dir"] = f"peft_runs/{run.name}"  # beside launch.sh, which runs from its own folder
    raw["train"]["num_processes"] = 1  # under `accelerate launch` the launcher decides
    n = num_processes or (cfg.train.num_processes if cfg.train.num_processes > 1 else None)
    header = f"# peft_magic config of run '{run.name}', for launch.sh (`peft-magic train config.yaml`).\n"
    _write(path, "config.yaml", header + yaml.safe_dump(raw, sort_keys=False, default_flow_style=False))
    template = ACCELERATE_CONFIG.format(layer=_decoder_layer(cfg), accum=cfg.train.gradient_accumulation_steps,
                                        clip=cfg.train.max_grad_norm)  # fmt: skip
    _write(path, "accelerate_config.yaml", template)
    every_gpu = "$(nvidia-smi -L 2>/dev/null | wc -l)"
    _write(path, "launch.sh", LAUNCH_SH.format(name=run.name, n=n or every_gpu), mode=0o755)
    return path


def _portable_source(src, namespace, folder, split):
    """A data source that works on another machine: notebook objects become JSONL files beside the config."""
    if src is None or isinstance(src, float):
        return src
    if isinstance(src, str) and not src.strip().startswith("$"):
        local = os.path.expanduser(src)
        return os.path.abspath(local) if os.path.exists(local) else src  # a hub dataset id stays as it is
    from ..data.prepare import resolve
    from ..models import quiet_loading

    ds = resolve(src, namespace, f"data.{split}", "train" if split == "train" else "validation")
    with quiet_loading():
        ds.to_json(os.path.join(folder, f"{split}.jsonl"), lines=True, force_ascii=False)
    return f"{split}.jsonl"


def _decoder_layer(cfg) -> str:
    """The block class FSDP wraps (``LlamaDecoderLayer``...), from the architecture's own `_no_split_modules`."""
    try:
        import transformers

        from ..models import load_config

        arch = (load_config(cfg.model).architectures or [""])[0]
        layers = getattr(getattr(transformers, arch, None), "_no_split_modules", None) or []
        return ",".join(layers) or "<decoder layer class of your model>"
    except Exception:  # noqa: BLE001 - a hint in a commented template is not worth failing the export for
        return "<decoder layer class of your model>"


def _write(folder, name, text, mode=None):
    file = os.path.join(folder, name)
    with open(file, "w", encoding="utf-8") as fh:
        fh.write(text)
    if mode is not None:
        os.chmod(file, mode)


LAUNCH_SH = """#!/usr/bin/env bash
# Train run '{name}' again, on every GPU of this machine, with the config its notebook used.
#   bash launch.sh                                # or: NUM_PROCESSES=4 bash launch.sh
#   bash launch.sh --set train.max_steps=2000     # extra arguments go to `peft-magic train`
#   bash launch.sh --resume                       # continue from the latest checkpoint (same NUM_PROCESSES)
# Needs peft_magic installed (pip install peft-magic). The adapter lands in ./adapter, checkpoints in
# ./peft_runs/{name}. Mixed precision comes from train.mixed_precision in config.yaml.
set -euo pipefail
cd "$(dirname "$0")"
NUM_PROCESSES="${{NUM_PROCESSES:-{n}}}"
[ "$NUM_PROCESSES" -ge 1 ] 2>/dev/null || NUM_PROCESSES=1

accelerate launch --config_file accelerate_config.yaml --num_processes "$NUM_PROCESSES" \\
    -m peft_magic train config.yaml --name {name} --export adapter --overwrite "$@"

# Several machines: run this on each, with MACHINE_RANK 0..NUM_MACHINES-1, MAIN_IP the address of machine 0 and
# NUM_PROCESSES the number of GPUs over all machines (under SLURM: MACHINE_RANK=$SLURM_NODEID, one task per node):
#   accelerate launch --config_file accelerate_config.yaml --num_machines "$NUM_MACHINES" \\
#       --machine_rank "$MACHINE_RANK" --main_process_ip "$MAIN_IP" --main_process_port 29500 \\
#       --num_processes "$NUM_PROCESSES" -m peft_magic train config.yaml --name {name} --export adapter --overwrite
# FSDP or DeepSpeed: switch the block in accelerate_config.yaml (docs/scale-out.md says what each supports).
"""

ACCELERATE_CONFIG = """# accelerate config for launch.sh: one machine, every GPU, DDP (each GPU holds the whole base model).
# The process count comes from launch.sh; mixed precision from train.mixed_precision in config.yaml.
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: 1
machine_rank: 0
gpu_ids: all
mixed_precision: 'no'
rdzv_backend: static
same_network: true
main_training_function: main
use_cpu: false

# To use one of the alternatives below, replace the `distributed_type: MULTI_GPU` line with its block, uncommented.
# What each one supports, and what was tested: docs/scale-out.md.
#
# --- FSDP2: every weight sharded over the GPUs, for a base that does not fit on one (LoRA-family methods). Each
# checkpoint gathers the adapter and optimizer state for rank 0; resume with the same number of processes.
# distributed_type: FSDP
# fsdp_config:
#   fsdp_version: 2
#   fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
#   fsdp_transformer_layer_cls_to_wrap: {layer}
#   fsdp_state_dict_type: FULL_STATE_DICT
#   fsdp_cpu_ram_efficient_loading: true
#   fsdp_reshard_after_forward: true
#   fsdp_offload_params: false
#
# --- DeepSpeed ZeRO-2: optimizer state and gradients sharded (needs `pip install deepspeed`). zero_stage: 3 shards
# the weights too (checkpoints gather the adapter, which needs zero3_save_16bit_model). Not resumable.
# distributed_type: DEEPSPEED
# deepspeed_config:
#   zero_stage: 2
#   gradient_accumulation_steps: {accum}
#   gradient_clipping: {clip}
#   offload_optimizer_device: none
#   offload_param_device: none
#   zero3_init_flag: false
#   zero3_save_16bit_model: true
"""
