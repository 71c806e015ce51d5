"""Model FLOPs utilisation (MFU): the useful arithmetic a run does per second, as a share of the chip's peak.

The FLOPs are counted, not estimated from a formula: `torch.utils.flop_counter.FlopCounterMode` records every
matrix multiplication and attention of one forward + backward pass on a batch without padding. That is exact for
whatever the method does (a LoRA model's frozen weights get no weight gradients, so its step is ~4N FLOPs per
token rather than full fine-tuning's 6N; prompt tuning adds virtual tokens). Padding is not useful work, so MFU
divides the FLOPs of the *real* tokens by the time; a run that computes padding shows a lower MFU.
"""

from __future__ import annotations


def train_flops_per_token(model, seq_len: int, batch_size: int = 1) -> float:
    """FLOPs of one training forward + backward, per token, on a batch of `batch_size` unpadded sequences of
    `seq_len` tokens. The model's gradients are cleared again afterwards.

    Args:
        model: The model as it trains (a PeftModel, or a selectively unfrozen model).
        seq_len: Tokens per sequence (the data's mean length is a good choice).
        batch_size: Sequences in the probe batch.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 1000
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch_size, seq_len), generator=gen).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    head = type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__
    if head.endswith("ForSequenceClassification"):
        batch["labels"] = torch.zeros(batch_size, dtype=torch.long, device=device)
    elif head.endswith("ForTokenClassification"):
        batch["labels"] = torch.zeros_like(ids)
    else:  # language modelling (causal or seq2seq): the tokens are the labels
        batch["labels"] = ids
    was_training = model.training
    model.train()
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            model(**batch).loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return counter.get_total_flops() / (batch_size * seq_len)


def probe(accelerator, model, cfg, data) -> tuple[float | None, float | None]:
    """(FLOPs per real token of a training step, the GPU's peak TFLOP/s) for the live throughput line, or Nones.

    Counted with one extra forward + backward on a single unpadded sequence of the data's mean length (`data` is
    the run's `PreparedData`), after the first optimizer step (its gradients are gone by then). The RNG state is
    restored afterwards, so the run trains exactly as without the probe. Not counted with several processes (a
    collective inside the forward would need every rank) nor on a quantized base (its matmuls are bitsandbytes
    kernels the counter does not know, so the figure would be wrong).
    """
    import torch

    if accelerator.num_processes > 1 or cfg.model.quantization != "none" or not data.train_rows:
        return None, None
    mean_length = max(round(data.train_tokens / data.train_rows), 2)
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            per_token = train_flops_per_token(accelerator.unwrap_model(model), mean_length)
    except Exception:  # noqa: BLE001 - a display figure: a model the probe cannot run just shows no FLOP/s
        return None, None
    return per_token, peak_tflops()


def peak_tflops(info=None) -> float | None:
    """The chip's dense 16-bit peak in TFLOP/s from `devices.KNOWN_GPUS`, or None (CPU, or a GPU not listed)."""
    from ..devices import device_info, match_gpu

    info = info or device_info()
    if info.kind != "cuda":
        return None
    spec = match_gpu(info.name, info.total_memory)
    return spec.peak_tflops if spec and spec.peak_tflops else None
