"""The terminal printer's lines, as a script or the CLI would show them."""

import time

from peft_magic.events import EventBus, TrainState
from peft_magic.ui.terminal import TerminalPrinter


def test_lines_for_a_whole_run(capsys):
    state = TrainState(
        max_steps=200,
        num_epochs=1,
        title="tiny · LoRA r=8",
        trainable_params=1_700_000,
        total_params=135_000_000,
        start_time=time.time() - 10,
    )
    bus = EventBus([TerminalPrinter()])
    bus.emit("on_status", state, "loading model")
    bus.emit("on_status", state, "loading model")  # repeated: printed once
    bus.emit("on_status", state, "tokenizing")
    state.status = "training"
    bus.emit("on_train_begin", state)
    state.step, state.samples_seen, state.learning_rate = 20, 123, 1.6e-4
    row = {"loss": 2.3125, "learning_rate": 1.6e-4, "epoch": 0.1}
    state.log_history.append({"step": 20, **row})
    bus.emit("on_log", state, row)
    bus.emit("on_evaluate", state, {"eval_loss": 2.1, "eval_accuracy": 0.8, "eval_f1": 0.79, "eval_runtime": 1.2})
    state.step, state.stop_reason, state.status, state.output_dir = 200, "completed", "done", "runs/tiny"
    bus.emit("on_train_end", state)

    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "status: loading model"
    assert lines[1] == "status: tokenizing"
    assert lines[2] == "tiny · LoRA r=8 · 1.7M trainable (1.3%) · 200 steps · 1 epoch"
    step, loss, lr, rate, eta = lines[3].split(" · ")
    assert (step, loss, lr) == ("step 20/200", "loss 2.31", "lr 1.6e-4")
    assert rate.endswith(" samples/s") and 11 < float(rate.split()[0]) < 12.4  # 123 samples in ~10 s
    assert eta.startswith("ETA 01:")  # 180 steps left at ~0.5 s a step: ~90 s
    assert lines[4] == "eval step 20 · loss 2.1 · accuracy 0.8 · F1 0.79"
    assert lines[5].startswith("completed 200/200 steps in 00:1") and "final loss 2.31" in lines[5]
    assert lines[5].endswith("output in runs/tiny")
    assert len(lines) == 6


def test_failure_and_stop(capsys):
    state = TrainState(max_steps=50, title="x")
    printer = TerminalPrinter()
    state.error = "CUDA out of memory: lower batch_size to 4"
    printer.on_status(state, "failed")
    state.step, state.stop_reason, state.checkpoint_dir = 7, "stopped", "out/checkpoint-7"
    printer.on_train_end(state)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "status: failed: CUDA out of memory: lower batch_size to 4"
    assert out[1].startswith("stopped at step 7/50 after ") and out[1].endswith("checkpoint in out/checkpoint-7")


def test_writes_to_a_given_stream(tmp_path):
    path = tmp_path / "log.txt"
    with open(path, "w") as stream:
        TerminalPrinter(stream).on_log(TrainState(max_steps=10, step=1), {"loss": 1.0})
    assert path.read_text().startswith("step 1/10 · loss 1")


def test_a_few_steps_of_a_big_dataset_do_not_say_zero_epochs(capsys):
    state = TrainState(max_steps=4, num_epochs=4 / 1000, title="tiny", status="training")
    TerminalPrinter().on_train_begin(state)
    assert capsys.readouterr().out.strip() == "tiny · 4 steps · <0.01 epochs"
