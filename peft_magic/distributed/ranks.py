"""Where this process stands in a run: launched or not, its rank, and rank-0-first blocks.

Under a launcher (``accelerate launch -m peft_magic train CONFIG.yaml``, torchrun, a cluster scheduler, or the
notebook launcher's workers) N copies of the ordinary `train()` run; `Accelerator()` reads the launch environment
(DDP, multi-node, FSDP, DeepSpeed). These helpers read the same environment, so that rank 0 alone prints and
writes. They import nothing heavy: the engine and the CLI use them at import time.
"""

from __future__ import annotations

import contextlib
import os

# torchrun, accelerate launch (multi-process), deepspeed and notebook_launcher's workers set LOCAL_RANK/RANK;
# a single-process `accelerate launch` sets only its ACCELERATE_* variables.
_LAUNCH_ENV = ("LOCAL_RANK", "RANK", "ACCELERATE_DYNAMO_BACKEND")


def launched() -> bool:
    """Whether a launcher started this process (then it, not `train.num_processes`, decides the process count)."""
    return any(k in os.environ for k in _LAUNCH_ENV)


def process_index() -> int:
    """Global rank of this process (0 when not launched)."""
    return int(os.environ.get("RANK") or 0)


def is_main_process() -> bool:
    return process_index() == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE") or 1)


def needs_cpu() -> bool:
    """Several processes and no GPU: ask Accelerate for gloo ranks on CPU. Without it, a GPU-less launch gives N
    unconnected copies that each train alone and overwrite each other's checkpoints."""
    if world_size() <= 1:
        return False
    import torch

    return not torch.cuda.is_available()


@contextlib.contextmanager
def main_process_first():
    """Rank 0 runs the block first, then the others (they read what it cached: downloads, tokenized data)."""
    if world_size() <= 1:
        yield
        return
    from accelerate import PartialState

    with PartialState(cpu=needs_cpu()).main_process_first():
        yield


def from_main_process(value):
    """Rank 0's `value` on every process of a launched run (`value` itself with one process): for a decision
    each process makes from readings that differ a little between them (free memory), so that all take one."""
    if world_size() <= 1:
        return value
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    PartialState(cpu=needs_cpu())  # the process group `main_process_first` set up (idempotent)
    return broadcast_object_list([value], from_process=0)[0]
