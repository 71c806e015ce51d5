"""The order of training examples: length-grouped batches in a random order (`train.group_by_length`, on by
default).

Dynamic padding pads a batch to its longest example, so a random batch of texts whose lengths spread from 16 to
128 tokens is a third padding, computed and thrown away. Grouping examples of similar length removes most of
it. transformers' `get_length_grouped_indices` does the grouping (random permutation, mega-batches of ~50 batches
sorted by length, the longest batch first so an out-of-memory shows at step 1, not step 500); on its own it then
visits each mega-batch from its longest batch to its shortest, a length curriculum repeated every mega-batch. We
keep its grouping and shuffle the *batches*: every batch still holds similar lengths, but the sequence of
batches is random, as with plain shuffling (benchmarks/throughput.py measures the speed and the final loss).
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
