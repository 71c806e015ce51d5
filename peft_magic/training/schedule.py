"""How many optimizer steps a run takes, on how many processes (each process takes its own batches, so N
processes finish an epoch in 1/N of the steps). How many processes a config asks for: `config.parse.requested_processes`."""

from __future__ import annotations

import math


def plan_steps(cfg, n_train: int, num_processes: int = 1) -> tuple[int, int]:
    """(max_steps, steps_per_epoch) for `n_train` examples."""
    t = cfg.train
    batches = math.ceil(n_train / (t.per_device_train_batch_size * num_processes))
    # ceil: accelerate also steps on an epoch's last, shorter accumulation (so resume finds the right epoch)
    per_epoch = max(math.ceil(batches / t.gradient_accumulation_steps), 1)
    if t.max_steps > 0:
        return t.max_steps, per_epoch
    return max(math.ceil(t.num_train_epochs * per_epoch), 1), per_epoch
