"""`train.gradient_checkpointing: auto` (the default): the memory pre-flight turns checkpointing on only when the run
would not fit the device's free memory without it and does with it (issue 17). Real short runs on the tiny Llama,
with the device's free memory set between what the run needs with and without checkpointing."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
from conftest import lm_rows

import peft_magic
from peft_magic import devices
from peft_magic.config.parse import parse_config
from peft_magic.errors import ConfigError
from peft_magic.export.modelcard import model_card


def _config(model, out, **train):
    return {"model": model, "method": {"name": "lora", "r": 4},
            "data": {"train": lm_rows(32), "max_length": 64},
            "train": {"max_steps": 12, "learning_rate": 5e-3, "logging_steps": 3, "eval_steps": 0,
                      "per_device_train_batch_size": 8, "output_dir": str(out), **train}}  # fmt: skip


class Checkpoints:
    """Counts the layers that transformers runs through torch's checkpoint (the function it binds when
    checkpointing is enabled), from the first training step on."""

    def __init__(self, monkeypatch):
        import transformers.modeling_utils as mu

        self.calls, self.training = 0, False
        real = mu.checkpoint

        def counted(*args, **kwargs):
            self.calls += self.training
            return real(*args, **kwargs)

        monkeypatch.setattr(mu, "checkpoint", counted)

    def on_train_begin(self, state):
        self.training = True


def _free_memory(monkeypatch, free: int):
    """The device as `device_info` reports it, with `free` bytes free."""
    real = devices.device_info()
    monkeypatch.setattr(devices, "device_info", lambda *a, **k: dataclasses.replace(real, free_memory=free))
    return real


def _needs(model, out):
    """(bytes needed without checkpointing, with it) for `_config`'s run here, as the pre-flight counts them."""
    plan = peft_magic.dry_run(_config(model, out))
    assert plan.rows["checkpointing"].startswith("gradient checkpointing off (auto: fits without it")
    without = plan.memory
    with_ = without.replace(gradient_checkpointing=True)
    runtime = without.runtime  # torch is loaded: the process has paid for it (preflight._need)
    return without.total - runtime, with_.total - runtime


def _train(cfg, monkeypatch, **kwargs):
    counter = Checkpoints(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = peft_magic.train(cfg, display="none", callbacks=[counter], **kwargs)
    said = [str(w.message) for w in caught if str(w.message).startswith("peft_magic: gradient checkpointing")]
    return run, counter.calls, said


def _losses(run):
    return [r["loss"] for r in run.history if "loss" in r]


def test_auto_turns_checkpointing_on_only_when_the_run_needs_it_to_fit(tiny_llama, workdir, monkeypatch):
    without, with_ = _needs(tiny_llama, workdir / "plan")
    assert with_ < without  # the tiny run's activations shrink with checkpointing
    _free_memory(monkeypatch, (with_ + without) // 2)
    plan = peft_magic.dry_run(_config(tiny_llama, workdir / "plan"))
    assert plan.rows["checkpointing"].startswith("gradient checkpointing on (auto: needs ~")
    assert plan.fit.fits and "GB free" in plan.rows["checkpointing"]

    run, checkpointed, said = _train(_config(tiny_llama, workdir / "tight"), monkeypatch)
    assert checkpointed >= 2 * 12  # both layers of every step's forward ran under torch's checkpoint
    assert len(said) == 1 and said[0].startswith("peft_magic: gradient checkpointing on (auto: needs ~"), said
    assert run.config.train.gradient_checkpointing == "auto" and run.config.train.checkpointing
    losses = _losses(run)
    assert losses[-1] < losses[0]
    assert "gradient_checkpointing: auto" in run.config.to_yaml()  # the config as written; the choice is the run's
    assert "| gradient checkpointing | on (auto) |" in model_card(run)
    saved = json.loads((workdir / "tight" / "checkpoint-12" / "trainer_state.json").read_text())
    assert saved["gradient_checkpointing"] is True and saved["config"]["train"]["gradient_checkpointing"] == "auto"


def test_auto_leaves_checkpointing_off_with_room(tiny_llama, workdir, monkeypatch):
    run, checkpointed, said = _train(_config(tiny_llama, workdir / "roomy"), monkeypatch)
    assert checkpointed == 0 and said == []
    assert not run.config.train.checkpointing
    assert "| gradient checkpointing | off (auto) |" in model_card(run)


@pytest.mark.parametrize("written,on", [(True, True), ("on", True), (False, False), ("no", False)])
def test_true_and_false_are_kept_whatever_the_memory(tiny_llama, workdir, monkeypatch, written, on):
    if on:  # plenty of memory: checkpointing stays on as asked
        run, checkpointed, said = _train(_config(tiny_llama, workdir / "on", gradient_checkpointing=written),
                                         monkeypatch)  # fmt: skip
    else:  # only fits with checkpointing: stays off as asked, and the pre-flight says what would fit
        without, with_ = _needs(tiny_llama, workdir / "plan")
        _free_memory(monkeypatch, (with_ + without) // 2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run, checkpointed, said = _train(_config(tiny_llama, workdir / "off", gradient_checkpointing=written),
                                             monkeypatch)  # fmt: skip
        assert run.preflight is not None and not run.preflight.fits
        assert run.preflight.suggestions[0].startswith("train.gradient_checkpointing: true")
    assert said == []
    assert run.config.train.gradient_checkpointing is on and run.config.train.checkpointing is on
    assert (checkpointed > 0) is on


@pytest.mark.parametrize("value", ["maybe", 2, [True]])
def test_anything_else_is_refused_naming_the_key(value):
    with pytest.raises(ConfigError) as e:
        parse_config({"model": "m", "data": {"train": "x.csv"}, "train": {"gradient_checkpointing": value}})
    assert "train.gradient_checkpointing" in str(e.value) and "auto, true, false" in str(e.value)


def test_spellings_of_the_choice():
    def parsed(value):
        return parse_config({"model": "m", "data": {"train": "x.csv"},
                             "train": {"gradient_checkpointing": value}}).train.gradient_checkpointing  # fmt: skip

    assert parse_config({"model": "m", "data": {"train": "x.csv"}}).train.gradient_checkpointing == "auto"
    assert [parsed(v) for v in (True, "true", "Yes", "on", False, "false", "off", "no", "AUTO")] == [True] * 4 + [False] * 4 + ["auto"]  # fmt: skip
    assert parse_config({"model": "m", "data": {"train": "x.csv"}}).train.checkpointing is False  # auto, undecided


def _dropout_config(model, out, **train):
    cfg = _config(model, out, **train)
    cfg["method"]["lora_dropout"] = 0.1  # dropout on: the recomputed forward must draw the same masks
    cfg["train"].update(max_steps=6, logging_steps=1, seed=3)
    return cfg


def _lora_weights(run):
    return {k: v.detach().clone() for k, v in run.model.state_dict().items() if "lora_" in k}


def test_checkpointing_trains_the_same_weights(tiny_llama, workdir, monkeypatch):
    """Why a resumed run may differ in this setting only (`rerun.NOT_COMPARED`): it recomputes the same
    activations, dropout included, so the run learns the same thing."""
    import torch

    plain, n_plain, _ = _train(_dropout_config(tiny_llama, workdir / "a", gradient_checkpointing=False), monkeypatch)
    ckpt, n_ckpt, _ = _train(_dropout_config(tiny_llama, workdir / "b", gradient_checkpointing=True), monkeypatch)
    assert n_plain == 0 < n_ckpt
    assert _losses(plain) == pytest.approx(_losses(ckpt), rel=1e-5)
    a, b = _lora_weights(plain), _lora_weights(ckpt)
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_resumed_run_keeps_the_choice_auto_made(tiny_llama, workdir, monkeypatch):
    """Stopped at step 4 of a run that only fitted with checkpointing, then resumed with room to spare: the
    continuation checkpoints too (the choice is recorded in the checkpoint), and is not refused as another config."""
    from peft_magic import session
    from peft_magic.run import Run

    runs = []

    class Recorded(Run):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            runs.append(self)

    class StopAt4:
        def on_step_end(self, state):
            if state.step == 4:
                runs[-1].stop()

    without, with_ = _needs(tiny_llama, workdir / "plan")
    monkeypatch.setattr(session, "Run", Recorded)
    cfg = _config(tiny_llama, workdir / "run")
    with monkeypatch.context() as tight:
        _free_memory(tight, (with_ + without) // 2)
        stopped = peft_magic.train(cfg, display="none", callbacks=[StopAt4()])
    assert stopped.state.stop_reason == "stopped" and stopped.config.train.checkpointing
    resumed, checkpointed, said = _train(cfg, monkeypatch, resume=True)
    assert resumed.state.stop_reason == "completed" and resumed.state.step == 12
    assert checkpointed >= 2 * 8 and said == []  # steps 5-12 checkpointed, without a second announcement
    assert resumed.config.train.checkpointing and resumed.config.train.gradient_checkpointing == "auto"
    # and a run started fresh with room decides afresh: off
    fresh, checkpointed, _ = _train(_config(tiny_llama, workdir / "fresh"), monkeypatch)
    assert checkpointed == 0 and not fresh.config.train.checkpointing


def test_a_checkpoint_written_before_auto_resumes_under_auto(tiny_llama, workdir, monkeypatch):
    """A run saved with the old default (`gradient_checkpointing: false`, no recorded choice) continues under the
    new default (auto) instead of being refused as another config; auto decides for it (here: off)."""
    out = workdir / "old"
    first = _config(tiny_llama, out, gradient_checkpointing=False)
    first["train"]["max_steps"] = 4
    peft_magic.train(first, display="none")
    state = out / "checkpoint-4" / "trainer_state.json"
    meta = json.loads(state.read_text())
    del meta["gradient_checkpointing"]  # as written before this key existed
    state.write_text(json.dumps(meta))
    resumed, checkpointed, _ = _train(_config(tiny_llama, out), monkeypatch, resume=True)
    assert resumed.state.step == 12 and checkpointed == 0 and not resumed.config.train.checkpointing
