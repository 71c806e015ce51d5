"""peft_magic: parameter-efficient fine-tuning from a notebook cell.

    %load_ext peft_magic          # in Jupyter / Colab / Kaggle / VS Code
    run = peft_magic.train(cfg)   # from Python

Importing this package is cheap: torch, transformers, peft and friends load on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["train", "dry_run", "load", "compare", "parse_config", "Config", "Run", "demo_models",
           "load_ipython_extension"]

_LAZY = {
    "train": ("api", "train"),
    "load": ("api", "load"),
    "dry_run": ("dryrun", "dry_run"),
    "compare": ("comparison.run", "compare"),
    "parse_config": ("config.parse", "parse_config"),
    "Config": ("config.schema", "Config"),
    "Run": ("run", "Run"),
    "ConfigError": ("errors", "ConfigError"),
    "demo_models": ("demo_data", "demo_models"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'peft_magic' has no attribute {name!r}")


def load_ipython_extension(ipython):
    """`%load_ext peft_magic`: register the magics (imports IPython only, nothing heavy)."""
    from .magics import load_ipython_extension as _load

    _load(ipython)
