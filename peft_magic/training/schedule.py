"""How many steps a run takes, and on how many processes (the two belong together: each process takes its own
batches, so N processes finish an epoch in 1/N of the steps)."""

from __future__ import annotations

import math

from ..errors import ConfigError


def plan_steps(cfg, n_train: int, num_processes: int = 1) -> tuple[int, int]:
    """(max_steps, steps_per_epoch) for `n_train` examples."""
    t = cfg.train
    batches = math.ceil(n_train / (t.per_device_train_batch_size * num_processes))
    # ceil: accelerate also steps on an epoch's last, shorter accumulation (so resume finds the right epoch)
    per_epoch = max(math.ceil(batches / t.gradient_accumulation_steps), 1)
    if t.max_steps > 0:
        return t.max_steps, per_epoch
    return max(math.ceil(t.num_train_epochs * per_epoch), 1), per_epoch


def requested_processes(config=None, overrides=(), defaults=None) -> int:
    """`train.num_processes` of a config (without validating the rest: that would import peft); 1 under a launcher.

    Args:
        config: What `train()` accepts (dict, YAML text or path, `Config`).
        overrides: ``--set`` style overrides.
        defaults: Config defaults (e.g. from `%peft_model`).
    """
    from ..config.coerce import coerce
    from ..config.parse import raw_config
    from ..distributed.ranks import launched

    if launched():
        return 1

    section = raw_config(config, overrides, defaults).get("train")
    value = section.get("num_processes", 1) if isinstance(section, dict) else 1
    n = coerce(value, int, "train.num_processes")
    if n < 1:
        raise ConfigError(f"must be 1 or more, got {n}.", key="train.num_processes")
    return n
