"""``sparse``: sparse fine-tuning: train a fixed fraction of the base model's entries, chosen once before training.

Parameters: ``density`` (fraction of each pretrained tensor's entries that train, default 0.01), ``criterion``
(how they are chosen, default ``grad``), ``calibration_batches`` (default 4), ``l2sp``.

Criteria, all computed per tensor (each tensor trains ``round(density * numel)`` entries):

* ``grad``: largest ``sum |dL/dw|`` over ``calibration_batches`` batches from the calibration data;
* ``fisher``: largest ``sum (dL/dw)^2`` (the diagonal empirical Fisher information) over the same batches;
* ``magnitude``: largest ``|w|`` of the pretrained weights (no data needed);
* ``random``: a uniform draw seeded by ``train.seed`` (no data needed).

``grad`` and ``fisher`` need calibration batches; when none are given they fall back to ``magnitude`` with a
warning, and the criterion actually used is saved in ``peft_magic_adapter.json`` (``extra.criterion_used``).
Calibration runs in eval mode (no dropout) and keeps one score tensor per parameter (float32), freeing each
gradient as soon as it is accumulated.

Training: the chosen tensors have ``requires_grad`` and a tensor hook that zeroes the gradient outside the chosen
entries. Adam(W) then keeps zero moments there and moves nothing, so those entries stay bit-identical. AdamW's
*decoupled* weight decay, however, shrinks every entry of a tensor it is given, gradient or not, so ``sparse``
refuses ``train.weight_decay > 0``; use ``l2sp`` (which acts through the gradient, hence only on chosen entries)
to regularize. The fresh task head of seq-cls / token-cls trains whole, as with the other selective methods.

Export: only the chosen entries, as ``<name>.indices`` + ``<name>.values`` (see `delta.py`).
"""

from __future__ import annotations

import warnings
from typing import ClassVar

from ..errors import ConfigError, did_you_mean
from .registry import register
from .selective import FROM_HELP, L2SP_HELP, SelectiveMethod, fresh_head_names

CRITERIA = ("grad", "fisher", "magnitude", "random")
NEEDS_DATA = ("grad", "fisher")


class SparseMethod(SelectiveMethod):
    params_help: ClassVar[dict] = {
        "density": "Fraction of each pretrained tensor's entries that train, in (0, 1]; default 0.01.",
        "criterion": "How entries are chosen: grad (|gradient|), fisher (gradient^2), magnitude (|w|) or random.",
        "calibration_batches": "Batches of training data used by grad / fisher; default 4.",
        "l2sp": L2SP_HELP,
        "from": FROM_HELP,
    }

    def _check(self, params):
        density = params.get("density", 0.01)
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ConfigError(f"must be a fraction in (0, 1], e.g. 0.01, got {density!r}.", key="method.density")
        criterion = params.get("criterion", "grad")
        if criterion not in CRITERIA:
            raise ConfigError(f"'{criterion}' is not one of {', '.join(CRITERIA)}.{did_you_mean(criterion, CRITERIA)}",
                              key="method.criterion")  # fmt: skip
        n = params.get("calibration_batches", 4)
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ConfigError(f"must be a positive whole number, got {n!r}.", key="method.calibration_batches")

    def check_compatible(self, cfg):
        super().check_compatible(cfg)
        if cfg.train.weight_decay > 0:
            raise ConfigError(
                f"sparse keeps every entry outside its mask bit-identical, but AdamW's weight decay "
                f"({cfg.train.weight_decay}) would shrink all of them. Fix: set `train.weight_decay: 0`, "
                "and use `method: {name: sparse, l2sp: 0.01}` to regularize the trained entries.",
                key="train.weight_decay",
            )

    def select(self, model, cfg, calibration=None):
        params = cfg.method.params
        density = float(params.get("density", 0.01))
        criterion = params.get("criterion", "grad")
        fresh = set(fresh_head_names(model, cfg.task))
        candidates = {n: p for n, p in model.named_parameters() if n not in fresh and p.is_floating_point()}
        if any(p.is_meta for p in candidates.values()):
            # the dry run builds the model on the meta device: no weights to rank, but the counts are exact
            return [], {n: _first(p, density) for n, p in candidates.items() if _k(p, density)}, {}
        if criterion in NEEDS_DATA and calibration is None:
            warnings.warn(f"sparse: criterion '{criterion}' needs calibration batches and none were given; "
                          "choosing entries by magnitude instead.", stacklevel=2)  # fmt: skip
            criterion = "magnitude"
        if criterion in NEEDS_DATA:
            scores = gradient_scores(model, candidates, calibration, params.get("calibration_batches", 4),
                                     square=criterion == "fisher")  # fmt: skip
        else:
            scores = None
        chosen = {}
        for i, (name, param) in enumerate(candidates.items()):
            k = _k(param, density)
            if k == 0:
                continue
            chosen[name] = top_entries(param, k, criterion, scores.pop(name) if scores else None, cfg.train.seed + i)
        if not chosen:
            raise ConfigError(f"density {density} selects no entry of any tensor of {type(model).__name__}. "
                              "Fix: raise `density`.", key="method.density")  # fmt: skip
        return [], chosen, {"criterion_used": criterion}


def _k(param, density: float) -> int:
    """Entries of `param` that train: ``round(density * numel)``."""
    return round(density * param.numel())


def _first(param, density):
    import torch

    return torch.arange(_k(param, density), dtype=torch.int64)


def top_entries(param, k: int, criterion: str, score=None, seed: int = 0):
    """Sorted flat int64 indices of the `k` entries of `param` with the highest score under `criterion`."""
    import torch

    if criterion == "magnitude":
        score = param.detach().abs()
    elif criterion == "random":
        gen = torch.Generator().manual_seed(seed)
        score = torch.rand(param.numel(), generator=gen)
    idx = score.reshape(-1).float().topk(k, sorted=False).indices
    return idx.sort().values.to("cpu", torch.int64)


def gradient_scores(model, params: dict, calibration, n_batches: int, square: bool) -> dict:
    """``{name: sum over batches of |grad|}`` (or ``grad^2``) for `params`, from `calibration`'s batches.

    Args:
        model: The model (its ``requires_grad`` flags and training mode are restored afterwards).
        params: ``{name: Parameter}`` to score.
        calibration: Zero-argument callable returning an iterable of batches with labels.
        n_batches: How many batches to use at most.
        square: Accumulate squared gradients (Fisher) instead of absolute ones.
    """
    import torch

    scores = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    device = next(model.parameters()).device

    def accumulate(name):
        def hook(p):  # runs once p.grad is complete for this backward; free it right away to save memory
            scores[name] += p.grad.float().square() if square else p.grad.float().abs()
            p.grad = None

        return hook

    handles, seen = [], 0
    try:
        model.eval()  # an entry's score should not depend on which units dropout silenced
        for name, p in params.items():
            p.requires_grad_(True)
            handles.append(p.register_post_accumulate_grad_hook(accumulate(name)))
        for batch in calibration():
            if seen >= n_batches:
                break
            batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
            loss = model(**batch).loss
            if loss is None:
                raise ConfigError("the calibration batches carry no labels, so no gradient can rank the entries. "
                                  "Fix: use `criterion: magnitude`.", key="method.criterion")  # fmt: skip
            loss.backward()
            seen += 1
    finally:
        for h in handles:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
            p.grad = None
        model.train(was_training)
    if not seen:
        raise ConfigError("the calibration data gave no batch. Fix: check data.train, or use `criterion: magnitude`.",
                          key="method.criterion")  # fmt: skip
    return scores


register("sparse", SparseMethod("sparse", "A fixed fraction of entries, chosen by gradient/Fisher on a few batches."))
