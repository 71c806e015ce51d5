"""Length-grouped batches in random order (`train.group_by_length`, the default), label-mixed for classifiers."""

from __future__ import annotations

import random

import pytest

import torch

from peft_magic.training.sampling import ShuffledLengthGroupedSampler


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


# ---------------------------------------------------------------- group_by_length: auto


def test_auto_groups_when_padding_is_large_and_lengths_say_nothing_about_labels():
    from peft_magic.training.sampling import grouping_decision

    rng = random.Random(0)
    lengths = [rng.randint(16, 128) for _ in range(400)]
    labels = [i % 4 for i in range(400)]  # independent of the length
    group, why = grouping_decision("auto", lengths, 8, labels)
    assert group and "padding" in why
    assert grouping_decision("auto", lengths, 8, None)[0]  # causal-lm: no labels to skew


def test_auto_groups_a_classifier_even_when_lengths_tell_the_labels_apart():
    """The label-mixed sampler keeps each batch's labels mixed, so a length signal no longer keeps `auto` off."""
    from peft_magic.training.sampling import grouping_decision, length_signal

    rng = random.Random(0)
    labels = [i % 2 for i in range(400)]
    lengths = [rng.randint(16, 70) + 40 * y for y in labels]  # class 1 is longer, as in many review datasets
    assert length_signal(lengths, labels) > 0.3
    group, why = grouping_decision("auto", lengths, 8, labels)
    assert group and "labels mixed" in why
    assert grouping_decision("false", lengths, 8, labels) == (False, "train.group_by_length: false")


# ---------------------------------------------------------------- classifiers: length groups with mixed labels


def mixed_batches(lengths, labels, batch_size, seed):
    from peft_magic.training.sampling import LabelMixedLengthSampler

    order = list(LabelMixedLengthSampler(lengths, labels, batch_size, torch.Generator().manual_seed(seed)))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def skewed_classes(n=600, classes=3, seed=0):
    """Lengths 8..40 tokens, class 0 six tokens longer (7% of the length variance: the demo data's 14% case)."""
    rng = random.Random(seed)
    labels = [i % classes for i in range(n)]
    return [rng.randint(8, 40) + (6 if y == 0 else 0) for y in labels], labels


def test_label_mixed_batches_pad_little_and_hold_every_label():
    lengths, labels = skewed_classes()
    mixed = mixed_batches(lengths, labels, 16, seed=1)
    grouped = batches(lengths, 16, seed=1)
    shuffled = torch.randperm(600, generator=torch.Generator().manual_seed(1)).tolist()
    shuffled = [shuffled[i : i + 16] for i in range(0, 600, 16)]
    real = sum(lengths)
    assert padded_tokens(lengths, shuffled) > 1.5 * real  # measured 1.65x
    assert padded_tokens(lengths, mixed) < 1.25 * real  # measured 1.18x: most of the padding is gone

    def top_share(b):  # the share of the batch's most common label
        return max(sum(labels[i] == c for i in b) for c in range(3)) / len(b)

    full = [b for b in mixed if len(b) == 16]
    assert all(len({labels[i] for i in b}) == 3 for b in full)  # every batch holds every label
    assert max(map(top_share, full)) <= 0.65  # about a third each (random batches: up to 0.56 here)
    assert max(map(top_share, grouped)) >= 0.85  # plain length grouping: batches of mostly one label


def test_label_mixed_every_example_once_longest_first_and_random_batch_order():
    lengths, labels = skewed_classes(n=203)
    bs = mixed_batches(lengths, labels, 8, seed=2)
    assert sorted(i for b in bs for i in b) == list(range(203))
    assert [len(b) for b in bs] == [8] * 25 + [3]
    assert max(lengths) in [lengths[i] for i in bs[0]]
    means = [sum(lengths[i] for i in b) / len(b) for b in bs[1:-1]]
    longer = sum(a > b for a, b in zip(means, means[1:]))
    assert 0.3 < longer / (len(means) - 1) < 0.7  # not a length curriculum


def test_label_mixed_order_comes_from_the_generator_alone():
    """Resume replays an epoch by reseeding the generator: the same seed gives the same batches, another seed
    other ones."""
    lengths, labels = skewed_classes(n=200)
    assert mixed_batches(lengths, labels, 8, seed=3) == mixed_batches(lengths, labels, 8, seed=3)
    assert mixed_batches(lengths, labels, 8, seed=3) != mixed_batches(lengths, labels, 8, seed=4)


def test_a_classifier_run_uses_label_mixed_batches(tiny_bert, workdir):
    import peft_magic
    from conftest import sentiment_rows

    from peft_magic.training import sampling

    seen = []
    real = sampling.LabelMixedLengthSampler.__iter__

    def recording(self):
        order = list(real(self))
        seen.append(order)
        return iter(order)

    sampling.LabelMixedLengthSampler.__iter__ = recording
    try:
        rows = [dict(r, text=r["text"] + " really" * (i % 7)) for i, r in enumerate(sentiment_rows(64))]
        config = {"model": tiny_bert, "task": "seq-cls", "data": {"train": rows},
                  "train": {"max_steps": 2, "per_device_train_batch_size": 8, "output_dir": str(workdir / "o")}}  # fmt: skip
        run = peft_magic.train(config, display="none")
    finally:
        sampling.LabelMixedLengthSampler.__iter__ = real
    assert "labels mixed" in run.data.grouping and seen and sorted(seen[0]) == list(range(64))


def test_auto_does_not_bother_when_there_is_little_padding():
    from peft_magic.training.sampling import grouping_decision, padding_share

    lengths = [60 + i % 4 for i in range(400)]
    assert padding_share(lengths, 8) < 0.1
    assert not grouping_decision("auto", lengths, 8)[0]
    assert not grouping_decision("auto", [5, 90, 7], 8)[0]  # fewer examples than two batches


def test_the_setting_takes_yaml_booleans_and_names_the_key_when_wrong():
    from peft_magic.config.parse import parse_config
    from peft_magic.errors import ConfigError

    base = {"model": "org/model", "data": {"train": "rows.jsonl"}}
    assert parse_config(base).train.group_by_length == "auto"
    assert parse_config({**base, "train": {"group_by_length": False}}).train.group_by_length == "false"
    assert parse_config(base, ["train.group_by_length=true"]).train.group_by_length == "true"
    with pytest.raises(ConfigError) as e:
        parse_config({**base, "train": {"group_by_length": "sometimes"}})
    assert e.value.key == "train.group_by_length"


def test_a_run_and_its_dry_run_say_how_batches_were_made(tiny_llama, workdir):
    import peft_magic
    from conftest import lm_rows

    config = {"model": tiny_llama, "data": {"train": lm_rows(32)},
              "train": {"max_steps": 2, "per_device_train_batch_size": 4, "output_dir": str(workdir / "o")}}  # fmt: skip
    plan = peft_magic.dry_run(config)
    run = peft_magic.train(config, display="none")
    assert run.data.grouping.startswith("auto: ") and run.data.grouping in plan.rows["batches"]


def test_evaluation_runs_longest_first_and_gets_the_same_metrics(tiny_bert, sentiment, workdir):
    import peft_magic
    from torch.utils.data import DataLoader

    from peft_magic.training.evaluation import evaluate_model

    config = {"model": tiny_bert, "task": "seq-cls", "data": {"train": sentiment, "eval": sentiment},
              "train": {"max_steps": 3, "per_device_eval_batch_size": 4, "output_dir": str(workdir / "o")}}  # fmt: skip
    run = peft_magic.train(config, display="none")
    sorted_metrics = run.evaluate()  # longest first
    plain = DataLoader(run.data.eval.with_format("python"), batch_size=4, collate_fn=run.data.collator)
    in_order = evaluate_model(run.model, plain, None, task="seq-cls", labels=run.labels)
    assert sorted_metrics["loss"] == pytest.approx(in_order["loss"], rel=1e-6)
    assert sorted_metrics["accuracy"] == in_order["accuracy"]
    assert sorted_metrics["confusion_matrix"] == in_order["confusion_matrix"]
