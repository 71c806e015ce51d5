#!/usr/bin/env bash
# Extra tools for the real-browser test (tests/test_browser.py): JupyterLab, Playwright for Python, and Debian's
# Chromium; and DeepSpeed for the ZeRO tests on CPU ranks (tests/test_sharded.py skips them without it). Playwright drives /usr/bin/chromium (its `executable_path`): never `playwright install`, which
# downloads browsers, and downloads are impossible on the CI machines.
#   scripts/setup.sh --test runs this when it is present.
set -euo pipefail
PIP="python3 -m pip install -q --disable-pip-version-check"
# jupyterlab_widgets is the JupyterLab side of ipywidgets 8 (core widgets only, no other extension needed); notebook
# (Notebook 7) is the second front end the browser test drives.
$PIP jupyterlab "notebook>=7" "ipywidgets>=8" jupyterlab_widgets playwright
if [ ! -x /usr/bin/chromium ]; then
  SUDO=""
  if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null; then SUDO="sudo"; fi
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium
fi
# DeepSpeed's pure-Python install (no compiled ops, torch already here): best effort, a failure only skips its tests
DS_BUILD_OPS=0 $PIP deepspeed || echo "deepspeed not installed: the DeepSpeed tests will be skipped"
# llama-cpp-python for the GGUF parity tests (tests/test_gguf.py, the real-model one too). It compiles llama.cpp;
# AMX off because some CI CPUs advertise AMX that the build then uses and the machine cannot run. Best effort: a
# failure only skips those tests.
if ! python3 -c "import llama_cpp" 2>/dev/null; then
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF" \
    $PIP "llama-cpp-python>=0.3" || echo "llama-cpp-python not installed: the GGUF parity tests will be skipped"
fi
echo "browser test tools installed ($(/usr/bin/chromium --version 2>/dev/null | head -n1))"
