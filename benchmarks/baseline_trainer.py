"""The baseline of the throughput benchmark: plain `transformers.Trainer` + `peft`, written the way the two
libraries' own docs show it, with nothing from peft_magic.

It trains the same saved model on the same rows, with the same LoRA (r=8, alpha 16, dropout 0.05, all linear
layers), seed, batch size, learning rate, linear schedule without warm-up, clipping at 1.0, no weight decay,
one epoch, float32 on CPU. Tokenization matches peft_magic's: causal-lm texts get the EOS token appended and are
truncated at max_length with labels = input_ids; classifiers' texts are truncated. Batches are padded per
batch (dynamic padding) by the collators Trainer itself picks for these tasks: `DataCollatorForSeq2Seq` with
label padding -100 for causal-lm, `DataCollatorWithPadding` for sequence classification.

Run as part of ``benchmarks/throughput.py``; `train_baseline` is called in a fresh process per run.
"""

from __future__ import annotations

import time


def train_baseline(
    spec: dict, model_dir: str, train_rows: list, out_dir: str, clock: dict, variant: str = ""
) -> object:
    """Train with `Trainer` and return the trained PeftModel.

    Args:
        spec: The benchmark's model spec (task, max_length, batch, lr, seed, labels).
        model_dir: The saved base model and tokenizer.
        train_rows: ``[{"text": ..., ("label": ...)}]``.
        out_dir: Trainer's output_dir (nothing is saved there: save_strategy="no").
        clock: Filled with ``begin`` (the training loop starts) and ``step_times`` (the end of every optimizer
            step), each a ``(time.perf_counter(), time.process_time())`` pair.
        variant: ``""`` (Trainer's defaults), ``"grouped"`` (Trainer's own
            ``train_sampling_strategy="group_by_length"``), ``"bf16"`` (``bf16=True``: bfloat16 autocast) or
            ``"sequential"`` (batches in the rows' order: for the equivalence check).
    """
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,  # fmt: skip
        set_seed,
    )

    task, max_len = spec["task"], spec["max_length"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    ds = datasets.Dataset.from_list(train_rows)
    if task == "causal-lm":

        def encode(batch):
            enc = tok([t + tok.eos_token for t in batch["text"]], truncation=True, max_length=max_len)
            enc["labels"] = [list(ids) for ids in enc["input_ids"]]
            return enc

        collator = DataCollatorForSeq2Seq(tok, label_pad_token_id=-100, padding=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        task_type = "CAUSAL_LM"
    else:

        def encode(batch):
            enc = tok(batch["text"], truncation=True, max_length=max_len)
            enc["labels"] = batch["label"]
            return enc

        collator = DataCollatorWithPadding(tok)
        n = spec["num_labels"]
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, dtype=torch.float32, num_labels=n, id2label={i: str(i) for i in range(n)},
            label2id={str(i): i for i in range(n)},
        )  # fmt: skip
        task_type = "SEQ_CLS"
    ds = ds.map(encode, batched=True, remove_columns=ds.column_names)
    set_seed(spec["seed"])
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=spec.get("lora_dropout", 0.05), target_modules="all-linear",
                      task_type=task_type)  # fmt: skip
    model = get_peft_model(model, lora)

    class Clock(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kw):  # every epoch: keep the first
            clock.setdefault("begin", (time.perf_counter(), time.process_time()))

        def on_step_end(self, args, state, control, **kw):
            clock["step_times"].append((time.perf_counter(), time.process_time()))

    clock["step_times"] = []
    args = TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=spec["batch"],
        num_train_epochs=spec["epochs"],
        learning_rate=spec["lr"],
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=spec["logging_steps"],
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=spec["seed"],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        train_sampling_strategy={"grouped": "group_by_length", "sequential": "sequential"}.get(variant, "random"),
        bf16=variant == "bf16",
    )
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collator, callbacks=[Clock()])
    trainer.train()
    return trainer.model
