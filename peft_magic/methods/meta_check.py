"""Mistakes only a model reveals, found without its weights: before a re-run frees the previous run's model."""

from __future__ import annotations

from ..errors import ConfigError


def check_on_meta(cfg, labels=None) -> None:
    """Build the architecture on the meta device (no weights, no memory) and apply the method to it, so that the
    mistakes only a model reveals (a task the architecture cannot do, target modules it does not have) raise their
    `ConfigError` *before* a re-run frees the previous run's model. Anything else is left for the real load."""
    from .. import models
    from . import get_method

    try:
        empty = models.build_empty(cfg.model, cfg.task, labels)
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            raise ConfigError(f"this model cannot be loaded for task '{cfg.task}' ({str(e).splitlines()[0]}). "
                              "Fix: pick a task the architecture supports.", key="task") from None  # fmt: skip
        return
    except Exception:  # noqa: BLE001 - not knowable without weights: the real load will say
        return
    quant = cfg.model.quantization
    cfg.model.quantization = "none"  # k-bit preparation needs real weights; the module names are the same
    try:
        with models.quiet_loading():
            get_method(cfg.method.name).apply(empty, cfg, calibration=None)
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - some methods need real weights to choose what trains
        return
    finally:
        cfg.model.quantization = quant
