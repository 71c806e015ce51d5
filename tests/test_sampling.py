"""Length-grouped batches in random order (`train.group_by_length`, the default)."""

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


def test_auto_keeps_shuffling_when_lengths_tell_the_labels_apart():
    from peft_magic.training.sampling import grouping_decision, length_signal

    rng = random.Random(0)
    labels = [i % 2 for i in range(400)]
    lengths = [rng.randint(16, 70) + 40 * y for y in labels]  # class 1 is longer, as in many review datasets
    assert length_signal(lengths, labels) > 0.3
    group, why = grouping_decision("auto", lengths, 8, labels)
    assert not group and "differ by label" in why
    assert grouping_decision("true", lengths, 8, labels) == (True, "train.group_by_length: true")  # asked for


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
