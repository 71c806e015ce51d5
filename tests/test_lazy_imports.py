"""What a plain-Python run imports: IPython only where IPython already runs (the error classes pick their base).

Each check runs in a fresh interpreter, since this test session has IPython loaded (conftest) as a notebook does.
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import sentiment_rows

TRAIN = """
import json, sys
import peft_magic
from peft_magic.errors import ConfigError

config = json.loads(sys.argv[1])
run = peft_magic.train(config, display=sys.argv[2], name="lazy")
try:
    peft_magic.train({**config, "train": {**config["train"], "max_steps": "many"}}, display="none")
except ConfigError as e:
    error = e
print(json.dumps({"steps": run.state.step, "ipython": "IPython" in sys.modules,
                  "error_bases": [c.__name__ for c in type(error).__mro__], "error": str(error)}))
"""


def _run(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _config(model, tmp_path) -> str:
    return json.dumps({"model": model, "task": "seq-cls", "data": {"train": sentiment_rows(32), "max_length": 16},
                       "method": {"name": "lora", "r": 4}, "train": {"max_steps": 2, "per_device_train_batch_size": 8,
                       "eval_steps": 0, "output_dir": str(tmp_path / "out")}})  # fmt: skip


def test_plain_python_training_never_imports_ipython(tiny_bert, tmp_path):
    """`import peft_magic` + `peft_magic.train` (printed lines, as in a script) trains without importing IPython
    (~0.35 s of a script's start), and a config mistake is a plain exception that names the key and the fix."""
    got = _run(TRAIN, _config(tiny_bert, tmp_path), "auto")
    assert got["steps"] == 2
    assert got["ipython"] is False
    assert got["error_bases"][:2] == ["ConfigError", "Exception"]
    assert got["error"].startswith("train.max_steps") and "whole number" in got["error"]


def test_config_errors_are_usage_errors_where_ipython_runs(tiny_bert, tmp_path):
    """Where IPython is loaded first (every kernel, an IPython shell), `ConfigError` is IPython's `UsageError`."""
    got = _run("import IPython.core.error\n" + TRAIN, _config(tiny_bert, tmp_path), "none")
    assert got["steps"] == 2
    assert got["error_bases"][:2] == ["ConfigError", "UsageError"]


def test_in_this_session_config_error_is_a_usage_error():
    from IPython.core.error import UsageError

    from peft_magic.errors import ConfigError

    assert issubclass(ConfigError, UsageError)
