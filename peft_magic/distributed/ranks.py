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

    with _state().main_process_first():
        yield


def from_main_process(value):
    """Rank 0's `value` on every process of a launched run (`value` itself with one process): for a decision
    each process makes from readings that differ a little between them (free memory), so that all take one."""
    if world_size() <= 1:
        return value
    from accelerate.utils import broadcast_object_list

    _state()  # the process group `main_process_first` set up (idempotent)
    return broadcast_object_list([value], from_process=0)[0]


def _state():
    from accelerate import PartialState

    state = PartialState(cpu=needs_cpu())
    end_process_group_at_exit()
    return state


_registered = False


def end_process_group_at_exit() -> None:
    """Destroy the process group when Python exits, while the interpreter is still whole. Left to interpreter
    teardown, gloo's worker threads can still hold a finished collective's tensors; freeing them then needs the
    GIL of an interpreter being torn down, and the process aborts (SIGABRT, "terminate called without an active
    exception") after the run, its error message or its checkpoint are all written. Idempotent; a no-op if the
    user (or Accelerate's `end_training`) destroyed the group already."""
    global _registered
    if _registered:
        return
    import atexit

    atexit.register(_destroy_process_group)
    _registered = True


def _destroy_process_group() -> None:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - at exit: never turn a clean finish into a traceback
        pass
