"""L2-SP: pull the trained weights back toward their pretrained values (Li et al., 2018, "Explicit inductive bias
for transfer learning with convolutional networks").

With ``l2sp: {alpha: 0.01}`` (or ``l2sp: 0.01``) a selective method adds ``alpha * sum ||theta - theta_0||^2`` to the
loss, summed over the entries the method trains; ``theta_0`` is a snapshot taken when the method is applied. Only
pretrained entries count: a freshly initialised task head has no pretrained value to be pulled toward (its random
init is not a prior), so it is left to ``train.weight_decay`` as in the paper.
"""

from __future__ import annotations

import math

from ..errors import ConfigError, did_you_mean

L2SP_KEYS = ("alpha",)


def parse_l2sp(value) -> float | None:
    """``l2sp: 0.01`` or ``l2sp: {alpha: 0.01}`` -> 0.01; None/0/absent -> None (no regularization).

    Raises:
        ConfigError: keyed ``method.l2sp`` (or ``method.l2sp.<key>``) for a wrong type, sign or key.
    """
    if value is None or value is False:
        return None
    if isinstance(value, dict):
        for key in value:
            if key not in L2SP_KEYS:
                raise ConfigError(f"unknown key.{did_you_mean(key, L2SP_KEYS)} Valid keys: alpha, e.g. "
                                  "`l2sp: {alpha: 0.01}`.", key=f"method.l2sp.{key}")  # fmt: skip
        if "alpha" not in value:
            raise ConfigError("needs `alpha`, e.g. `l2sp: {alpha: 0.01}`.", key="method.l2sp")
        return _alpha(value["alpha"], "method.l2sp.alpha")
    return _alpha(value, "method.l2sp")


def _alpha(value, key) -> float | None:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or math.isnan(value):
        raise ConfigError(f"must be a number >= 0 (the strength alpha), got {value!r}. Fix: e.g. `l2sp: 0.01`.",
                          key=key)  # fmt: skip
    return float(value) or None


def snapshot(param, indices=None):
    """theta_0 for one parameter: a detached copy of the whole tensor, or of the entries at flat `indices`."""
    data = param.detach()
    return (data.reshape(-1)[indices] if indices is not None else data).clone()


def l2sp_penalty(params: dict, theta0: dict, indices: dict, alpha: float):
    """``alpha * sum ||theta - theta_0||^2`` over `theta0`'s entries.

    Args:
        params: ``{name: Parameter}`` of the model being trained.
        theta0: ``{name: snapshot}`` from `snapshot` (moved to the parameter's device on first use, in place).
        indices: ``{name: flat int64 indices}`` for the sparse parts; dense parts are absent.
        alpha: The strength.

    Returns:
        A scalar tensor on the device of the parameters, differentiable with respect to them.
    """
    total = None
    for name, ref in theta0.items():
        param = params[name]
        if ref.device != param.device:  # the engine moves the model after `apply`: follow it once
            ref = theta0[name] = ref.to(param.device)
        idx = indices.get(name)
        if idx is not None:
            if idx.device != param.device:
                idx = indices[name] = idx.to(param.device)
            current = param.reshape(-1)[idx]
        else:
            current = param
        term = (current.float() - ref.float()).pow(2).sum()
        total = term if total is None else total + term
    return None if total is None else alpha * total
