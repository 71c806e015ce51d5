"""The file format of the selective methods (bitfit, layers, head-only, sparse): a base model plus a delta.

peft has no format for "these entries of the base model changed", so we keep a small one of our own. An exported
folder holds two files:

``peft_magic_adapter.json``::

    {
      "format": "peft_magic.delta",         # always this string; how `peft_magic.load` recognises the folder
      "version": 1,                         # bumped on any incompatible change
      "method": "sparse",                   # bitfit | layers | head-only | sparse
      "params": {"density": 0.01, ...},     # the method's parameters as the user gave them
      "base_model_name_or_path": "org/name",# the base the delta applies to
      "task": "causal-lm",                  # causal-lm | seq-cls | token-cls | seq2seq
      "extra": {...}                        # optional: what the method decided at run time (e.g. criterion used)
    }

``delta.safetensors``, keyed by parameter names of the plain transformers model (``model.named_parameters()``):

* a dense part (a bias, a whole block, the task head) is stored as the trained tensor itself under its own name,
  e.g. ``bert.encoder.layer.1.attention.self.query.bias``;
* a sparse part is stored as two tensors, ``<name>.indices`` (int64, flat indices into ``param.view(-1)``) and
  ``<name>.values`` (the trained values at those indices, in the parameter's dtype).

Values are the trained values, not differences from the base: loading is then a plain copy, so a reloaded model
reproduces the trained one bit for bit, whatever the rounding of an addition would have been.
"""

from __future__ import annotations

import json
import os

from ..errors import ConfigError

FORMAT = "peft_magic.delta"
VERSION = 1
CONFIG_NAME = "peft_magic_adapter.json"
WEIGHTS_NAME = "delta.safetensors"


def is_delta_dir(path) -> bool:
    """True when `path` is a folder written by `save_delta`."""
    file = os.path.join(str(path), CONFIG_NAME)
    if not os.path.isfile(file):
        return False
    try:
        with open(file, encoding="utf-8") as fh:
            return json.load(fh).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def save_delta(out_dir, *, method: str, params: dict, base_model_name_or_path: str, task: str,
               dense: dict, sparse: dict | None = None, extra: dict | None = None) -> None:  # fmt: skip
    """Write a delta folder.

    Args:
        out_dir: Folder to write (created if missing).
        method: The method's registered name.
        params: The method's parameters (plain, JSON-safe).
        base_model_name_or_path: The base model the delta applies to.
        task: The run's task.
        dense: ``{parameter name: trained tensor}`` for parts stored whole.
        sparse: ``{parameter name: (flat int64 indices, trained values)}`` for parts stored sparsely.
        extra: Run-time decisions worth keeping (JSON-safe).
    """
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    tensors = {}
    for name, tensor in dense.items():
        # clone: tied or sliced tensors share storage, which safetensors refuses to write
        tensors[name] = tensor.detach().to("cpu").contiguous().clone()
    for name, (indices, values) in (sparse or {}).items():
        tensors[f"{name}.indices"] = indices.detach().to("cpu", dtype=_int64()).contiguous().clone()
        tensors[f"{name}.values"] = values.detach().to("cpu").contiguous().clone()
    save_file(tensors, os.path.join(out_dir, WEIGHTS_NAME), metadata={"format": FORMAT})
    meta = {"format": FORMAT, "version": VERSION, "method": method, "params": params,
            "base_model_name_or_path": base_model_name_or_path, "task": task}  # fmt: skip
    if extra:
        meta["extra"] = extra
    with open(os.path.join(out_dir, CONFIG_NAME), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=2)
        fh.write("\n")


def read_delta_config(in_dir) -> dict:
    """The folder's ``peft_magic_adapter.json``, checked for format and version."""
    file = os.path.join(str(in_dir), CONFIG_NAME)
    if not os.path.isfile(file):
        raise ConfigError(f"'{in_dir}' holds no {CONFIG_NAME}. Fix: point at a folder written by %peft_export.",
                          key="load")  # fmt: skip
    with open(file, encoding="utf-8") as fh:
        meta = json.load(fh)
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{file} is not a peft_magic delta (format {meta.get('format')!r}).", key="load")
    if meta.get("version") != VERSION:
        raise ConfigError(f"{file} has format version {meta.get('version')}; this peft_magic reads version "
                          f"{VERSION}. Fix: upgrade peft_magic.", key="load")  # fmt: skip
    return meta


def load_delta(base_model, in_dir):
    """Apply a saved delta onto a freshly loaded base model, in place.

    Args:
        base_model: The plain transformers model named in ``base_model_name_or_path``, as loaded for the task.
        in_dir: A folder written by `save_delta`.

    Returns:
        `base_model`, with the saved entries copied in.

    Raises:
        ConfigError: when the delta names parameters the model lacks or has other shapes (a different base).
    """
    import torch
    from safetensors.torch import load_file

    meta = read_delta_config(in_dir)
    tensors = load_file(os.path.join(str(in_dir), WEIGHTS_NAME))
    params = dict(base_model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for key, tensor in tensors.items():
            if key.endswith(".values"):
                continue
            sparse = key.endswith(".indices")
            name = key[: -len(".indices")] if sparse else key
            param = params.get(name)
            if param is None:
                raise _mismatch(meta, type(base_model).__name__, f"it has no parameter '{name}'")
            if sparse:
                values = tensors[f"{name}.values"]
                if tensor.numel() and int(tensor.max()) >= param.numel():
                    raise _mismatch(meta, type(base_model).__name__, f"'{name}' is smaller than the saved indices")
                param.view(-1)[tensor.to(param.device)] = values.to(param.device, param.dtype)
            else:
                if tuple(tensor.shape) != tuple(param.shape):
                    raise _mismatch(meta, type(base_model).__name__,
                                    f"'{name}' has shape {tuple(param.shape)}, the delta {tuple(tensor.shape)}")  # fmt: skip
                param.copy_(tensor.to(param.device, param.dtype))
    return base_model


def _mismatch(meta, cls, why) -> ConfigError:
    return ConfigError(
        f"this {meta.get('method')} delta does not fit the {cls} given: {why}. It was trained on "
        f"'{meta.get('base_model_name_or_path')}' for task {meta.get('task')}. Fix: load that base model for that task.",
        key="load",
    )


def _int64():
    import torch

    return torch.int64
