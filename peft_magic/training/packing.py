"""Sequence packing for causal-lm (`data.packing: true`): each training batch becomes one row with no padding.

transformers' `DataCollatorWithFlattening` concatenates a batch's examples into a single row, restarts
`position_ids` at every example and masks the first label of each; transformers 5 then builds a block-diagonal
causal mask from those position ids (sdpa, eager, flex) or uses the variable-length kernels (flash attention,
through `cu_seq_lens_*`), so no example attends to another. A step sees the same examples and the same number
of loss tokens as with padding, so the loss and gradients are the same; only the padding's compute goes away.

What the collator alone does not give, and this module adds:

- ``use_cache=False`` in every batch. Llama-style models create a KV cache when `config.use_cache` is true, even
  in training, and transformers only looks for packed sequences when there is no cache: without this flag the
  examples of a packed row silently attend to each other (measured on transformers 5.24: the loss differs).
- `check_packing`: a two-example probe, run once before training, that the model really keeps packed examples
  apart (architectures that build their own masks, or prompt-learning methods, do not).
"""

from __future__ import annotations

from ..errors import ConfigError


class PackingCollator:
    """Flatten a list of tokenized examples into one ``[1, total_tokens]`` row for a causal LM.

    Returns `DataCollatorWithFlattening`'s batch (``input_ids``, ``labels``, ``position_ids``, ``cu_seq_lens_q/k``,
    ``max_length_q/k``) plus ``use_cache=False``. The number of examples in the batch is
    ``batch["cu_seq_lens_q"].shape[0] - 1`` (a shape, so reading it never waits for the device).
    """

    def __init__(self):
        self._flatten = None

    def __call__(self, features):
        if self._flatten is None:  # built lazily so the collator pickles and `import peft_magic` stays light
            from transformers import DataCollatorWithFlattening

            self._flatten = DataCollatorWithFlattening(return_flash_attn_kwargs=True)
        batch = self._flatten([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features])
        batch["use_cache"] = False
        return batch


def batch_examples(batch) -> int:
    """How many examples a collated batch holds, packed or padded."""
    if "cu_seq_lens_q" in batch:
        return batch["cu_seq_lens_q"].shape[0] - 1
    return batch["input_ids"].shape[0]


def batch_tokens(batch):
    """Non-padding tokens of a collated batch (a device tensor or an int; never a host sync)."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    return batch["input_ids"].numel()  # packed: no padding at all


def check_packing(model, device=None, atol: float | None = None) -> None:
    """Check that `model` keeps packed examples apart: the logits of an example packed after another must equal
    its logits alone.

    Args:
        model: The model as it will be trained (PeftModel included: prompt-learning methods break packing).
        device: Where to run the probe (default: the model's first parameter's device).
        atol: Tolerance on the log-probabilities (default 1e-3 in float32, 5e-2 in half precision).

    Raises:
        ConfigError: keyed ``data.packing``, when the model mixes the examples or refuses the packed inputs.
    """
    import torch

    param = next(model.parameters())
    device = device or param.device
    vocab = getattr(model.config, "vocab_size", None) or 32
    low = min(4, vocab - 1)
    first = [low + (i % (vocab - low)) for i in range(3)]
    second = [low + ((7 * i + 1) % (vocab - low)) for i in range(5)]
    collate = PackingCollator()
    packed = collate([{"input_ids": first, "labels": first}, {"input_ids": second, "labels": second}])
    packed = {k: v.to(device) if hasattr(v, "to") else v for k, v in packed.items()}
    alone = {"input_ids": torch.tensor([second], device=device), "use_cache": False}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            mixed = model(**packed).logits[0, len(first) :].float().log_softmax(-1)
            single = model(**alone).logits[0].float().log_softmax(-1)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ConfigError(f"{type(model).__name__} does not accept packed batches ({str(e).splitlines()[0][:160]}). "
                          "Fix: set `data.packing: false`.", key="data.packing") from None  # fmt: skip
    finally:
        if was_training:
            model.train()
    if atol is None:
        atol = 1e-3 if param.dtype == torch.float32 else 5e-2
    gap = (mixed - single).abs().max().item()
    if not gap <= atol:
        raise ConfigError(
            f"{type(model).__name__} lets packed examples attend to each other (the probe's log-probabilities "
            f"differ by {gap:.3g}), so packing would train on the wrong context. Fix: set `data.packing: false`.",
            key="data.packing",
        )


def example_lengths(ds, column: str = "input_ids") -> list[int]:
    """Token count of every row of a tokenized `datasets.Dataset`, read from Arrow (no Python lists of ids: about
    3x faster and no copy of the column)."""
    import pyarrow.compute as pc

    return pc.list_value_length(ds.with_format("arrow")[column]).to_pylist()
