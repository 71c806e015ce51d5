"""glibc's free heap pages given back between the blocks of a CPU run.

A process on glibc's malloc (a notebook kernel, as most are started) serves the tensors of a training step under its
mmap threshold (which grows to 32 MB as big blocks are freed) from its heap. Each block of the forward leaves ~35 MB
of freed temporaries, fenced in by the tensors kept for backward, that later blocks do not reuse (mallinfo2 per
block), and glibc keeps them resident: on SmolLM2-135M + LoRA under bf16 (8 x 497 tokens) the process peaked at
4.6 GB where tcmalloc, which reuses such holes, peaked at 3.0 (allocator.py; tcmalloc can only be chosen when a
process starts).

`trim_between_blocks(model, device)` calls `malloc_trim(0)` at block boundaries (a block starting its forward or its
backward): glibc gives the free pages inside its heap back (`MADV_DONTNEED`), so what is resident follows what is
live. At every boundary: 2.92 GB against 4.59, but a step took ~1.4x as long (1 torch thread, 124 against 173
tok/s), the pages given back being mostly reused by the next block and faulted in again. So it trims at every
`EVERY`-th boundary (`PEFT_MAGIC_TRIM_EVERY` sets it): every 4th peaked at 3.08 GB against 4.40 untrimmed for
6.5% of the speed (benchmarks/sft_real.py, 116 against 124 tok/s). A fixed mmap threshold (`mallopt`) got to
3.2 GB at ~1.9x the step time. Linux with glibc's malloc, CPU runs; a no-op under tcmalloc/jemalloc/mimalloc,
elsewhere, and with `PEFT_MAGIC_TRIM=0`.
"""

from __future__ import annotations

import os

EVERY = 4  # trim at every 4th block boundary (see above)


def _malloc_trim():
    """libc's `malloc_trim` when this process runs glibc's malloc on Linux and trimming is wanted, else None."""
    from ..allocator import trims_heap

    if not trims_heap():
        return None
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl has no malloc_trim
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def trim_between_blocks(model, device) -> callable:
    """Trim glibc's heap at every `EVERY`-th point where one of `model`'s transformer blocks starts its forward or its
    backward, for a run on `device`; returns what removes the hooks (a no-op when nothing applies)."""
    if getattr(device, "type", str(device)) != "cpu":
        return lambda: None
    trim = _malloc_trim()
    if trim is None:
        return lambda: None
    from ..errors import ConfigError
    from ..methods.selective import find_block_lists

    try:
        lists = find_block_lists(model)
    except ConfigError:  # no repeated blocks: nothing to trim between
        return lambda: None
    every = max(1, int(os.environ.get("PEFT_MAGIC_TRIM_EVERY", EVERY)))
    count = [0]

    def maybe(*_):
        count[0] += 1
        if count[0] % every == 0:
            trim(0)

    def before_forward(module, args):
        maybe()
        return None

    def after_forward(module, args, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        if getattr(out, "requires_grad", False):
            out.register_hook(maybe)  # the block's backward starts here

    handles = []
    for _, blocks in lists:
        for block in blocks:
            handles += [block.register_forward_pre_hook(before_forward), block.register_forward_hook(after_forward)]

    def release():
        for h in handles:
            h.remove()

    return release
