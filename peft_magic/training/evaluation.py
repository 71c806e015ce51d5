"""Evaluation on a prepared dataloader: loss for every task, classification metrics for classifiers."""

from __future__ import annotations

from .metrics import classification_metrics, perplexity


def evaluate_model(model, dataloader, accelerator=None, task="causal-lm", labels=None) -> dict:
    """Run `model` over `dataloader` without gradients.

    Args:
        model: The (possibly accelerate-wrapped) model.
        dataloader: Yields collated batches with ``labels``.
        accelerator: When given, batches are gathered across processes (`gather_for_metrics`).
        task: Decides which metrics are computed.
        labels: Class names for classification metrics.

    Returns:
        ``{"loss", ...}``: causal-lm/seq2seq add ``perplexity``; seq-cls/token-cls add accuracy, precision,
        recall, f1 (macro), ``f1_per_class`` and ``confusion_matrix``.
    """
    import torch

    was_training = model.training
    model.eval()
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    weight = torch.zeros((), dtype=torch.float64, device=device)
    preds, refs = [], []
    from ..methods.peft_defaults import evaluation_loss

    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
    with torch.no_grad(), evaluation_loss(unwrapped):  # the task loss alone, without train-only terms
        for batch in dataloader:
            if accelerator is None:
                batch = {k: v.to(device) for k, v in batch.items()}
            out = model(**batch)
            y = batch["labels"]
            if task == "causal-lm":  # the model's loss averages over predicted (shifted) positions
                n = (y[:, 1:] != -100).sum()
            elif task in ("seq2seq", "token-cls"):
                n = (y != -100).sum()
            else:
                n = torch.tensor(y.shape[0], device=device)
            loss_sum += out.loss.double() * n
            weight += n
            if task == "seq-cls":
                p, r = out.logits.argmax(-1), y
            elif task == "token-cls":
                keep = y != -100
                p, r = out.logits.argmax(-1)[keep], y[keep]
            else:
                continue
            if accelerator is not None:
                p, r = accelerator.gather_for_metrics((p, r))
            preds.append(p.cpu())
            refs.append(r.cpu())
    if accelerator is not None:
        loss_sum, weight = accelerator.reduce(loss_sum, "sum"), accelerator.reduce(weight, "sum")
    if was_training:
        model.train()
    loss = float(loss_sum / weight.clamp(min=1))
    metrics = {"loss": loss}
    if task in ("causal-lm", "seq2seq"):
        metrics["perplexity"] = perplexity(loss)
    elif preds:
        metrics.update(classification_metrics(torch.cat(preds).tolist(), torch.cat(refs).tolist(), labels))
    return metrics
