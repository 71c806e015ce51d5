"""Sequence packing: a packed batch trains exactly like the padded one (no cross-example attention)."""

from __future__ import annotations

import pytest
from conftest import lm_rows


def _features(tokenizer, texts):
    feats = []
    for t in texts:
        ids = tokenizer(t + tokenizer.eos_token)["input_ids"]
        feats.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)})
    return feats


def _lora_llama(path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_packed_batch_has_the_padded_batch_loss_and_gradients(tiny_llama, tokenizer):
    import torch

    from peft_magic.data.prepare import make_collator
    from peft_magic.training.packing import PackingCollator, batch_examples, batch_tokens

    texts = ["the cat sat on the mat", "hello world", "what is a good movie why not the film", "yes"]
    feats = _features(tokenizer, texts)
    padded = make_collator(tokenizer, "causal-lm")(feats)
    packed = PackingCollator()(feats)
    assert packed["input_ids"].shape == (1, sum(len(f["input_ids"]) for f in feats))
    assert batch_examples(packed) == batch_examples(padded) == 4
    assert batch_tokens(packed) == int(batch_tokens(padded))
    model = _lora_llama(tiny_llama)
    loss_pad, grads_pad = _loss_and_grads(model, padded)
    loss_pack, grads_pack = _loss_and_grads(model, packed)
    assert loss_pack == pytest.approx(loss_pad, abs=1e-5)
    for a, b in zip(grads_pad, grads_pack):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_each_packed_example_is_scored_as_if_alone(tiny_llama, tokenizer):
    import torch

    from peft_magic.training.packing import PackingCollator

    feats = _features(tokenizer, ["the movie was very good", "say hello world", "the dog sat"])
    model = _lora_llama(tiny_llama).eval()
    with torch.no_grad():
        packed = model(**PackingCollator()(feats)).logits[0]
        start = 0
        for f in feats:
            alone = model(input_ids=torch.tensor([f["input_ids"]])).logits[0]
            torch.testing.assert_close(packed[start : start + len(f["input_ids"])], alone, atol=1e-5, rtol=1e-4)
            start += len(f["input_ids"])


def test_check_packing_accepts_llama_and_rejects_a_model_that_mixes_examples(tiny_llama):
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from peft_magic.errors import ConfigError
    from peft_magic.training.packing import check_packing

    check_packing(_lora_llama(tiny_llama))  # passes: sdpa + position_ids resets keep examples apart
    prompt = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                            PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))  # fmt: skip
    with pytest.raises(ConfigError) as e:  # virtual tokens are prepended once to the whole packed row
        check_packing(prompt)
    assert e.value.key == "data.packing"


def test_training_with_packing_follows_the_padded_run(tiny_llama, workdir):
    import peft_magic

    def run(packing):
        cfg = {"model": tiny_llama, "method": {"name": "lora", "lora_dropout": 0.0},
               "data": {"train": lm_rows(), "packing": packing, "cache_tokenized": False},
               "train": {"max_steps": 8, "learning_rate": 5e-3, "logging_steps": 2, "per_device_train_batch_size": 6,
                         "output_dir": str(workdir / f"p{packing}")}}  # fmt: skip
        return peft_magic.train(cfg, display="none")

    padded, packed = run(False), run(True)
    assert packed.state.samples_seen == padded.state.samples_seen == 48
    assert packed.state.tokens_seen == padded.state.tokens_seen
    losses = [[r["loss"] for r in x.history if "loss" in r] for x in (padded, packed)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    assert losses[1][-1] < losses[1][0]  # and it learns


def test_packing_is_refused_outside_causal_lm(tiny_bert, sentiment):
    from peft_magic.config.parse import parse_config
    from peft_magic.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        parse_config({"model": tiny_bert, "task": "seq-cls", "data": {"train": sentiment, "packing": True}})
    assert e.value.key == "data.packing"
