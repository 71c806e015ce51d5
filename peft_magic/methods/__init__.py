"""The PEFT method catalog: a name -> `Method` registry.

A `Method` knows three things: which parameters it accepts (`check_params`, at parse time), whether it fits the
rest of the config (`check_compatible`), and how to make a loaded base model trainable (`apply`). Methods backed
by peft live in `peft_methods.py` and never re-implement a peft layer; selective methods peft lacks live in
their own modules and register here too.
"""

from __future__ import annotations

from ..errors import ConfigError, did_you_mean

from .registry import METHODS, register  # noqa: F401 - `register` is part of this package's API

_LOADED = False
FAMILIES = {"A": "additive", "S": "selective", "R": "reparameterized", "F": "full fine-tuning"}


def get_method(name: str):
    _ensure_loaded()
    if name not in METHODS:
        raise ConfigError(
            f"unknown method '{name}'.{did_you_mean(name, METHODS)} Available: {', '.join(sorted(METHODS))}.",
            key="method.name",
        )
    return METHODS[name]


def available() -> dict:
    """{name: Method} for every registered method."""
    _ensure_loaded()
    return dict(METHODS)


def _ensure_loaded() -> None:
    global _LOADED
    # a flag, not `if METHODS`: importing one method module directly (e.g. `methods.selective` in a test) registers
    # its methods first, and the registry must still load the others
    if _LOADED:
        return
    _LOADED = True
    from . import peft_methods  # noqa: F401  (registers on import; imports no peft itself)

    try:  # selective methods are optional modules of their own
        from . import selective  # noqa: F401
        from . import sparse  # noqa: F401  (builds on selective.SelectiveMethod)
    except ImportError:
        pass
    from . import full  # noqa: F401  (the full fine-tuning baseline)


def method_label(method_cfg) -> str:
    """Short label for titles and tables: ``lora r=8 on all-linear``, ``bitfit``, ``sparse density=0.01``."""
    p = method_cfg.params
    bits = [method_cfg.name]
    for key in ("r", "density", "num_virtual_tokens", "last_n", "layers"):
        if key in p:
            bits.append(f"{key}={p[key]}")
    if "r" not in p and method_cfg.name in ("lora", "qlora", "dora", "rslora"):
        bits.append("r=8")
    target = p.get("target_modules")
    if target is None and method_cfg.name in ("lora", "qlora", "dora", "rslora"):
        target = "all-linear"
    if target:
        bits.append(f"on {target if isinstance(target, str) else ','.join(map(str, target))}")
    return " ".join(bits)
