"""What the libraries print during a run stays out of the cell and the terminal's progress lines, and is kept in
the run's details; the user's own warnings and peft_magic's advice still show (`peft_magic/library_output.py`)."""

from __future__ import annotations

import logging
import warnings

import pytest
from conftest import lm_rows

import peft_magic


class Noisy:
    """From inside the loop, what transformers does on some paths: a deprecation, a log line, a progress bar;
    and a warning of the user's own."""

    def on_step_end(self, state):
        if state.step == 2:
            import transformers
            from transformers.utils import logging as hf_logging

            warnings.warn_explicit("`is_gradient_checkpointing` is deprecated (test)", FutureWarning,
                                   transformers.modeling_utils.__file__, 3312)  # fmt: skip
            logging.getLogger("transformers.trainer").warning("a library log line (test)")
            for _ in hf_logging.tqdm(range(3), desc="a library bar (test)"):
                pass
            warnings.warn("the user's own warning (test)")


@pytest.fixture
def library_verbosity():
    """transformers' default verbosity (warning), whatever an earlier test or import left: a record below the
    library's level is never emitted, so there would be nothing to route."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    yield
    hf_logging.set_verbosity(previous)


def test_library_messages_go_to_the_runs_details_not_the_terminal(tiny_llama, workdir, capfd, library_verbosity):
    cfg = {"model": tiny_llama, "method": {"name": "lora", "r": 2}, "data": {"train": lm_rows(24)},
           "train": {"max_steps": 4, "logging_steps": 1}}  # fmt: skip
    with warnings.catch_warnings(record=True) as shown:  # what Python would show
        warnings.simplefilter("always")
        run = peft_magic.train(cfg, display="terminal", callbacks=[Noisy()])
    out, err = capfd.readouterr()
    assert "step 4/4" in out and "completed 4/4 steps" in out
    for noise in ("is_gradient_checkpointing", "a library log line", "a library bar"):
        assert noise not in out and noise not in err
    shown = [str(w.message) for w in shown]
    assert "the user's own warning (test)" in shown and not any("is_gradient" in m for m in shown)
    assert "FutureWarning: `is_gradient_checkpointing` is deprecated (test) (modeling_utils.py:3312)" in run.warnings
    assert "warning (transformers.trainer): a library log line (test)" in run.warnings
    assert run.state.details is run.warnings
    # After the run the hooks are gone: a library warning shows again as Python shows it.
    import transformers

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn_explicit("after the run", FutureWarning, transformers.modeling_utils.__file__, 1)
    assert [str(w.message) for w in caught] == ["after the run"]


def test_the_summary_keeps_the_details_collapsed():
    from peft_magic.events import TrainState
    from peft_magic.ui.summary import details_html, summary_html

    state = TrainState(max_steps=2, step=2, stop_reason="completed", status="done", details=["warning (x): <b>"])
    html = summary_html(state, [])
    assert '<details class="peft-details"' in html and "<details class=\"peft-details\" open" not in html
    assert "details: 1 library message" in html and "&lt;b&gt;" in html
    assert details_html([]) == ""


def test_a_nested_block_that_fails_leaves_the_next_run_routed():
    import pytest
    import transformers

    from peft_magic.library_output import routed

    with routed([]):
        with pytest.raises(ValueError), routed([]):  # a comparison's variant failing inside a run
            raise ValueError("variant failed")
    record = []
    with warnings.catch_warnings(record=True) as shown, routed(record):
        warnings.simplefilter("always")
        warnings.warn_explicit("routed again", FutureWarning, transformers.modeling_utils.__file__, 1)
    assert record == ["FutureWarning: routed again (modeling_utils.py:1)"] and not shown
