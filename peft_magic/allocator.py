"""Which memory allocator this process runs, and tcmalloc for the processes peft_magic starts.

Training on CPU allocates and frees tensors of a few large sizes all step long (each block's outputs, kept for
backward, between temporaries of other widths). glibc's malloc serves tensors under its mmap threshold (which grows
to 32 MB as big blocks are freed) from its heap, and the temporaries' freed blocks, fenced in by kept tensors, stay
resident: measured on SmolLM2-135M + LoRA at 8 x 497 tokens (float32, one forward + backward), autograd keeps
4.7 GB and the process peaks at 9.9 GB. tcmalloc (Debian/Ubuntu `libtcmalloc-minimal4`; Colab preloads it) reuses
those blocks: 5.9 GB, and 0.85x the time. It can only be chosen when a process starts (`LD_PRELOAD`), so
peft_magic preloads it for the processes it starts itself (`python -m peft_magic train`, an exported job's
launch.sh), installs a Jupyter kernel that starts with it (`python -m peft_magic kernel`), and says so in the dry
run of a kernel on glibc's malloc.

`PEFT_MAGIC_MALLOC=system` turns the preload off.
"""

from __future__ import annotations

import os
import sys

# shared-object names, most specific first; LD_PRELOAD accepts a bare name the loader finds in its paths
TCMALLOC = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so")
_KNOWN = (("tcmalloc", "libtcmalloc"), ("jemalloc", "libjemalloc"), ("mimalloc", "libmimalloc"))
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib",
             "/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu")  # fmt: skip


def active(maps: str = "/proc/self/maps") -> str:
    """"tcmalloc", "jemalloc" or "mimalloc" when such an allocator is loaded into this process, "glibc" on a
    Linux process without one, "unknown" elsewhere (no /proc)."""
    try:
        with open(maps) as fh:
            text = fh.read()
    except OSError:
        return "unknown"
    for name, lib in _KNOWN:
        if lib in text:
            return name
    return "glibc"


def find_tcmalloc(dirs=_LIB_DIRS) -> str | None:
    """The path of an installed tcmalloc, or None."""
    if not sys.platform.startswith("linux"):
        return None
    for d in dirs:
        for name in TCMALLOC:
            path = os.path.join(d, name)
            if os.path.exists(path):
                return path
    return None


def env_off(name: str, *more: str) -> bool:
    """Whether the environment variable `name` turns something off ("0", "off", "no", "false" or one of `more`)."""
    return os.environ.get(name, "").strip().lower() in ("0", "off", "no", "false", *more)


def wanted() -> bool:
    return not env_off("PEFT_MAGIC_MALLOC", "system", "glibc")


def preload_env(env: dict | None = None) -> dict:
    """`env` (default: this process's) with tcmalloc added to LD_PRELOAD when it is installed, wanted and not
    there already; `env` unchanged otherwise."""
    env = dict(os.environ if env is None else env)
    path = find_tcmalloc() if wanted() else None
    current = env.get("LD_PRELOAD", "")
    if path is None or "tcmalloc" in current:
        return env
    env["LD_PRELOAD"] = f"{path} {current}".strip()
    return env


def install_kernel(name: str = "peft-magic-tcmalloc", data_dir: str | None = None) -> str:
    """Write a Jupyter kernel spec (this Python, ipykernel) that starts its kernel with tcmalloc preloaded; pick it
    in JupyterLab, VS Code or `jupyter notebook` ("Python 3 (peft_magic, tcmalloc)"). Returns its folder."""
    import json

    from .errors import ConfigError

    path = find_tcmalloc()
    if path is None:
        raise ConfigError("no tcmalloc is installed here. Fix: apt install libtcmalloc-minimal4 (Debian/Ubuntu), "
                          "then run this again.", key="kernel")  # fmt: skip
    if data_dir is None:
        try:
            from jupyter_core.paths import jupyter_data_dir

            data_dir = jupyter_data_dir()
        except ImportError:
            data_dir = os.path.expanduser("~/.local/share/jupyter")
    folder = os.path.join(data_dir, "kernels", name)
    os.makedirs(folder, exist_ok=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (peft_magic, tcmalloc)", "language": "python",
            "env": {"LD_PRELOAD": path}, "metadata": {"debugger": True}}  # fmt: skip
    with open(os.path.join(folder, "kernel.json"), "w") as fh:
        json.dump(spec, fh, indent=1)
    return folder


def trims_heap(allocator: str | None = None) -> bool:
    """Whether a CPU run with peft_magic's kernels gives glibc's free heap pages back between blocks
    (training/heap_trim.py): Linux, glibc's malloc (`allocator`, default this process's), not `PEFT_MAGIC_TRIM=0`."""
    if not sys.platform.startswith("linux"):
        return False
    if env_off("PEFT_MAGIC_TRIM"):
        return False
    return (allocator or active()) == "glibc"


def hint() -> str | None:
    """One line for a CPU run's pre-flight in a process on glibc's malloc (None otherwise)."""
    if active() != "glibc":
        return None
    path = find_tcmalloc()
    how = "" if path else "apt install libtcmalloc-minimal4, then "
    return (f"glibc's malloc in this kernel holds freed blocks during a CPU step (peft_magic trims them between "
            f"blocks, at some speed); for a kernel on tcmalloc (faster): {how}`python -m peft_magic kernel` and pick "
            f"'Python 3 (peft_magic, tcmalloc)', or start Jupyter with LD_PRELOAD={path or 'libtcmalloc_minimal.so.4'}")
