"""Test-only: let Accelerate run its FSDP code on CPU processes (gloo), so the FSDP tests need no GPU.

Accelerate turns FSDP on only for GPU-like devices: with `cpu=True` (what peft_magic asks for on a machine without
a GPU) it silently gives plain data-parallel ranks (`AcceleratorState.__init__` lists the device types that get
FSDP; MULTI_CPU is not one). Torch's FSDP2 itself runs on CPU with gloo.
This file lifts that one gate: where Accelerate made MULTI_CPU ranks and was given an FSDP plugin, the state says
FSDP, exactly as Accelerate itself records it on GPUs (in both shared states). Everything after that, wrapping
with `fully_shard`, training, gathering, is the real Accelerate and torch code.

The FSDP tests put this folder first on PYTHONPATH of the processes they launch; Python imports `sitecustomize`
at start-up. It does nothing unless PEFT_MAGIC_TEST_FSDP_ON_CPU=1.
"""

import os

if os.environ.get("PEFT_MAGIC_TEST_FSDP_ON_CPU") == "1":
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    _init = AcceleratorState.__init__

    def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = _init_with_fsdp_on_cpu
