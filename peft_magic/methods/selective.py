"""Selective methods peft lacks: train a chosen subset of the base model's own parameters, in place.

* ``bitfit``: only the bias terms (Ben Zaken et al., 2021).
* ``layers``: only chosen transformer blocks (``last_n: 2`` or ``layers: [0, 5]``; ``modules: [attn, mlp]`` keeps
  only parameters whose name inside the block contains one of those strings).
* ``head-only``: a frozen body and a trained head (a linear probe): the task head for seq-cls / token-cls, the
  output embeddings (``lm_head``) for causal-lm / seq2seq. If the model ties ``lm_head`` to its input embeddings,
  training one trains the other: they are one tensor.
* ``sparse`` (in `sparse.py`): a fixed fraction of the entries, chosen by a stated criterion.

For seq-cls and token-cls the task head (every parameter outside ``model.base_model``: ``classifier``, ``score``,
``pre_classifier``...) is freshly initialised by transformers, so it always trains too; for causal-lm and seq2seq
the pretrained ``lm_head`` does not train unless the method selects it.

Every method accepts ``l2sp`` (see `regularize.py`) and ``from: DIR`` (continue from a delta exported by the same
method with the same parameters; L2-SP still pulls toward the pretrained base, not toward that delta). The methods edit the base model's weights in place: the
trained model *is* the merged model, and what is exported is only the changed part (see `delta.py`).

The per-model bookkeeping (which entries train, theta_0 for L2-SP, the gradient-mask hooks) lives on the model as
``model.peft_magic_selective``, never on the method object: one method object serves every run.
"""

from __future__ import annotations

import json
import os
from typing import ClassVar

from ..errors import ConfigError, did_you_mean
from .registry import register
from .regularize import l2sp_penalty, parse_l2sp, snapshot

STATE_ATTR = "peft_magic_selective"
CLS_TASKS = ("seq-cls", "token-cls")
HEAD_NAMES = ("classifier", "score")  # transformers' names for seq/token-cls heads, used when base_model is absent
L2SP_HELP = "Pull trained weights toward their pretrained values: alpha * ||theta - theta_0||^2, e.g. 0.01."
FROM_HELP = "Continue training from a folder exported by the same method with the same parameters."


class SelectiveState:
    """What one model needs to train, regularize and export a selective method.

    Args:
        method: The method's name.
        params: Its parameters as given.
        task: The run's task.
        base: Base model name or path.
        dense: Names of parameters trained whole (including the head).
        sparse: ``{name: flat int64 indices}`` of parameters trained at those entries only.
        alpha: L2-SP strength, or None.
        extra: Run-time decisions to save beside the delta.
    """

    def __init__(self, method, params, task, base, dense, sparse, alpha, extra=None):
        self.method, self.params, self.task, self.base = method, params, task, base
        self.dense, self.sparse, self.alpha = list(dense), dict(sparse), alpha
        self.extra = dict(extra or {})
        self.theta0: dict = {}
        self.hooks: list = []

    def remove_hooks(self) -> None:
        for handle in self.hooks:
            handle.remove()
        self.hooks.clear()


class SelectiveMethod:
    """Shared machinery; a subclass says which parameters train (`select`) and which parameters it accepts.

    Args:
        name: Our name for it (`method: NAME`).
        summary: One line for docs and the form.
    """

    family = "S"
    is_peft = False
    trains_fresh_head = True  # seq-cls/token-cls heads are random at load: they must train
    params_help: ClassVar[dict] = {"l2sp": L2SP_HELP, "from": FROM_HELP}

    def __init__(self, name: str, summary: str):
        self.name = name
        self.summary = summary

    # ------------------------------------------------------------------ parse time
    def check_params(self, params: dict) -> None:
        for key in params:
            if key not in self.params_help:
                raise ConfigError(
                    f"'{self.name}' has no parameter '{key}'.{did_you_mean(key, self.params_help)} "
                    f"Accepted: {', '.join(self.params_help)}.",
                    key=f"method.{key}",
                )
        parse_l2sp(params.get("l2sp"))
        if params.get("from") is not None:
            self._check_from(str(params["from"]))
        self._check(params)

    def _check_from(self, src: str) -> None:
        from .delta import is_delta_dir, read_delta_config

        if not is_delta_dir(src):
            raise ConfigError(f"'{src}' holds no peft_magic_adapter.json. Fix: point `from:` at a folder exported "
                              f"from a {self.name} run (%peft_export without --merge).", key="method.from")  # fmt: skip
        saved = read_delta_config(src)["method"]
        if saved != self.name:
            raise ConfigError(f"'{src}' was exported by {saved}, not {self.name}. Fix: use `method: {{name: {saved}, "
                              f"from: {src}}}`.", key="method.from")  # fmt: skip

    def _check(self, params: dict) -> None:
        """Method-specific parameter checks (override)."""

    def check_compatible(self, cfg) -> None:
        if cfg.model.quantization != "none":
            raise ConfigError(
                f"{self.name} trains the base model's own weights, which bitsandbytes stores quantized and frozen. "
                f"Fix: set `quantization: none`, or use `method: qlora` for a 4-bit base.",
                key="model.quantization",
            )

    # ------------------------------------------------------------------ run time
    def select(self, model, cfg, calibration=None) -> tuple[list, dict, dict]:
        """(names trained whole, {name: flat int64 indices trained}, run-time notes to save) for `model`, not
        counting the fresh head."""
        raise NotImplementedError

    def apply(self, model, cfg, calibration=None):
        """Freeze `model`, unfreeze what the method trains, and attach its state.

        Args:
            model: A plain transformers model, already loaded (not quantized).
            cfg: The run's `Config`.
            calibration: None, or a zero-argument callable returning an iterable of batches (dicts for
                ``model(**batch)``, with labels); used by criteria that need gradients.

        Returns:
            `model`, ready for a plain optimizer over ``[p for p in model.parameters() if p.requires_grad]``.
        """
        model.requires_grad_(False)
        dense, sparse, extra = self.select(model, cfg, calibration)
        head = fresh_head_names(model, cfg.task) if self.trains_fresh_head else []
        dense = list(dict.fromkeys([*dense, *head]))
        params = dict(model.named_parameters())
        if not dense and not any(idx.numel() for idx in sparse.values()):
            raise ConfigError(f"{self.name} selected no parameter of {type(model).__name__} to train.", key="method")
        state = SelectiveState(self.name, _plain(cfg.method.params), cfg.task, _base_name(model, cfg), dense,
                               sparse, parse_l2sp(cfg.method.params.get("l2sp")), extra)  # fmt: skip
        for name in dense:
            params[name].requires_grad_(True)
        for name in sparse:
            params[name].requires_grad_(True)
            state.hooks.append(params[name].register_hook(_mask_hook(state, name)))
        if state.alpha:
            fresh = set(fresh_head_names(model, cfg.task))
            for name in dense:
                if name not in fresh:
                    state.theta0[name] = snapshot(params[name])
            for name, idx in sparse.items():
                state.theta0[name] = snapshot(params[name], idx)
        old = getattr(model, STATE_ATTR, None)
        if old is not None:
            old.remove_hooks()
        setattr(model, STATE_ATTR, state)
        if cfg.method.params.get("from") is not None and not any(p.is_meta for p in params.values()):  # not in dry runs
            self._continue_from(model, state, str(cfg.method.params["from"]))
        return model

    def _continue_from(self, model, state, src: str) -> None:
        """Load a previous delta as the starting point. Only a delta whose entries this run trains too is
        accepted: anything else would be missing from the delta this run exports."""
        from safetensors.torch import safe_open

        from .delta import WEIGHTS_NAME

        with safe_open(os.path.join(src, WEIGHTS_NAME), framework="pt") as fh:
            keys = list(fh.keys())
        names = {k.rsplit(".", 1)[0] if k.endswith((".indices", ".values")) else k for k in keys}
        outside = sorted(n for n in names if n not in state.dense and n not in state.sparse)
        if outside:
            raise ConfigError(f"'{src}' changed {outside[0]}{f' and {len(outside) - 1} more' if len(outside) > 1 else ''}, "
                              "which this run does not train, so the export would lose it. Fix: use the same method "
                              "parameters as the run that wrote it.", key="method.from")  # fmt: skip
        self.load_weights(model, src)

    def regularizer(self, model):
        """The L2-SP term for this micro-batch, or None when ``l2sp`` is off."""
        state = get_state(model)
        if state is None or not state.alpha or not state.theta0:
            return None
        return l2sp_penalty(dict(_unwrap(model).named_parameters()), state.theta0, state.sparse, state.alpha)

    def count_trainable(self, model) -> tuple[int, int]:
        """(entries trained, total entries): sparse parts count only their chosen entries."""
        model = _unwrap(model)
        params = dict(model.named_parameters())
        total = sum(p.numel() for p in params.values())
        state = get_state(model)
        if state is None:
            return sum(p.numel() for p in params.values() if p.requires_grad), total
        return sum(params[n].numel() for n in state.dense) + sum(int(i.numel()) for i in state.sparse.values()), total

    def save(self, model, out_dir, cfg=None) -> None:
        """Write the trained part as a delta folder (see `delta.py`)."""
        from .delta import save_delta

        model = _unwrap(model)
        state = _require_state(model, self.name)
        params = dict(model.named_parameters())
        dense = {n: params[n] for n in state.dense}
        sparse = {n: (idx, params[n].detach().reshape(-1)[idx.to(params[n].device)]) for n, idx in state.sparse.items()}
        base = _base_name(model, cfg) if cfg is not None else state.base
        save_delta(out_dir, method=self.name, params=state.params, base_model_name_or_path=base,
                   task=state.task, dense=dense, sparse=sparse, extra=state.extra)  # fmt: skip

    def load_weights(self, model, in_dir) -> None:
        """Resume: copy a checkpoint's delta into a model prepared by `apply`, keeping its masks and theta_0.

        A sparse checkpoint's entries replace the ones `apply` chose (a re-selection may differ, e.g. on other
        calibration batches); theta_0 for L2-SP is re-read from the base weights at those entries first.
        """
        from safetensors.torch import load_file

        from .delta import WEIGHTS_NAME, load_delta

        model = _unwrap(model)
        state = _require_state(model, self.name)
        tensors = load_file(os.path.join(str(in_dir), WEIGHTS_NAME))
        params = dict(model.named_parameters())
        for name, idx in list(state.sparse.items()):
            saved = tensors.get(f"{name}.indices")
            if saved is not None and not saved.equal(idx.cpu()):
                state.sparse[name] = saved.to(idx.device)
                if name in state.theta0:
                    state.theta0[name] = snapshot(params[name], saved.to(params[name].device))
        load_delta(model, in_dir)

    def load(self, base_model, in_dir):
        """Apply a delta folder saved by this method onto a freshly loaded base model (in place)."""
        from .delta import load_delta, read_delta_config

        meta = read_delta_config(in_dir)
        if meta["method"] != self.name:
            raise ConfigError(f"'{in_dir}' holds a {meta['method']} delta, not {self.name}.", key="load")
        return load_delta(base_model, in_dir)

    def merge(self, model):
        """The plain transformers model: the delta is already in its weights; hooks and state are removed."""
        model = _unwrap(model)
        state = get_state(model)
        if state is not None:
            state.remove_hooks()
            delattr(model, STATE_ATTR)
        return model


# ---------------------------------------------------------------------- bitfit


class BitFit(SelectiveMethod):
    def select(self, model, cfg, calibration=None):
        fresh = set(fresh_head_names(model, cfg.task))
        names = [n for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias" and n not in fresh]
        if not names:
            raise ConfigError(
                f"{type(model).__name__} has no bias terms, so bitfit would train {'only the head' if fresh else 'nothing'}. "
                f"Fix: use `method: head-only` for a linear probe, or `ln-tuning` / `lora`.",
                key="method.name",
            )
        return names, {}, {}


# ---------------------------------------------------------------------- layers


class Layers(SelectiveMethod):
    params_help: ClassVar[dict] = {
        "last_n": "Train the last N transformer blocks (default 2).",
        "layers": "Train these blocks by index, e.g. [0, 5] (negative counts from the end).",
        "modules": "Only parameters whose name inside a block contains one of these, e.g. [attn, mlp].",
        "l2sp": L2SP_HELP,
        "from": FROM_HELP,
    }

    def _check(self, params):
        if "last_n" in params and "layers" in params:
            raise ConfigError("give either `last_n` or `layers`, not both.", key="method.layers")
        if "last_n" in params:
            _positive_int(params["last_n"], "method.last_n")
        if "layers" in params:
            value = params["layers"]
            items = value if isinstance(value, list) else [value]
            if not items or any(isinstance(i, bool) or not isinstance(i, int) for i in items):
                raise ConfigError(f"expected a list of block indices, e.g. [0, 5], got {value!r}.", key="method.layers")
        if "modules" in params:
            value = params["modules"]
            items = value if isinstance(value, list) else [value]
            if not items or any(not isinstance(i, str) or not i.strip() for i in items):
                raise ConfigError(
                    f"expected a list of name parts, e.g. [attn, mlp], got {value!r}.", key="method.modules"
                )

    def select(self, model, cfg, calibration=None):
        params = cfg.method.params
        modules = params.get("modules")
        modules = [modules] if isinstance(modules, str) else modules
        canonical = {id(p): n for n, p in model.named_parameters()}  # a shared tensor has one name
        names, used = [], set()
        for list_name, blocks in find_block_lists(model):
            for i in self._indices(params, len(blocks), list_name):
                for inner, param in blocks[i].named_parameters():
                    hits = [m for m in modules or () if m in inner]
                    used.update(hits)
                    if modules is None or hits:
                        names.append(canonical[id(param)])
        for m in modules or ():
            if m not in used:
                inner = sorted({n.rsplit(".", 1)[0] for n, _ in blocks[0].named_parameters()})
                raise ConfigError(f"'{m}' matches no parameter inside the blocks of {type(model).__name__}. "
                                  f"Names there: {', '.join(inner)}.", key="method.modules")  # fmt: skip
        return list(dict.fromkeys(names)), {}, {}

    @staticmethod
    def _indices(params, n, list_name):
        if "layers" in params:
            wanted = params["layers"] if isinstance(params["layers"], list) else [params["layers"]]
            for i in wanted:
                if not -n <= i < n:
                    raise ConfigError(f"block {i} does not exist: {list_name} has {n} blocks (0..{n - 1}).",
                                      key="method.layers")  # fmt: skip
            return sorted({i % n for i in wanted})
        last_n = params.get("last_n", 2)
        return list(range(max(0, n - last_n), n))


# ---------------------------------------------------------------------- head-only


class HeadOnly(SelectiveMethod):
    trains_fresh_head = False  # it *is* the head; selected below for every task

    def check_compatible(self, cfg):
        super().check_compatible(cfg)
        if cfg.task in CLS_TASKS and parse_l2sp(cfg.method.params.get("l2sp")):
            raise ConfigError(
                f"with head-only on {cfg.task}, only the freshly initialised head trains: it has no pretrained "
                "value for L2-SP to pull toward. Fix: remove `l2sp` (use `train.weight_decay` instead).",
                key="method.l2sp",
            )

    def select(self, model, cfg, calibration=None):
        return head_names(model, cfg.task), {}, {}


# ---------------------------------------------------------------------- finding parts of a model


def fresh_head_names(model, task) -> list:
    """Names of the task head transformers initialises at load (seq-cls / token-cls); [] for other tasks.

    The head is every parameter outside ``model.base_model`` (``classifier``, ``score``, ``pre_classifier``...),
    so no list of architectures is needed.
    """
    if task not in CLS_TASKS:
        return []
    body = getattr(model, "base_model", model)
    if body is not model:
        inside = {id(p) for p in body.parameters()}
        names = [n for n, p in model.named_parameters() if id(p) not in inside]
    else:
        names = [n for n, _ in model.named_parameters() if n.split(".", 1)[0] in HEAD_NAMES]
    if not names:
        raise ConfigError(f"cannot find the {task} head of {type(model).__name__} (no parameter outside its base "
                          "model, none named classifier/score).", key="task")  # fmt: skip
    return names


def head_names(model, task) -> list:
    """The head a linear probe trains: the fresh task head, or the output embeddings (``lm_head``)."""
    if task in CLS_TASKS:
        return fresh_head_names(model, task)
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None:
        raise ConfigError(f"{type(model).__name__} has no output embeddings (lm_head) to train.", key="method.name")
    ids = {id(p) for p in out.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def find_block_lists(model) -> list:
    """``[(name, nn.ModuleList)]`` of the model's transformer blocks, found without a list of architectures.

    The blocks are the largest ``nn.ModuleList`` of same-typed modules by parameter count (``model.layers``,
    ``bert.encoder.layer``, ``transformer.h``...). An encoder-decoder has two such lists of similar size (encoder
    and decoder); every list holding at least half the largest one's parameters is returned, so ``last_n: 2``
    means the last 2 blocks of each stack. Lists nested inside a chosen one (e.g. MoE experts) are skipped.
    """
    from torch import nn

    found = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and len({type(m) for m in mod}) == 1:
            size = sum(p.numel() for p in mod.parameters())
            if size:
                found.append((size, name, mod))
    if not found:
        raise ConfigError(f"cannot find the transformer blocks of {type(model).__name__} (no nn.ModuleList of "
                          "layers). Fix: use `bitfit`, `sparse` or a peft method.", key="method.name")  # fmt: skip
    found.sort(key=lambda t: -t[0])
    chosen = []
    for size, name, mod in found:
        if size < 0.5 * found[0][0]:
            break
        if not any(name.startswith(c + ".") or c.startswith(name + ".") for c, _ in chosen):
            chosen.append((name, mod))
    return sorted(chosen, key=lambda t: t[0])


# ---------------------------------------------------------------------- helpers


def get_state(model):
    """The `SelectiveState` attached by `apply`, or None."""
    return getattr(_unwrap(model), STATE_ATTR, None)


def _require_state(model, name):
    state = get_state(model)
    if state is None:
        raise RuntimeError(f"{name}.save() needs a model prepared by {name}.apply()")
    return state


def _unwrap(model):
    # accelerate wraps a model in DistributedDataParallel on several devices; our state lives on the inner one
    return model.module if not hasattr(model, STATE_ATTR) and hasattr(model, "module") else model


def _mask_hook(state, name):
    """A tensor hook that keeps the gradient only at the chosen flat indices (zeros elsewhere).

    Zeros, not a dropped gradient: Adam's moments for the other entries stay exactly 0, so its update there is
    exactly 0 and those entries stay bit-identical (weight decay aside; `SparseMethod.check_compatible` forbids it).
    """
    import torch

    def hook(grad):
        idx = state.sparse[name]
        if idx.device != grad.device:
            idx = state.sparse[name] = idx.to(grad.device)
        flat = grad.reshape(-1)
        out = torch.zeros(flat.numel(), dtype=grad.dtype, device=grad.device)
        out[idx] = flat[idx]
        return out.view(grad.shape)

    return hook


def _base_name(model, cfg) -> str:
    name = getattr(getattr(cfg, "model", None), "name_or_path", "") if cfg is not None else ""
    return name or getattr(getattr(model, "config", None), "_name_or_path", "") or ""


def _plain(params: dict) -> dict:
    return json.loads(json.dumps(params, default=str))


def _positive_int(value, key):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"must be a positive whole number, got {value!r}.", key=key)


register("bitfit", BitFit("bitfit", "Only the bias terms (and the task head) train."))
register("layers", Layers("layers", "Only chosen transformer blocks (last_n or layers) train."))
register("head-only", HeadOnly("head-only", "Frozen body, trained task head (a linear probe)."))
