"""What the run will train on: the device, its free memory, and which half precision it supports.

`device_info()` asks torch about the current accelerator (or the machine's RAM on CPU). `KNOWN_GPUS` lists the
GPUs notebooks usually get, so a pre-flight can say "fits T4" or plan for a GPU the user does not have yet
(`known_device("T4")`). torch is imported inside functions only: `import peft_magic` stays light.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .errors import ConfigError

MiB = 2**20
GiB = 2**30


@dataclass(frozen=True)
class GpuSpec:
    """A GPU model notebooks commonly run on.

    Args:
        name: Short name shown to users ("T4", "A100").
        memory_mib: Memory as the driver reports it (nvidia-smi's total, in MiB), per variant of the card.
        bf16: Whether the chip computes in bfloat16 (Ampere, compute capability 8.0, and later).
        capability: CUDA compute capability.
        pattern: Regular expression matched against `torch.cuda.get_device_name()`.
        peak_tflops: Dense 16-bit (fp16/bf16) tensor throughput from the vendor's data sheet, without sparsity
            (SXM variants where there are several): the denominator of model FLOPs utilisation.
    """

    name: str
    memory_mib: tuple
    bf16: bool
    capability: tuple
    pattern: str
    peak_tflops: float = 0.0


# Totals are what `nvidia-smi` shows on these cards (a "16 GB" T4 reports 15360 MiB); free memory is less.
KNOWN_GPUS = (
    GpuSpec("T4", (15360,), False, (7, 5), r"\bT4\b", 65.0),
    GpuSpec("P100", (16280,), False, (6, 0), r"\bP100\b", 18.7),
    GpuSpec("V100", (16384, 32768), False, (7, 0), r"\bV100\b", 125.0),
    GpuSpec("L4", (23034,), True, (8, 9), r"\bL4\b", 121.0),
    GpuSpec("A10G", (23028,), True, (8, 6), r"\bA10G\b", 70.0),
    GpuSpec("A10", (23028,), True, (8, 6), r"\bA10\b(?!G)", 125.0),
    GpuSpec("L40S", (46068,), True, (8, 9), r"\bL40S\b", 362.0),
    GpuSpec("A100", (40960, 81920), True, (8, 0), r"\bA100\b", 312.0),
    GpuSpec("H100", (81559,), True, (9, 0), r"\bH100\b", 989.0),
    GpuSpec("H200", (143771,), True, (9, 0), r"\bH200\b", 989.0),
)


@dataclass
class DeviceInfo:
    """The device a run trains on.

    Args:
        kind: "cpu", "cuda" or "mps".
        name: Device name as the driver reports it (or the CPU model).
        total_memory: Bytes of device memory (RAM on CPU).
        free_memory: Bytes free now (`torch.cuda.mem_get_info` on GPU; available RAM on CPU).
        bf16: Whether the device computes in bfloat16.
        capability: CUDA compute capability, None off CUDA.
    """

    kind: str
    name: str
    total_memory: int
    free_memory: int
    bf16: bool = False
    capability: tuple | None = None

    @property
    def label(self) -> str:
        """Short name for one-line summaries: "T4", "A100", "CPU RAM"."""
        if self.kind == "cpu":
            return "CPU RAM"
        spec = match_gpu(self.name, self.total_memory)
        return spec.name if spec else self.name


def match_gpu(name: str, total_memory: int | None = None) -> GpuSpec | None:
    """The `KNOWN_GPUS` entry whose pattern matches `name` (e.g. "Tesla T4"), or None."""
    for spec in KNOWN_GPUS:
        if re.search(spec.pattern, name or "", flags=re.IGNORECASE):
            return spec
    return None


def known_device(name: str, memory_gb: float | None = None, free_memory: int | None = None) -> DeviceInfo:
    """A `DeviceInfo` for a GPU from `KNOWN_GPUS`, to plan for a device you do not have (or to test).

    Args:
        name: A name in `KNOWN_GPUS` ("T4", "a100"), case-insensitive.
        memory_gb: Which memory variant (e.g. 40 or 80 for an A100); the smallest when omitted.
        free_memory: Free bytes to assume; the whole card when omitted.
    """
    spec = next((s for s in KNOWN_GPUS if s.name.lower() == str(name).lower()), None)
    if spec is None:
        raise ConfigError(f"unknown GPU '{name}'. Known: {', '.join(s.name for s in KNOWN_GPUS)}.", key="device")
    sizes = sorted(spec.memory_mib)
    mib = sizes[0] if memory_gb is None else min(sizes, key=lambda m: abs(m / 1024 - memory_gb))
    total = mib * MiB
    return DeviceInfo("cuda", f"NVIDIA {spec.name}", total, total if free_memory is None else free_memory,
                      spec.bf16, spec.capability)  # fmt: skip


def device_info() -> DeviceInfo:
    """Describe the device training will use: the current CUDA GPU, else Apple MPS, else the CPU."""
    import torch

    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        return DeviceInfo(
            "cuda",
            torch.cuda.get_device_name(index),
            int(total),
            int(free),
            bool(torch.cuda.is_bf16_supported()),
            tuple(torch.cuda.get_device_capability(index)),
        )
    total, free = ram()
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        # Unified memory: the GPU gets what Metal recommends, minus what torch already holds there.
        limit = int(torch.mps.recommended_max_memory()) if hasattr(torch.mps, "recommended_max_memory") else total
        used = int(torch.mps.driver_allocated_memory()) if hasattr(torch.mps, "driver_allocated_memory") else 0
        return DeviceInfo("mps", "Apple MPS", limit, max(0, min(free, limit - used)), bf16=False)
    return DeviceInfo("cpu", _cpu_name(), total, free, bf16=cpu_bf16(cpu_flags()))


# x86 instruction sets that compute in bfloat16 natively (Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4
# and later). torch's CPU autocast uses them through oneDNN; without them bf16 is emulated and slower than float32.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# Tasks whose training loss under CPU bf16 autocast was measured to stay within 1% of float32
# (tests/test_precision.py, docs/benchmarks.md). Preference objectives compare log-probabilities of two models
# (differences of sums over whole answers), where bf16's 8-bit mantissa matters more: they keep float32 on `auto`.
CPU_BF16_TASKS = ("causal-lm", "seq-cls", "token-cls")
# Below this width bf16 autocast is slower than float32 on CPU: the casts around each matmul cost more than the
# bf16 matmul saves (hidden 64: 0.84x; 128: 2.3x; 256: 2.9x for a stack of Linear layers, one thread, this
# repository's benchmark machine). 256: where a whole model was measured faster (1.5x, docs/benchmarks.md).
CPU_BF16_MIN_HIDDEN = 256


def cpu_flags() -> frozenset:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none: macOS, Windows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_bf16(flags) -> bool:
    """Whether a CPU with these flags computes in bfloat16 natively (AVX-512 BF16 or AMX-BF16)."""
    return any(f in flags for f in BF16_CPU_FLAGS)


def ram() -> tuple:
    """(total, available) bytes of RAM for this process, honouring a container's cgroup limit."""
    total = free = None
    try:
        import psutil  # optional: used when the user has it, never required

        vm = psutil.virtual_memory()
        total, free = int(vm.total), int(vm.available)
    except ImportError:
        info = {}
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    info[key] = int(rest.split()[0]) * 1024
            total, free = info["MemTotal"], info.get("MemAvailable", info.get("MemFree", 0))
        except (OSError, KeyError, ValueError, IndexError):
            pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
            total = free = pages * size
    limit = _cgroup_limit()
    if limit is not None:
        limit_total, limit_free = limit
        total, free = min(total, limit_total), min(free, limit_free)
    return total, free


def _cgroup_limit() -> tuple | None:
    """(limit, limit - usage) from cgroup v2 or v1, when the container sets a memory limit."""
    for max_path, cur_path in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(max_path) as f:
                raw = f.read().strip()
            if raw == "max" or int(raw) >= 2**60:  # v1 writes a huge number for "no limit"
                return None
            with open(cur_path) as f:
                used = int(f.read().strip())
            return int(raw), max(0, int(raw) - used)
        except (OSError, ValueError):
            continue
    return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "CPU"


def resolve_mixed_precision(setting: str, info: DeviceInfo, task: str | None = None, model_config=None) -> str:
    """Turn `train.mixed_precision` into what accelerate accepts: "no", "fp16" or "bf16".

    auto picks bf16 where the device supports it, fp16 on GPUs without bf16 (T4, P100, V100); on a CPU, bf16
    autocast where it has native bf16 (`BF16_CPU_FLAGS`), the task is one of `CPU_BF16_TASKS` and the model's
    hidden size is at least `CPU_BF16_MIN_HIDDEN`; float32 otherwise (MPS: float32). An explicit choice the device
    cannot run raises a `ConfigError` naming the fix.

    Args:
        setting: "auto", "no", "fp16" or "bf16".
        info: The device, from `device_info()` or `known_device()`.
        task: The run's task (`config.TASKS`); decides `auto` on a CPU.
        model_config: The model's transformers config (its hidden size decides `auto` on a CPU); None: unknown,
            taken as large enough.
    """
    return precision_choice(setting, info, task, model_config)[0]


def hidden_size(model_config) -> int | None:
    """The width of the model's hidden states, whatever its config calls it (None when it says none)."""
    for name in ("hidden_size", "d_model", "n_embd", "dim"):
        value = getattr(model_config, name, None)
        if isinstance(value, int):
            return value
    return None


def precision_choice(setting: str, info: DeviceInfo, task: str | None = None, model_config=None) -> tuple[str, str]:
    """`resolve_mixed_precision`'s answer and why, for the plan: ("bf16", "bf16 autocast · this CPU has ...")."""
    setting = str(setting).lower()
    if setting == "auto":
        if info.kind == "cuda":
            mode = "bf16" if info.bf16 else "fp16"
            return mode, f"{mode} autocast · auto on {info.label}"
        width = hidden_size(model_config) if model_config is not None else None
        if not info.bf16 or info.kind != "cpu":
            why = "no native bf16 on this device"
        elif task not in CPU_BF16_TASKS:
            why = f"bf16 autocast not measured for {task} on CPU"
        elif width is not None and width < CPU_BF16_MIN_HIDDEN:
            why = f"hidden size {width} < {CPU_BF16_MIN_HIDDEN}: casts cost more than bf16 saves"
        else:
            return "bf16", "bf16 autocast, float32 weights · auto: this CPU computes in bf16 (AVX-512 BF16/AMX)"
        return "no", f"float32 · auto: {why}"
    if setting == "no":
        return "no", "float32 · mixed_precision: no"
    if setting == "bf16" and info.kind == "cuda" and not info.bf16:
        raise ConfigError(
            f"{info.label} has no bfloat16 support. Fix: `mixed_precision: fp16` (or auto).",
            key="train.mixed_precision",
        )
    if setting == "fp16" and info.kind == "cpu":
        raise ConfigError(
            "fp16 mixed precision needs a GPU. Fix: `mixed_precision: no` (or bf16 on a CPU that supports it).",
            key="train.mixed_precision",
        )
    if setting in ("fp16", "bf16"):
        return setting, f"{setting} autocast · mixed_precision: {setting}"
    raise ConfigError(f"unknown value '{setting}'. Use auto, no, fp16 or bf16.", key="train.mixed_precision")


def autocast_type(mixed_precision: str):
    """The torch dtype autocast runs in under a resolved `train.mixed_precision` ("bf16", "fp16"), None for "no"."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(mixed_precision))


def resolve_dtype(setting: str, info: DeviceInfo) -> str:
    """Turn `model.dtype` into a torch dtype name: auto is float32 on CPU/MPS, bf16 (or fp16) on CUDA."""
    setting = str(setting).lower()
    if setting != "auto":
        return setting
    if info.kind == "cuda":
        return "bfloat16" if info.bf16 else "float16"
    return "float32"


def quiet_deepspeed() -> None:
    """Keep DeepSpeed's start-up line out of the cell on a machine without an accelerator.

    When DeepSpeed is installed, Accelerate imports it as soon as a model is unwrapped (every run does), and on a
    CPU-only machine DeepSpeed then logs "Setting accelerator to CPU. If you have GPU...". `DS_ACCELERATOR=cpu`,
    its own setting, says the CPU is meant, which is what it would pick anyway; nothing is set when a GPU (or MPS)
    is there, when DeepSpeed is already imported or absent, or when the user chose a value.
    """
    import importlib.util
    import sys

    if "deepspeed" in sys.modules or os.environ.get("DS_ACCELERATOR") or importlib.util.find_spec("deepspeed") is None:
        return
    import torch

    mps = getattr(torch.backends, "mps", None)
    if torch.cuda.is_available() or (mps is not None and mps.is_available()):
        return
    os.environ["DS_ACCELERATOR"] = "cpu"
