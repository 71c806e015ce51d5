"""Export: the adapter in peft's format (or a merged full model), plus the resolved config, the tokenizer and a
model card; and loading such a folder back.

Exports are atomic: everything is written into a temporary sibling folder that is renamed into place at the end,
so a failure mid-write leaves either the old folder or nothing, never half an adapter.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from ..errors import ConfigError

CONFIG_FILE = "peft_magic.yaml"


def check_target(out_dir: str, overwrite: bool) -> str:
    """Resolve and check an export folder; returns its absolute path."""
    if not out_dir or not str(out_dir).strip():
        raise ConfigError("no export folder given. Fix: %peft_export NAME DIR.", key="export")
    path = os.path.abspath(os.path.expanduser(str(out_dir)))
    if os.path.isfile(path):
        raise ConfigError(f"'{out_dir}' is a file. Fix: give a folder path for the adapter.", key="export")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise ConfigError(f"'{out_dir}' already holds files. Fix: choose a new folder, or add --overwrite "
                          "(overwrite=True) to replace it.", key="export")  # fmt: skip
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:  # e.g. a file sits where a parent folder should be
        raise ConfigError(f"cannot create the folder '{parent}' ({e.strerror or e}). Fix: pick another path.",
                          key="export") from None  # fmt: skip
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"cannot write in '{parent}' (permission denied). Fix: pick a folder you can write to.",
                          key="export")  # fmt: skip
    return path


def export_run(run, out_dir: str, merge: bool = False, overwrite: bool = False, extra=None) -> str:
    """Write `run` to `out_dir`; returns the absolute folder path. `extra(tmp)` writes more files into the
    temporary folder before the model card (the GGUF files) and returns the card's lines about them."""
    if run.model is None:
        raise ConfigError("this run has no model to export (it failed before training).", key=run.name)
    path = check_target(out_dir, overwrite)
    tmp = tempfile.mkdtemp(prefix=".peft_magic-export-", dir=os.path.dirname(path))
    try:
        if merge:
            _write_merged(run, tmp)
        else:
            run.method.save(run.model, tmp, run.config)
        run.tokenizer.save_pretrained(tmp)
        if run.labels is not None:
            import json

            with open(os.path.join(tmp, "labels.json"), "w", encoding="utf-8") as fh:
                json.dump(list(run.labels), fh)
        with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as fh:
            fh.write(run.config.to_yaml())
        from .files_section import describe_files, files_lines
        from .modelcard import model_card

        card_extra = list(extra(tmp)) if extra is not None else []
        card_extra += files_lines(describe_files(tmp), tmp)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as fh:
            fh.write(model_card(run, merged=merge, folder=path, extra=card_extra))
        _swap_into_place(tmp, path)
    except OSError as e:  # disk full, permission denied: nothing half-written is left, and the user can act
        shutil.rmtree(tmp, ignore_errors=True)
        kept = "the previous export there is intact" if os.path.isdir(path) else "nothing was written"
        failed = ConfigError(f"could not write '{out_dir}' ({e.strerror or e}); {kept}. Fix: free disk space or "
                             "export to another folder.", key="export")  # fmt: skip
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    else:
        return path
    raise failed


def _swap_into_place(tmp: str, path: str) -> None:
    old = None
    if os.path.exists(path):
        old = tmp + ".old"
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old:  # put the previous export back
            os.replace(old, path)
        raise
    if old and os.path.islink(old):  # the folder was a link: drop the link, never what it points to
        os.unlink(old)
    elif old:
        shutil.rmtree(old, ignore_errors=True)


def _write_merged(run, out: str) -> None:
    """Fold the adapter into the base weights. Quantized bases are reloaded in full precision first, so the
    merged model is dequantized (what `AutoModel.from_pretrained` users expect)."""
    merged_model(run, scratch=out).save_pretrained(out, safe_serialization=True)


def merged_model(run, scratch: str | None = None):
    """The run's model with its adapter folded in, in full precision (the run's own model is left as it is)."""
    import copy

    from .. import models

    cfg = run.config
    if cfg.model.quantization != "none" and run.method.is_peft:
        adapter_dir = tempfile.mkdtemp(prefix=".adapter-", dir=scratch)
        try:
            run.method.save(run.model, adapter_dir, cfg)
            base = models.load_model(cfg.model, cfg.task, run.labels, quantization="none", pad_token_id=run.tokenizer.pad_token_id)  # fmt: skip
            return run.method.merge(run.method.load(base, adapter_dir))
        finally:
            shutil.rmtree(adapter_dir, ignore_errors=True)
    return run.method.merge(copy.deepcopy(run.model))


def load_export(path: str, device=None):
    """Load what `export_run` wrote. Returns a `Run` (model in eval mode, tokenizer, config, no history)."""
    import json

    from .. import models
    from ..config.parse import parse_config
    from ..methods import get_method
    from ..run import Run

    if not os.path.isdir(path):
        raise ConfigError(f"'{path}' is not a folder.", key="load")
    cfg_path = os.path.join(path, CONFIG_FILE)
    if os.path.isfile(cfg_path):
        cfg = parse_config(_config_without_data(cfg_path))
    else:  # a plain peft adapter from elsewhere
        with open(os.path.join(path, "adapter_config.json")) as fh:
            base = json.load(fh)["base_model_name_or_path"]
        cfg = parse_config({"model": base, "data": {"train": "<unknown>"}})
    tokenizer_src = path if os.path.isfile(os.path.join(path, "tokenizer_config.json")) else cfg.model.name_or_path
    tokenizer = models.load_tokenizer(type(cfg.model)(**{**vars(cfg.model), "name_or_path": tokenizer_src, "gguf_file": None if tokenizer_src == path else cfg.model.gguf_file}))  # fmt: skip
    labels = None
    run = Run(os.path.basename(os.path.normpath(path)), cfg)
    if os.path.isfile(os.path.join(path, "config.json")):  # merged: a full transformers model
        merged_cfg = type(cfg.model)(name_or_path=path, dtype=cfg.model.dtype)
        model = models.load_model(merged_cfg, cfg.task, None)
        method = get_method(cfg.method.name)
    else:
        method = get_method(cfg.method.name)
        if cfg.task in ("seq-cls", "token-cls"):
            labels = _labels_from(path)
        base = models.load_model(cfg.model, cfg.task, labels, pad_token_id=tokenizer.pad_token_id)
        model = method.load(base, path)
    if getattr(model.config, "id2label", None) and cfg.task in ("seq-cls", "token-cls"):
        labels = [model.config.id2label[i] for i in range(len(model.config.id2label))]
    if device is not None:
        model.to(device)
    model.eval()
    run.model, run.tokenizer, run.method, run.labels = model, tokenizer, method, labels
    run.state.status = "loaded"
    return run


def _config_without_data(cfg_path):
    import yaml

    with open(cfg_path, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    raw.setdefault("data", {})["train"] = raw.get("data", {}).get("train") or "<exported>"
    raw["data"]["eval"] = None
    return raw


def _labels_from(path):
    """Class names saved in the model card metadata (peft adapters do not carry the base's label maps)."""
    import json

    meta = os.path.join(path, "labels.json")
    if os.path.isfile(meta):
        with open(meta) as fh:
            return json.load(fh)
    return None
