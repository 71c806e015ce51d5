"""What the live panel costs, compared with a tiny model's real training step.

The panel must stay under 2% of training wall time for a tiny model (issue 3). This script:

1. times a plain torch loop on a tiny 2-layer Llama (forward + backward + AdamW step) to get the real
   seconds per optimizer step on this machine;
2. drives a `LivePanel` with the events of a synthetic run (default 2,000 steps, a log every 10, an evaluation
   every 200) while a fake clock advances by that measured step time, so the redraw throttle behaves exactly as
   it would during that training; every widget message is JSON-serialised by a stand-in front-end, as a kernel
   would before sending it;
3. prints the panel's time per step and its ratio to the training step, throttled (the default, 4 redraws/s)
   and unthrottled (a redraw on every event, the worst case).

With ``--real-steps N`` it also trains the tiny model N steps with and without the panel attached, in
interleaved blocks, as an end-to-end cross-check (noisy on a shared machine: read it as a sanity check).

A last row drives a long run (default 50,000 steps, a log every step) to show a redraw's cost does not grow
with the history. Run: ``python benchmarks/panel_overhead.py`` (about 30 s on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def install_json_frontend():
    """Make every new widget's comm JSON-encode what it would send, and count the bytes.

    Without a kernel ipywidgets uses a comm that drops messages unseen; a kernel serialises each one, so the
    benchmark pays for that serialisation too (the zmq send itself happens on the kernel's IO thread).
    """
    import comm
    from comm.base_comm import BaseComm

    sent = {"messages": 0, "bytes": 0}

    class JsonComm(BaseComm):
        def publish_msg(self, msg_type, data=None, metadata=None, buffers=None, **keys):
            sent["messages"] += 1
            sent["bytes"] += len(json.dumps({"msg_type": msg_type, "data": data, "metadata": metadata}))

    comm.create_comm = lambda **kwargs: JsonComm(**kwargs)
    return sent


def tiny_model(seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config)


def make_stepper(batch_size: int, seq_len: int):
    """One optimizer step of the tiny model: forward, backward, AdamW."""
    import torch

    model = tiny_model()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=generator)

    def step() -> float:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def time_training_step(batch_size: int, seq_len: int, steps: int) -> float:
    step = make_stepper(batch_size, seq_len)
    for _ in range(5):  # warm-up: allocator, kernels
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def drive(bus, clock, steps: int, log_every: int, eval_every: int, step_time: float, batch_size: int, seq_len: int):
    """Emit a run's events, advancing the fake clock like training would; returns wall seconds spent."""
    from peft_magic.events import TrainState

    state = TrainState(
        max_steps=steps,
        num_epochs=2,
        title="tiny-llama · LoRA r=8 on all-linear",
        trainable_params=40_000,
        total_params=200_000,
        lr_scheduler_type="linear",
        warmup_steps=steps // 20,
        memory={"rss_gb": 1.1},
        start_time=time.time(),
    )
    t0 = time.perf_counter()
    bus.emit("on_status", state, "training")
    bus.emit("on_train_begin", state)
    for i in range(1, steps + 1):
        state.step, state.epoch = i, 2 * i / steps
        state.samples_seen += batch_size
        state.tokens_seen += batch_size * seq_len
        state.learning_rate = 2e-4 * (1 - i / steps)
        clock.now += step_time
        bus.emit("on_step_end", state)
        if i % log_every == 0:
            logs = {"loss": 3.0 / (1 + i / 300) + 0.05 * ((i * 7919) % 13) / 13, "learning_rate": state.learning_rate}
            state.log_history.append({"step": i, "epoch": state.epoch, **logs})
            bus.emit("on_log", state, logs)
        if i % eval_every == 0:
            metrics = {"eval_loss": 2.5 - i / steps, "eval_accuracy": 0.5 + 0.4 * i / steps, "eval_runtime": 0.4}
            state.log_history.append({"step": i, **metrics})
            bus.emit("on_evaluate", state, metrics)
    state.stop_reason, state.status = "completed", "done"
    bus.emit("on_train_end", state)
    return time.perf_counter() - t0


def panel_cost(args, step_time, max_redraws_per_second, sent, steps, log_every, eval_every, repeats=3):
    """(seconds per step spent in the panel, redraws, messages, bytes) for one synthetic run, best of `repeats`."""
    from peft_magic.events import EventBus
    from peft_magic.ui.panel import LivePanel

    common = (steps, log_every, eval_every, step_time, args.batch_size, args.seq_len)
    baseline = min(drive(EventBus([]), FakeClock(), *common) for _ in range(repeats))  # the loop's own cost
    results = []
    for _ in range(repeats):
        clock = FakeClock()
        panel = LivePanel(auto_show=False, clock=clock, max_redraws_per_second=max_redraws_per_second)
        sent.update(messages=0, bytes=0)
        # Outside a kernel IPython prints the end-of-run summary's repr: keep it out of the table.
        with contextlib.redirect_stdout(io.StringIO()):
            wall = drive(EventBus([panel]), clock, *common)
        results.append((wall, panel.redraws, sent["messages"], sent["bytes"]))
    wall, redraws, messages, nbytes = min(results)
    return max(wall - baseline, 0.0) / steps, redraws, messages, nbytes


def real_ab(args) -> tuple[float, float]:
    """Median seconds per step training the tiny model without / with a panel, in interleaved blocks."""
    from peft_magic.events import EventBus, TrainState
    from peft_magic.ui.panel import LivePanel

    step = make_stepper(args.batch_size, args.seq_len)
    for _ in range(5):
        step()
    block = max(args.real_steps // 10, 1)
    plain, with_panel = [], []
    for _ in range(10):
        for attach, out in ((False, plain), (True, with_panel)):
            state = TrainState(max_steps=block, title="tiny-llama")
            bus = EventBus([LivePanel(auto_show=False)] if attach else [])
            bus.emit("on_train_begin", state)
            t0 = time.perf_counter()
            for i in range(1, block + 1):
                loss = step()
                state.step, state.samples_seen = i, i * args.batch_size
                bus.emit("on_step_end", state)
                if i % args.log_every == 0:
                    bus.emit("on_log", state, {"loss": loss, "learning_rate": 2e-4})
            out.append((time.perf_counter() - t0) / block)
    return statistics.median(plain), statistics.median(with_panel)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="synthetic run length")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--timing-steps", type=int, default=30, help="tiny-model steps timed for the step time")
    parser.add_argument("--long-steps", type=int, default=50_000, help="a long run logging every step (0: skip)")
    parser.add_argument("--real-steps", type=int, default=0, help="also train this many steps with/without panel")
    args = parser.parse_args(argv)

    import torch

    sent = install_json_frontend()
    step_time = time_training_step(args.batch_size, args.seq_len, args.timing_steps)
    run = (args.steps, args.log_every, args.eval_every)
    throttled = panel_cost(args, step_time, 4.0, sent, *run)
    unthrottled = panel_cost(args, step_time, 0.0, sent, *run)
    long_run = (args.long_steps, 1, max(args.long_steps // 20, 1))
    long = panel_cost(args, step_time, 4.0, sent, *long_run, repeats=1) if args.long_steps else None

    print(
        f"tiny Llama (2 layers, hidden 64), batch {args.batch_size} x {args.seq_len} tokens, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"synthetic run: {args.steps} steps, log every {args.log_every}, eval every {args.eval_every}, "
        f"simulated {args.steps * step_time:.1f} s of training"
    )
    print()
    print(f"{'':34}{'per step':>12}{'ratio':>9}{'redraws':>9}{'per redraw':>12}{'messages':>10}{'sent':>10}")
    print(f"{'training step (fwd+bwd+AdamW)':34}{step_time * 1e3:>10.2f}ms{'100%':>9}")
    rows = [("panel, throttled (4 redraws/s)", throttled, args.steps)]
    rows.append(("panel, unthrottled (worst case)", unthrottled, args.steps))
    if long:
        rows.append((f"panel, {args.long_steps} steps, log each", long, args.long_steps))
    per_redraw = {}
    for name, (cost, redraws, messages, nbytes), steps in rows:
        per_redraw[name] = cost * steps / max(redraws, 1)  # includes the per-event work between redraws
        print(
            f"{name:34}{cost * 1e6:>10.1f}us{100 * cost / step_time:>8.2f}%{redraws:>9}"
            f"{per_redraw[name] * 1e3:>10.2f}ms{messages:>10}{nbytes / 1e6:>8.2f}MB"
        )
    ratio = 100 * max(throttled[0], long[0] if long else 0.0) / step_time
    print()
    print(f"panel overhead (throttled): {ratio:.2f}% of training time -> {'OK' if ratio < 2 else 'OVER'} (target < 2%)")
    # Throttled, the redraws follow wall time, not steps: 4 a second cost 4 x (cost per redraw) of each second,
    # however fast the model steps.
    bound = 100 * 4.0 * max(v for k, v in per_redraw.items() if "unthrottled" not in k)
    print(f"bound for any step time at 4 redraws/s: ~{bound:.2f}% of wall time")
    if args.real_steps:
        plain, with_panel = real_ab(args)
        print(
            f"end-to-end, {args.real_steps} real steps each: plain {plain * 1e3:.2f} ms/step, with panel "
            f"{with_panel * 1e3:.2f} ms/step ({100 * (with_panel / plain - 1):+.1f}%, noisy)"
        )


if __name__ == "__main__":
    main()
