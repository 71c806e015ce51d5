"""Trainer + peft against peft_magic step for step on the real SFT job (issue 17): SmolLM2-135M-Instruct (NF4 with
``QUANT=4bit``, the default; ``QUANT=none`` plain), `sft_real.py`'s 32 chat rows with the prompt masked, batches in
the rows' order on both sides, LoRA r=16 all-linear with dropout 0, bf16, seed 0, lr 1e-3, 4 steps. It prints
each step's training loss on both sides. With the order and dropout taken out, any difference is the training's.

    python benchmarks/sft_equivalence.py                       # peft_magic's defaults
    KERN=none python benchmarks/sft_equivalence.py             # without its CPU kernels: bit for bit Trainer's
    PEFT_MAGIC_4BIT_OUT=16 python benchmarks/sft_equivalence.py  # 4-bit outputs left in bf16 (before 58b965e)
    THEIRS=l1,l2,l3,l4 ...                                     # Trainer's losses from an earlier run: ours only

Probes of what the 4-bit layers' precision does (each over peft_magic's defaults): ``NO16=1`` (no
compute_in_16_bit), ``NOHALF=1`` (no half_norm_outputs), ``NOHALF4=1`` (the 16-bit norm copy kept from the 4-bit
layers only), ``OUT32=q_proj,k_proj`` (those 4-bit layers' outputs cast to float32), ``F32BWD=1`` (bitsandbytes'
input gradient computed in float32).

2026-12-03, 4-bit, against Trainer at steps 1-4: defaults before 58b965e (4-bit outputs in bf16) -0.22%, +4.26%,
+2.72%, +2.62%; `KERN=none` 0.00% at every step; `NO16=1 NOHALF=1` and `NOHALF4=1` -0.33%, +0.40%, +0.23%,
-0.02%; `F32BWD=1` +4.20% at step 2 (the backward's precision is not it); `OUT32` on q/k/v/o +2.79%, on
gate/up/down +1.24%, on o/down +2.19%, on q/k/v/gate/up +0.40%; defaults since 58b965e (outputs in float32, SwiGLU's
product from float32 gate/up) -0.33%, -0.01%, +0.24%, +0.01%, and the held-out loss after the last step (sft_real's
16 rows) 0.23457 against 0.23431 (+0.11%); with `DROP=0.05` (LoRA dropout on both sides, masks drawn differently)
-0.33%, -0.66%, -0.27%, -0.44%. Needs ~17 GB of RAM (Trainer's float32 4-bit step).
"""

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
torch.set_num_threads(1)
QUANT = os.environ.get("QUANT", "4bit")
DROP = float(os.environ.get("DROP", "0"))  # LoRA dropout on both sides (their masks differ: a noise of its own)
import datasets
import sft_real as S
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments, set_seed

folder = S.model_folder(os.path.expanduser("~/.cache/peft_magic/bench"))
tok = AutoTokenizer.from_pretrained(folder)
rows = S.build_rows(tok, 32, 512, seed=0)
eval_rows = S.build_rows(tok, 16, 512, seed=2)  # sft_real's held-out rows
wd = tempfile.mkdtemp()
spec = {"model": folder, "quant": QUANT}
ds = datasets.Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])


def enc(b):
    pairs = [S.chat_ids(tok, p, a) for p, a in zip(b["prompt"], b["answer"])]
    return {
        "input_ids": [x for x, _ in pairs],
        "attention_mask": [[1] * len(x) for x, _ in pairs],
        "labels": [y for _, y in pairs],
    }


ds = ds.map(enc, batched=True, remove_columns=ds.column_names)
theirs = [float(x) for x in os.environ.get("THEIRS", "").split(",") if x]  # Trainer's losses from an earlier run
set_seed(0)
if not theirs:
    m = S.load_base(spec)
    if QUANT != "none":
        m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=False)
    set_seed(0)
    m = get_peft_model(
        m, LoraConfig(r=16, lora_alpha=32, lora_dropout=DROP, target_modules="all-linear", task_type="CAUSAL_LM")
    )

    class L(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                theirs.append(float(logs["loss"]))

    args = TrainingArguments(
        output_dir=os.path.join(wd, "t"),
        per_device_train_batch_size=8,
        num_train_epochs=1,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
        bf16=True,
        optim="adamw_torch_fused",
    )
    Trainer(
        model=m,
        args=args,
        train_dataset=ds,
        data_collator=DataCollatorForSeq2Seq(tok, label_pad_token_id=-100, padding=True),
        callbacks=[L()],
    ).train()
    theirs_eval = S.held_out_loss(m, tok, eval_rows)
    del m
else:
    theirs_eval = float(os.environ.get("THEIRS_EVAL", "nan"))
print("trainer held-out", theirs_eval)
print("trainer", theirs, flush=True)
import gc

gc.collect()
import peft_magic
import peft_magic.training.quantized_cpu as QC

if os.environ.get("NO16"):
    QC.compute_in_16_bit = lambda model, mp: lambda: None
import peft_magic.training.frozen_casts as FC

if os.environ.get("NOHALF"):
    FC.half_norm_outputs = lambda model, mp: lambda: None
if os.environ.get("NOHALF4"):  # the 16-bit norm copy for plain/LoRA layers only, 4-bit layers read float32
    _half, _is4 = FC.half_norm_outputs, QC.is_4bit

    def _half_no4(model, mp):
        QC.is_4bit = lambda m: False
        try:
            return _half(model, mp)
        finally:
            QC.is_4bit = _is4

    FC.half_norm_outputs = _half_no4
if os.environ.get("OUT32"):  # these 4-bit layers (by name, comma-separated) hand their output on in float32
    _c16, _leaves = QC.compute_in_16_bit, os.environ["OUT32"].split(",")

    def _c16_out32(model, mp):
        for name, mod in model.named_modules():
            if QC.is_4bit(mod) and any(f".{leaf}." in name + "." for leaf in _leaves):
                mod.register_forward_hook(lambda m, a, out: out.float())
        return _c16(model, mp)

    QC.compute_in_16_bit = _c16_out32
if os.environ.get("F32BWD"):  # bitsandbytes' 4-bit input gradient computed in float32, returned in its dtype
    import bitsandbytes.autograd._functions as BF
    from bitsandbytes import functional as BNBF

    def _bwd(ctx, grad_output):
        _, B = ctx.tensors
        w = BNBF.dequantize_4bit(B, ctx.state).float()
        grad_a = torch.matmul(grad_output.float(), w).to(grad_output.dtype) if ctx.needs_input_grad[0] else None
        return grad_a, None, None, None, None

    BF.MatMul4Bit.backward = staticmethod(_bwd)
from torch.utils.data import DataLoader

from peft_magic.training import engine

mk = engine.make_loaders


def in_order(data, cfg, accelerator):
    _, e = mk(data, cfg, accelerator)
    return DataLoader(data.train.with_format("python"), batch_size=8, shuffle=False, collate_fn=data.collator), e


engine.make_loaders = in_order
messages = [
    {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["answer"]}]}
    for r in rows
]
config = {
    "model": {"name_or_path": folder, "dtype": "float32", "quantization": QUANT},
    "task": "causal-lm",
    "method": {"name": "lora", "r": 16, "lora_alpha": 32, "lora_dropout": DROP, "target_modules": "all-linear"},
    "data": {"train": messages, "max_length": 512},
    "train": {
        "num_train_epochs": 1,
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "linear",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "logging_steps": 1,
        "eval_steps": 0,
        "save_steps": 0,
        "seed": 0,
        "kernels": os.environ.get("KERN", "auto"),
        "output_dir": os.path.join(wd, "o"),
    },
}
run = peft_magic.train(config, display="none")
ours = [r["loss"] for r in run.history if "loss" in r]
print("ours", ours)
ours_eval = S.held_out_loss(run.model, tok, eval_rows)
print(
    f"held-out after the last step: trainer {theirs_eval:.5f} ours {ours_eval:.5f} {ours_eval / theirs_eval - 1:+.2%}"
)
for i, (a, b) in enumerate(zip(theirs, ours)):
    print(i + 1, f"{a:.5f} {b:.5f} {b / a - 1:+.2%}")
