"""Test-only: let Accelerate run its FSDP and DeepSpeed code on CPU processes (gloo), so those tests need no GPU.

Accelerate turns FSDP on only for GPU-like devices: with `cpu=True` (what peft_magic asks for on a machine without
a GPU) it silently gives plain data-parallel ranks (`AcceleratorState.__init__` lists the device types that get
FSDP; MULTI_CPU is not one). Torch's FSDP2 itself runs on CPU with gloo.
This file lifts that one gate: where Accelerate made MULTI_CPU ranks and was given an FSDP plugin, the state says
FSDP, exactly as Accelerate itself records it on GPUs (in both shared states). Everything after that, wrapping
with `fully_shard`, training, gathering, is the real Accelerate and torch code.

The FSDP tests put this folder first on PYTHONPATH of the processes they launch; Python imports `sitecustomize`
at start-up. It does nothing unless PEFT_MAGIC_TEST_FSDP_ON_CPU=1 (FSDP) or PEFT_MAGIC_TEST_DEEPSPEED_ON_CPU=1.

DeepSpeed: Accelerate takes DeepSpeed's branch only for processes it does not run on CPU (`cpu=False`), and on a
machine without a GPU it then finds no backend and gives each process a world of its own. With
PEFT_MAGIC_TEST_DEEPSPEED_ON_CPU=1 the processes ask for that branch and get gloo, so `deepspeed.init_distributed`
connects them; DeepSpeed itself runs on CPU with `DS_ACCELERATOR=cpu` (set by the tests). Everything after that,
`deepspeed.initialize`, ZeRO-2/3 partitioning, gathering, is the real Accelerate and DeepSpeed code.
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

if os.environ.get("PEFT_MAGIC_TEST_DEEPSPEED_ON_CPU") == "1":
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    _prepare_backend = PartialState._prepare_backend
    _partial_init = PartialState.__init__
    _accelerator_init = Accelerator.__init__

    def _gloo_for_deepspeed(self, cpu=False, sagemaker_dp=False, backend=None):
        found, kind = _prepare_backend(self, cpu=False, sagemaker_dp=sagemaker_dp, backend=backend)
        if found is None and int(os.environ.get("LOCAL_RANK", -1)) != -1:
            return "gloo", DistributedType.MULTI_CPU
        return found, kind

    def _partial_init_not_cpu(self, cpu=False, **kwargs):
        _partial_init(self, cpu=False, **kwargs)

    def _accelerator_init_not_cpu(self, *args, **kwargs):
        kwargs["cpu"] = False
        _accelerator_init(self, *args, **kwargs)

    PartialState._prepare_backend = _gloo_for_deepspeed
    PartialState.__init__ = _partial_init_not_cpu
    Accelerator.__init__ = _accelerator_init_not_cpu
