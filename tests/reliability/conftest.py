"""Fixtures for the fault tests: a real IPython shell with the magics loaded, and a counter of optimizer steps."""

from __future__ import annotations

import os


def lora_config(model, out, max_steps=6, **train) -> dict:
    """A short LoRA run on 16 rows of the tiny model, logging every step; `train` overrides train keys."""
    from conftest import lm_rows

    settings = {"max_steps": max_steps, "learning_rate": 5e-3, "per_device_train_batch_size": 4, "logging_steps": 1,
                "eval_steps": 0}  # fmt: skip
    return {
        "model": model,
        "method": {"name": "lora", "r": 4},
        "data": {"train": lm_rows(16)},
        "train": {**settings, "output_dir": str(out), **train},
    }


class StopAt:
    """Calls `action(state)` once, at the end of optimizer step `step`."""

    def __init__(self, step, action):
        self.step, self.action, self.fired = step, action, False

    def on_step_end(self, state):
        if state.step == self.step and not self.fired:
            self.fired = True
            self.action(state)


def lora_weights(model) -> dict:
    """The adapter's tensors, keyed as peft saves them (without the adapter name)."""
    return {k.replace(".default", ""): v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def saved_adapter(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def losses(run) -> list:
    return [(r["step"], r["loss"]) for r in run.history if "loss" in r]
