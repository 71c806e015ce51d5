"""Length-grouped batches in random order (`train.group_by_length`, the default)."""

from __future__ import annotations

import random

import torch

from peft_magic.sampling import ShuffledLengthGroupedSampler


def batches(lengths, batch_size, seed):
    order = list(ShuffledLengthGroupedSampler(lengths, batch_size, torch.Generator().manual_seed(seed)))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def padded_tokens(lengths, bs):
    return sum(len(b) * max(lengths[i] for i in b) for b in bs)


def test_every_example_once_longest_first_short_batch_last():
    rng = random.Random(0)
    lengths = [rng.randint(16, 128) for _ in range(203)]  # 25 full batches of 8 and one of 3
    bs = batches(lengths, 8, seed=1)
    assert sorted(i for b in bs for i in b) == list(range(203))
    assert max(lengths) in [lengths[i] for i in bs[0]]  # an out-of-memory shows at step 1
    assert [len(b) for b in bs] == [8] * 25 + [3]  # DataLoader(batch_size=8) cuts exactly these batches


def test_batches_are_homogeneous_and_their_order_is_random():
    rng = random.Random(0)
    lengths = [rng.randint(16, 128) for _ in range(800)]
    grouped = batches(lengths, 8, seed=1)
    shuffled = torch.randperm(800, generator=torch.Generator().manual_seed(1)).tolist()
    shuffled = [shuffled[i : i + 8] for i in range(0, 800, 8)]
    real = sum(lengths)
    # padding: about a third of a randomly shuffled batch, a few percent of a grouped one
    assert padded_tokens(lengths, shuffled) > 1.3 * real
    assert padded_tokens(lengths, grouped) < 1.1 * real
    # not a length curriculum: the batch means do not go down (or up) along the epoch
    means = [sum(lengths[i] for i in b) / len(b) for b in grouped[1:]]
    first, second = means[: len(means) // 2], means[len(means) // 2 :]
    assert abs(sum(first) / len(first) - sum(second) / len(second)) < 10
    longer = sum(a > b for a, b in zip(means, means[1:]))
    assert 0.3 < longer / (len(means) - 1) < 0.7  # a sorted order would give 0 or 1


def test_the_generator_decides_the_order():
    lengths = list(range(10, 90))
    assert batches(lengths, 4, seed=3) == batches(lengths, 4, seed=3)  # resume replays the same epoch
    assert batches(lengths, 4, seed=3) != batches(lengths, 4, seed=4)  # the next epoch is another order


def test_tiny_data_still_works():
    assert batches([5], 8, seed=0) == [[0]]
    assert sorted(i for b in batches([5, 9, 7], 2, seed=0) for i in b) == [0, 1, 2]
