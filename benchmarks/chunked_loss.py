"""The output layer + loss alone, plain vs chunked (training/chunked_loss.py), at SmolLM2-135M's sizes.

One micro-batch of `--rows` x `--length` positions (hidden 576, vocab 49152, float32, frozen output layer as under
LoRA), `--trained` of the positions trained (the rest prompt/padding, labels -100). Each side runs in a fresh
process; measured: seconds of forward + backward (median of `--repeat`) and the peak RSS during that work above the
RSS before it (`/proc/self/clear_refs` resets the peak, then VmHWM). Random weights: the cost does not depend on them.

    python benchmarks/chunked_loss.py            # 8 x 512, half trained
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def rss_kb(field):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field))


def child(side, rows, length, trained, repeat):
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, ".")
    from peft_magic.training.chunked_loss import ChunkedCausalLMLoss  # noqa: F401 (import cost outside the timing)
    from peft_magic.training.chunked_loss import _FrozenHeadCE

    torch.manual_seed(0)
    hidden, vocab = 576, 49152
    head = torch.nn.Linear(hidden, vocab, bias=False).requires_grad_(False)
    h = torch.randn(rows, length, hidden, requires_grad=True)
    labels = torch.randint(0, vocab, (rows, length))
    labels[:, : int(length * (1 - trained))] = -100
    times = []
    for _ in range(repeat):
        h.grad = None
        base = rss_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        t0 = time.perf_counter()
        if side == "plain":
            logits = head(h).float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1))
        else:
            tgt = labels[:, 1:]
            keep = tgt != -100
            total = _FrozenHeadCE.apply(h[:, :-1][keep], head.weight, None, tgt[keep], max(16, (1 << 25) // vocab),
                                        1.0, None)  # fmt: skip
            loss = total / keep.sum()
        loss.backward()
        times.append(time.perf_counter() - t0)
        peak = rss_kb("VmHWM") - base
        del loss
    print(json.dumps({"side": side, "s": statistics.median(times), "peak_mb": peak / 1024}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--trained", type=float, default=0.5)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--child")
    a = p.parse_args()
    if a.child:
        return child(a.child, a.rows, a.length, a.trained, a.repeat)
    res = {}
    for side in ("plain", "chunked"):
        cmd = [sys.executable, __file__, "--child", side, "--rows", str(a.rows), "--length", str(a.length),
               "--trained", str(a.trained), "--repeat", str(a.repeat)]  # fmt: skip
        res[side] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    with open("/proc/loadavg") as fh:
        load = fh.read().split()[0]
    print(f"{a.rows} x {a.length} positions, {a.trained:.0%} trained, vocab 49152, hidden 576, 1 thread, load {load}")
    print(f"{'side':<8} {'fwd+bwd s':>10} {'peak RSS above start MB':>24}")
    for side, r in res.items():
        print(f"{side:<8} {r['s']:>10.3f} {r['peak_mb']:>24.0f}")
    pl, ch = res["plain"], res["chunked"]
    print(f"chunked vs plain: {pl['s'] / ch['s']:.2f}x faster, {ch['peak_mb'] / max(pl['peak_mb'], 1):.2f}x the memory")


if __name__ == "__main__":
    main()
