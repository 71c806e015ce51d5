"""The order of training examples: length-grouped batches in a random order (`train.group_by_length`, on by
default).

Dynamic padding pads a batch to its longest example, so a random batch of texts whose lengths spread from 16 to
128 tokens is a third padding, computed and thrown away. Grouping examples of similar length removes most of
it. transformers' `get_length_grouped_indices` does the grouping (random permutation, mega-batches of ~50 batches
sorted by length, the longest batch first so an out-of-memory shows at step 1, not step 500); on its own it then
visits each mega-batch from its longest batch to its shortest, a length curriculum repeated every mega-batch. We
keep its grouping and shuffle the *batches*: every batch still holds similar lengths, but the sequence of
batches is random, as with plain shuffling (benchmarks/throughput.py measures the speed and the final loss).
Grouping by length is common practice for instruction tuning (the QLoRA paper's scripts turn it on by default);
`grouping_decision` says when we do it on our own.
"""

from __future__ import annotations

from torch.utils.data import Sampler


class ShuffledLengthGroupedSampler(Sampler):
    """Indices such that each run of `batch_size` consecutive indices is one length-grouped batch, in random batch
    order. The longest batch comes first and a shorter last batch (when the data does not divide) stays last, so
    `DataLoader(batch_size=batch_size)` cuts exactly these batches.

    Args:
        lengths: Token count of every example.
        batch_size: The per-device batch size the DataLoader uses.
        generator: A `torch.Generator`; reseeding it (as the training loop does per epoch) reproduces the order,
            which is what makes resume land on the same batches.
    """

    def __init__(self, lengths, batch_size: int, generator=None):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.generator = generator

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        import torch
        from transformers.trainer_pt_utils import get_length_grouped_indices

        order = get_length_grouped_indices(self.lengths, self.batch_size, generator=self.generator)
        b = self.batch_size
        batches = [order[i : i + b] for i in range(0, len(order), b)]
        tail = [batches.pop()] if len(batches) > 1 and len(batches[-1]) < b else []
        if len(batches) > 2:  # batch 0 holds the longest example: it stays first
            rest = torch.randperm(len(batches) - 1, generator=self.generator).tolist()
            batches = [batches[0]] + [batches[1 + i] for i in rest]
        return iter([i for batch in batches + tail for i in batch])


# ---------------------------------------------------------------- when to group (`group_by_length: auto`)

MIN_PADDING = 0.10  # below this share of padding in random batches there is little to win
MAX_LENGTH_SIGNAL = 0.02  # above this share of length variance explained by the label, grouping skews the labels


def grouping_decision(setting: str, lengths, batch_size: int, labels=None, seed: int = 0) -> tuple[bool, str]:
    """Whether to group batches by length, and why (one phrase for the dry run and the run's notes).

    ``auto`` groups when it pays and cannot hurt: random batches would be at least 10% padding, and, for a
    classifier, the lengths say little about the labels. When they do (e.g. one class's texts are shorter),
    length-grouped batches each hold mostly one class, and a short run learns worse: on the demo data of
    notebook 02 (one class 15% shorter) MiniLM reached 65-70% accuracy grouped against 83-90% shuffled.

    Args:
        setting: ``auto``, ``true`` or ``false`` (`train.group_by_length`).
        lengths: Token count of every training example.
        batch_size: The per-device batch size.
        labels: One class id per example (classification), or None.
        seed: Seeds the draw of random batches that estimates the padding.
    """
    if setting in ("true", "false"):
        return setting == "true", f"train.group_by_length: {setting}"
    lengths = list(lengths)
    if len(lengths) < 2 * batch_size:
        return False, "auto: too few examples to group"
    waste = padding_share(lengths, batch_size, seed)
    if waste < MIN_PADDING:
        return False, f"auto: random batches are only {waste:.0%} padding"
    if labels is not None:
        signal = length_signal(lengths, labels)
        if signal > MAX_LENGTH_SIGNAL:
            return False, (f"auto: lengths differ by label ({signal:.0%} of their variance), so grouped batches "
                           "would each hold mostly one label")  # fmt: skip
    return True, f"auto: random batches would be {waste:.0%} padding"


def padding_share(lengths, batch_size: int, seed: int = 0) -> float:
    """The share of padding in randomly shuffled batches (one shuffled epoch, as dynamic padding pads them)."""
    import random

    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    padded = real = 0
    for i in range(0, len(order), batch_size):
        batch = [lengths[j] for j in order[i : i + batch_size]]
        padded += len(batch) * max(batch)
        real += sum(batch)
    return 1 - real / padded if padded else 0.0


def length_signal(lengths, labels) -> float:
    """Eta squared: the share of the variance of the lengths explained by the labels (0: none, 1: all)."""
    n = len(lengths)
    mean = sum(lengths) / n
    total = sum((x - mean) ** 2 for x in lengths)
    if not total:
        return 0.0
    groups: dict = {}
    for x, y in zip(lengths, labels):
        groups.setdefault(y, []).append(x)
    between = sum(len(g) * (sum(g) / len(g) - mean) ** 2 for g in groups.values())
    return between / total


def decide(cfg, train, lengths=None) -> tuple[bool, str]:
    """`grouping_decision` for a run: `train` is the tokenized training set (a `datasets.Dataset`), `lengths` its
    example lengths when the caller already has them."""
    from .packing import example_lengths

    labels = train["labels"] if cfg.task == "seq-cls" and "labels" in train.column_names else None
    lengths = example_lengths(train) if lengths is None else lengths
    t = cfg.train
    return grouping_decision(t.group_by_length, lengths, t.per_device_train_batch_size, labels, t.seed)


def longest_first(lengths) -> list[int]:
    """Evaluation order: examples by decreasing length, so each batch pads to a near-equal length (metrics are
    sums over examples, so the order does not change them) and a batch too long for memory fails first."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])
