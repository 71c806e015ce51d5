"""The training loop does not read the device back in an ordinary step (issue 6: "no per-step host syncs").

On a GPU every `.item()`, `bool(tensor)` or `.tolist()` of a device tensor makes the host wait for the device and
stalls the queue of kernels. On CPU there is no queue to stall, but the same reads are visible: each one is an
`aten._local_scalar_dense` call, which a TorchDispatchMode sees. Each read is attributed to the innermost Python
frame outside torch: reads made by peft_magic's code are ours; the model's own (transformers checks its attention
mask once per forward) happen under Trainer too and are not counted.
"""

from __future__ import annotations

import collections
import os
import traceback

import pytest
import torch
from conftest import lm_rows
from torch.utils._python_dispatch import TorchDispatchMode

import peft_magic

PKG = os.path.dirname(peft_magic.__file__)
TORCH = os.path.dirname(torch.__file__)


class HostReads(TorchDispatchMode):
    """Counts device->host scalar reads made by peft_magic's code, per training step."""

    def __init__(self):
        super().__init__()
        self.step = 0
        self.ours = collections.Counter()  # step -> reads
        self.where: dict[int, list[str]] = collections.defaultdict(list)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            stack = traceback.extract_stack()[:-1]  # without this method's own frame
            frame = next(f for f in reversed(stack) if not f.filename.startswith(TORCH))
            if frame.filename.startswith(PKG):
                self.ours[self.step] += 1  # reads after step s's end (its logging) count for step s
                self.where[self.step].append(f"{os.path.basename(frame.filename)}:{frame.lineno}")
        return func(*args, **(kwargs or {}))


class Watch:
    """Enters the mode when the loop starts, leaves it when it ends; numbers the steps."""

    def __init__(self, mode):
        self.mode = mode

    def on_train_begin(self, state):
        self.mode.__enter__()

    def on_step_end(self, state):
        self.mode.step = state.step

    def on_train_end(self, state):
        self.mode.__exit__(None, None, None)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_no_host_read_in_a_step_without_logging(tiny_llama, workdir, accumulation):
    mode = HostReads()
    config = {"model": tiny_llama, "data": {"train": lm_rows(48)},
              "train": {"max_steps": 10, "logging_steps": 5, "eval_steps": 0, "learning_rate": 5e-3,
                        "per_device_train_batch_size": 4, "gradient_accumulation_steps": accumulation,
                        "output_dir": str(workdir / "out")}}  # fmt: skip
    run = peft_magic.train(config, display="none", callbacks=[Watch(mode)])
    assert run.history[0]["loss"] > run.history[-1]["loss"]  # it trained
    logged = {5, 10}
    quiet = {s: n for s, n in mode.ours.items() if s not in logged and 0 < s < 10}  # 10: the end (checkpoint)
    assert not quiet, {s: mode.where[s] for s in quiet}
    assert mode.ours[5] >= 1  # the reads happen at the logging step (the loss, the NaN flag): the counter works
