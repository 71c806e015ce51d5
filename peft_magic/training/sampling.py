"""The order of training examples: length-grouped batches in a random order (`train.group_by_length`, on by
default); for classifiers, length groups that keep every batch's labels mixed (`LabelMixedLengthSampler`).

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


class LabelMixedLengthSampler(Sampler):
    """For classifiers: batches of similar length whose labels stay mixed, in random batch order.

    Plain length grouping puts texts of equal length together; when one class's texts are shorter, its batches
    are mostly that class, and a short run learns worse. Here every example gets a sort key: its rank by length
    *within its own label*, as a fraction of that label's count, plus a little noise (up to `jitter` batches'
    worth, so the batches differ from epoch to epoch). Sorted by that key, the labels interleave in proportion
    (each batch holds every label about as often as the data does) and the examples next to each other are at
    the same length quantile of their label, so a batch pads only to the length differences between its labels
    (a few percent of the length variance), not to the whole spread. Cut into batches, the batch holding the
    longest example first (an out-of-memory shows at step 1), the rest in random order, a shorter last batch last.

    Args:
        lengths: Token count of every example.
        labels: Class id of every example (any hashable values).
        batch_size: The per-device batch size the DataLoader uses.
        generator: A `torch.Generator`; reseeding it reproduces the order (exact resume, as
            `ShuffledLengthGroupedSampler`).
        jitter: How far (in batches) an example may move from its place in the length order.
    """

    def __init__(self, lengths, labels, batch_size: int, generator=None, jitter: float = 2.0):
        self.lengths, self.labels = list(lengths), list(labels)
        self.batch_size, self.generator, self.jitter = batch_size, generator, jitter

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        import torch

        n, b = len(self.lengths), self.batch_size
        noise = torch.rand(n, generator=self.generator).tolist()
        groups: dict = {}
        for i, y in enumerate(self.labels):
            groups.setdefault(y, []).append(i)
        key = [0.0] * n
        for y in sorted(groups, key=repr):  # a fixed order of draws: the generator alone decides the order
            members = groups[y]
            members = [members[j] for j in torch.randperm(len(members), generator=self.generator).tolist()]
            members.sort(key=lambda i: self.lengths[i])  # stable: equal lengths stay in random order
            for rank, i in enumerate(members):
                key[i] = rank / len(members) + noise[i] * self.jitter * b / n
        order = sorted(range(n), key=key.__getitem__)
        batches = [order[i : i + b] for i in range(0, n, b)]
        tail = [batches.pop()] if len(batches) > 1 and len(batches[-1]) < b else []
        longest = max(range(len(batches)), key=lambda k: max(self.lengths[i] for i in batches[k]))
        first = batches.pop(longest)
        rest = [batches[k] for k in torch.randperm(len(batches), generator=self.generator).tolist()]
        return iter([i for batch in [first] + rest + tail for i in batch])


def train_sampler(grouped: bool, lengths, batch_size: int, generator, labels=None):
    """The training sampler: None (shuffled) unless `grouped`; label-mixed length groups for classifiers."""
    if not grouped:
        return None
    if labels is not None:
        labels = [repr(y) for y in labels]  # multi-label rows are lists
        if len(set(labels)) <= len(labels) // 2:  # classes, not regression targets (nearly one per example)
            return LabelMixedLengthSampler(lengths, labels, batch_size, generator)
    return ShuffledLengthGroupedSampler(lengths, batch_size, generator)


# ---------------------------------------------------------------- when to group (`group_by_length: auto`)

MIN_PADDING = 0.10  # below this share of padding in random batches there is little to win


def grouping_decision(setting: str, lengths, batch_size: int, labels=None, seed: int = 0) -> tuple[bool, str]:
    """Whether to group batches by length, and why (one phrase for the dry run and the run's notes).

    ``auto`` groups when it pays: random batches would be at least 10% padding. A classifier's batches are made
    by `LabelMixedLengthSampler`, which keeps every label in every batch: plain length grouping, when one class's
    texts are shorter, gives batches of mostly one class, and a short run learns worse (on the demo data of
    notebook 02, one class 15% shorter, MiniLM reached 65-70% accuracy grouped against 83-90% shuffled), so
    `auto` used to keep shuffling whenever the lengths told the labels apart (`length_signal` above 2%).

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
    if labels is not None:  # LabelMixedLengthSampler: each batch keeps the labels' mix, whatever the lengths say
        return True, f"auto: random batches would be {waste:.0%} padding; each batch keeps the labels mixed"
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


def class_labels(cfg, train):
    """The class of every training example for a classifier (`seq-cls`), else None."""
    return train["labels"] if cfg.task == "seq-cls" and "labels" in train.column_names else None


def decide(cfg, train, lengths=None, labels=None) -> tuple[bool, str]:
    """`grouping_decision` for a run: `train` is the tokenized training set (a `datasets.Dataset`), `lengths` and
    `labels` (`class_labels`) its example lengths and classes when the caller already has them."""
    from .packing import example_lengths

    labels = class_labels(cfg, train) if labels is None else labels
    lengths = example_lengths(train) if lengths is None else lengths
    t = cfg.train
    return grouping_decision(t.group_by_length, lengths, t.per_device_train_batch_size, labels, t.seed)


def longest_first(lengths) -> list[int]:
    """Evaluation order: examples by decreasing length, so each batch pads to a near-equal length (metrics are
    sums over examples, so the order does not change them) and a batch too long for memory fails first."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])
