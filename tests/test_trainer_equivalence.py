"""The same training as transformers.Trainer + peft, not just the same settings.

With the batch order and dropout taken out of the comparison (batches in the rows' order on both sides, LoRA
dropout 0), peft_magic's loop with its CPU kernels must give Trainer's loss at every step: the same LoRA
initialization (seeded the same way), AdamW, linear schedule, clipping, loss normalization, and, under bf16, the
kernels' casts and the block attention within bf16's rounding: 2.5e-4 (4-bit + bf16 is 4.3e-5 off on a CPU with
AVX-512 BF16, 1.2e-4 on an AVX2 one, whose bf16 matmuls round elsewhere; a 1% learning-rate change moves the
losses by 5.6e-4 and 5.1e-4). A 4-bit (NF4) base included. This tiny model does not see where SmolLM2's QLoRA
loss once parted from Trainer's (4-bit outputs left in bf16, training/quantized_cpu.py): sft_equivalence.py does.

With `group_by_length: false` the batches themselves are Trainer's: the same seed draws the same random order,
epoch after epoch, so the two runs need no help to compare.
"""

from __future__ import annotations

import pytest
import torch
from conftest import lm_rows

import peft_magic
from peft_magic.training import engine

STEPS, BATCH, LR = 4, 8, 1e-3


def trainer_losses(folder, rows, quantization: str, bf16: bool, tmp_path, sampling="sequential",
                   epochs=1) -> list[float]:  # fmt: skip
    import datasets
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        Trainer,  # fmt: skip
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    tok = AutoTokenizer.from_pretrained(folder)

    def encode(batch):
        enc = tok([t + tok.eos_token for t in batch["text"]], truncation=True, max_length=64)
        enc["labels"] = [list(ids) for ids in enc["input_ids"]]
        return enc

    ds = datasets.Dataset.from_list(rows)
    ds = ds.map(encode, batched=True, remove_columns=ds.column_names)
    kw = {}
    if quantization == "4bit":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True,
                                                       bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw)
    if quantization == "4bit":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    set_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))  # fmt: skip
    losses = []

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=BATCH,
                             num_train_epochs=epochs, learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0,
                             weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
                             eval_strategy="no", report_to="none", seed=0, use_cpu=True, disable_tqdm=True,
                             train_sampling_strategy=sampling, bf16=bf16, optim="adamw_torch_fused")  # fmt: skip
    collator = DataCollatorForSeq2Seq(tok, label_pad_token_id=-100, padding=True)
    Trainer(model=model, args=args, train_dataset=ds, data_collator=collator, callbacks=[Losses()]).train()
    return losses


@pytest.mark.parametrize("quantization,mixed_precision", [("none", "no"), ("4bit", "no"), ("4bit", "bf16")])
def test_peft_magic_trains_as_trainer_does_step_for_step(tiny_llama, tmp_path, monkeypatch, quantization,
                                                         mixed_precision):  # fmt: skip
    if quantization == "4bit":
        pytest.importorskip("bitsandbytes")
    rows = lm_rows(STEPS * BATCH)
    theirs = trainer_losses(tiny_llama, rows, quantization, mixed_precision == "bf16", tmp_path)

    from torch.utils.data import DataLoader

    make_loaders = engine.make_loaders

    def in_order(data, cfg, accelerator):  # the rows' order, as Trainer's sequential sampler takes them
        _, eval_dl = make_loaders(data, cfg, accelerator)
        return DataLoader(data.train.with_format("python"), batch_size=BATCH, collate_fn=data.collator), eval_dl

    monkeypatch.setattr(engine, "make_loaders", in_order)
    config = {"model": {"name_or_path": tiny_llama, "quantization": quantization}, "task": "causal-lm",
              "method": {"name": "lora", "r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"},
              "data": {"train": rows, "max_length": 64},
              "train": {"num_train_epochs": 1, "per_device_train_batch_size": BATCH, "learning_rate": LR,
                        "lr_scheduler_type": "linear", "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
                        "logging_steps": 1, "eval_steps": 0, "save_steps": 0, "seed": 0,
                        "mixed_precision": mixed_precision, "output_dir": str(tmp_path / "ours")}}  # fmt: skip
    run = peft_magic.train(config, display="none")
    ours = [row["loss"] for row in run.history if "loss" in row]
    assert len(ours) == len(theirs) == STEPS
    assert theirs[-1] < theirs[0]  # it trains
    tolerance = 1e-6 if mixed_precision == "no" else 2.5e-4
    assert ours == pytest.approx(theirs, rel=tolerance)


def test_random_batches_are_trainers_for_the_same_seed(tiny_llama, tmp_path):
    """`group_by_length: false` draws Trainer's random batches, epoch after epoch: the same seed, the same losses."""
    rows = lm_rows(STEPS * BATCH)
    theirs = trainer_losses(tiny_llama, rows, "none", False, tmp_path, sampling="random", epochs=2)
    config = {"model": {"name_or_path": tiny_llama}, "task": "causal-lm",
              "method": {"name": "lora", "r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"},
              "data": {"train": rows, "max_length": 64},
              "train": {"num_train_epochs": 2, "per_device_train_batch_size": BATCH, "learning_rate": LR,
                        "lr_scheduler_type": "linear", "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
                        "logging_steps": 1, "eval_steps": 0, "save_steps": 0, "seed": 0, "group_by_length": False,
                        "mixed_precision": "no", "output_dir": str(tmp_path / "ours")}}  # fmt: skip
    ours = [row["loss"] for row in peft_magic.train(config, display="none").history if "loss" in row]
    assert len(ours) == len(theirs) == 2 * STEPS
    in_order = trainer_losses(tiny_llama, rows, "none", False, tmp_path / "seq", epochs=2)
    assert abs(in_order[0] - theirs[0]) > 1e-4  # the rows' order gives other batches: the order is what is compared
    assert ours == pytest.approx(theirs, rel=1e-6)
