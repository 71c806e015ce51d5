"""Measured forgetting: does the tuned model still predict general text as well as its base did?

    data: {forgetting: default}     # or `eval: {forgetting: SOURCE}`; SOURCE as for data.train

On general text unrelated to the task, the base model's loss and the tuned model's loss are measured on the same
tokens. The run then holds, in ``run.metrics``, in a ``run.history`` row, in the panel's summary, the model card and
every comparison table:

    forgetting_base_loss, forgetting_loss, forgetting_loss_delta   (tuned - base: > 0 means it got worse)
    forgetting_base_ppl,  forgetting_ppl,  forgetting_ppl_ratio    (tuned / base perplexity = exp(delta))

When each is measured: a peft method leaves the base weights untouched, so after training the base is the same
model with its adapter switched off (``model.disable_adapter()``): both numbers come from the same device, dtype
and precision. Selective methods and full fine-tuning change the base weights in place, so their base is measured
right after loading, before the method touches it, on the device training will use and under the same mixed
precision. The loss is the mean over every predicted token (batches are weighted by their token counts exactly).

Forgetting is a language-model loss, so it needs a language-model head: ``task: causal-lm`` only. A seq-cls or
token-cls model has no head that predicts text, and a seq2seq model's loss on plain text depends on how the text
is split into input and target; those are refused with a message.
"""

from __future__ import annotations

import os
import time

from ..config.checks import DEFAULT_FORGETTING as DEFAULT  # `data.forgetting: default`: the built-in text
from ..errors import ConfigError
from ..events import Callback

MAX_ROWS = 1000  # texts read from a source; enough for a stable mean, cheap next to training
KEYS = ("forgetting_base_loss", "forgetting_loss", "forgetting_loss_delta", "forgetting_base_ppl", "forgetting_ppl",
        "forgetting_ppl_ratio")  # fmt: skip
PROBE_ATTR = "_forgetting_probe"  # where a Run keeps its probe, so `run.resume()` measures again at the end


# ---------------------------------------------------------------- config


def source_label(src) -> str:
    """How the source is named in the docs, the model card and the summary (never its contents)."""
    if isinstance(src, str) and src == DEFAULT:
        from ..data.general_text import NAME

        return NAME
    from ..data.prepare import describe_source

    return describe_source(src)


# ---------------------------------------------------------------- data


def load_texts(src, namespace=None, text_column: str = "text"):
    """The general text as a `datasets.Dataset` with one ``text`` column (at most `MAX_ROWS` non-empty rows).

    Args:
        src: ``"default"``, a ``$name``, a DataFrame / list / Dataset, a file, or a hub dataset id (as for data).
        namespace: Where ``$name`` is looked up.
        text_column: The run's text column; a source without it may use ``text``.
    """
    import datasets

    from ..data.prepare import resolve

    key = "data.forgetting"
    if isinstance(src, str) and src == DEFAULT:
        from ..data.general_text import PARAGRAPHS

        return datasets.Dataset.from_dict({"text": list(PARAGRAPHS)})
    ds = resolve(src, namespace, key, split="train")
    column = next((c for c in (text_column, "text") if c in ds.column_names), None)
    if column is None:
        raise ConfigError(f"no text column (looked for '{text_column}' and 'text'; columns: "
                          f"{', '.join(map(str, ds.column_names))}). Fix: give a source with a `text` column, a list "
                          "of strings, or `forgetting: default`.", key=key)  # fmt: skip
    ds = ds.select_columns([column])
    if column != "text":
        ds = ds.rename_column(column, "text")
    ds = ds.select(range(min(len(ds), 4 * MAX_ROWS)))  # hub text sets have many blank lines: look a little further
    ds = ds.filter(lambda r: isinstance(r["text"], str) and bool(r["text"].strip()))
    if len(ds) == 0:
        raise ConfigError("holds no non-empty text. Fix: check the source, or use `forgetting: default`.", key=key)
    return ds.select(range(min(len(ds), MAX_ROWS)))


def tokenized(cfg, tokenizer, namespace=None):
    """The general text tokenized like the run's plain-text data (same max_length, EOS appended)."""
    from dataclasses import replace

    from ..data.prepare import tokenize

    texts = load_texts(cfg.data.forgetting, namespace, cfg.data.text_column)
    ds = tokenize(texts, tokenizer, replace(cfg.data, text_column="text"), "text", "causal-lm")
    if len(ds) == 0:
        raise ConfigError("no text is left after tokenization.", key="data.forgetting")
    return ds


# ---------------------------------------------------------------- measuring


def measure(model, dataset, collator, batch_size: int = 16, mixed_precision: str = "no",
            predicts_first: bool = False) -> dict:  # fmt: skip
    """Mean loss per predicted token of `model` on a tokenized `dataset`, and its perplexity.

    Args:
        model: A causal LM (plain transformers or a PeftModel), on any device.
        dataset: Rows with ``input_ids``, ``attention_mask`` and ``labels`` (as `tokenized` makes them).
        collator: Pads a list of rows into a batch.
        batch_size: Rows per forward pass.
        mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"``: autocast as the training loop does.
        predicts_first: The model also predicts each row's first token (prompt-learning adapters prepend
            virtual tokens), so it counts among the predicted tokens.

    Returns:
        ``{"loss", "ppl", "tokens"}``.
    """
    import contextlib

    import torch
    from torch.utils.data import DataLoader

    from ..devices import autocast_type
    from ..methods.peft_defaults import evaluation_loss
    from .metrics import perplexity

    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    dtype = autocast_type(mixed_precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset.with_format("python"), batch_size=batch_size, shuffle=False, collate_fn=collator)
    with torch.no_grad(), evaluation_loss(model), autocast:
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(**batch)
            # the model's loss is the mean over this batch's predicted tokens (a causal LM predicts every label but
            # the first of each row): weighting it by that count gives the exact mean over all tokens
            labels = batch["labels"] if predicts_first else batch["labels"][:, 1:]
            n = (labels != -100).sum()
            total += out.loss.double() * n
            count += n
    if was_training:
        model.train()
    loss = float(total / count.clamp(min=1))
    return {"loss": loss, "ppl": perplexity(loss), "tokens": int(count)}


def result(base: dict, tuned: dict) -> dict:
    """The six ``forgetting_*`` values from two `measure` results."""
    import math

    delta = tuned["loss"] - base["loss"]
    return {
        "forgetting_base_loss": base["loss"],
        "forgetting_loss": tuned["loss"],
        "forgetting_loss_delta": delta,
        "forgetting_base_ppl": base["ppl"],
        "forgetting_ppl": tuned["ppl"],
        "forgetting_ppl_ratio": math.exp(delta) if delta < 700 else math.inf,
    }


def _training_device():
    """Where the training loop will put the model (Accelerate's choice for this process)."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK") or 0))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _prompt_learning(model) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


class ForgettingProbe(Callback):
    """Measures the base before training (selective/full) or after it (peft), and the tuned model at the end.

    Made by `attach`; subscribes itself first on the run's bus, so the row and metrics it adds at
    ``on_train_end`` are there when the panel, the printer and user callbacks draw their summaries.

    Args:
        run: The `Run` (its ``model`` is read at the end).
        dataset: The tokenized general text.
        collator: Pads its batches.
        batch_size: Rows per forward pass (``train.per_device_eval_batch_size``).
        mixed_precision: The run's ``train.mixed_precision`` setting; resolved (``no``, ``bf16``, ``fp16``) on the
            loaded model as the training loop resolves it (``auto`` depends on the model's width on a CPU).
        source: The configured source, for descriptions.
    """

    def __init__(self, run, dataset, collator, batch_size, mixed_precision, source):
        self.run = run
        self.dataset, self.collator = dataset, collator
        self.batch_size, self.setting = batch_size, mixed_precision
        self.source = source
        self.base: dict | None = None
        self.seconds = 0.0  # spent measuring at the end (compare leaves it out of the training time)

    def measure_base(self, model, method) -> None:
        """Call on the freshly loaded model, before ``method.apply``. A method that edits the base weights in
        place gets its base measured now; a peft method's base is measured after training (adapter disabled)."""
        if getattr(method, "is_peft", False):
            return
        if not getattr(model, "hf_device_map", None) and not getattr(model, "is_quantized", False):
            model.to(_training_device())  # where the loop would move it anyway; measured there, not on the CPU
        self.base = self._measure(model, predicts_first=False)

    def _measure(self, model, predicts_first):
        from ..devices import device_info, resolve_mixed_precision

        precision = resolve_mixed_precision(self.setting, device_info(), self.run.config.task,
                                            getattr(model, "config", None))  # fmt: skip
        return measure(model, self.dataset, self.collator, self.batch_size, precision, predicts_first)

    def on_train_end(self, state) -> None:
        model = self.run.model
        if state.stop_reason == "failed" or model is None:
            return
        start = time.perf_counter()
        tuned = self._measure(model, predicts_first=_prompt_learning(model))
        base = self.base
        if base is None:  # peft: the base is this model with its adapter switched off
            with model.disable_adapter():
                base = self._measure(model, predicts_first=False)
        values = result(base, tuned)
        self.run.history.append({"step": state.step, **values})
        state.log_history = self.run.history
        state._final_metrics = {**(getattr(state, "_final_metrics", None) or {}), **values}
        self.seconds = time.perf_counter() - start
        state._forgetting_seconds = self.seconds


def attach(run, tokenizer, namespace, bus):
    """A `ForgettingProbe` for `run`, subscribed first on `bus`; None when ``data.forgetting`` is not set.

    Reads and tokenizes the source now, so a bad source fails before the model loads. Call `ForgettingProbe.
    measure_base` on the loaded model before the method is applied.
    """
    from ..distributed.ranks import is_main_process

    cfg = run.config
    if cfg.data.forgetting is None or not is_main_process():  # under a launcher, rank 0 measures and reports
        return None
    from ..data.prepare import make_collator

    probe = ForgettingProbe(run, tokenized(cfg, tokenizer, namespace), make_collator(tokenizer, "causal-lm"),
                            cfg.train.per_device_eval_batch_size, cfg.train.mixed_precision,
                            cfg.data.forgetting)  # fmt: skip
    setattr(run, PROBE_ATTR, probe)
    bus.subscribers.insert(0, probe)
    return probe


def reattach(run, bus) -> None:
    """Subscribe the run's probe again (``run.resume()`` builds a new bus): the end of the resumed run is measured."""
    probe = getattr(run, PROBE_ATTR, None)
    if probe is not None and probe not in bus.subscribers:
        bus.subscribers.insert(0, probe)


def last(history) -> dict | None:
    """The latest ``forgetting_*`` row of a history, or None."""
    return next((r for r in reversed(list(history or ())) if "forgetting_loss_delta" in r), None)
