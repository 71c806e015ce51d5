"""glibc's free heap pages given back at each block of a CPU run.

A process on glibc's malloc (a notebook kernel, as most are started) serves the tensors of a training step under its
mmap threshold (which grows to 32 MB as big blocks are freed) from its heap. A block's temporaries, freed between
the tensors it keeps for backward, leave holes that the next block's tensors of other sizes do not fit, and glibc
keeps them resident: on SmolLM2-135M + LoRA under bf16 (8 x 497 tokens) the process peaked at 4.6 GB where
tcmalloc, which reuses such holes, peaked at 3.0 (allocator.py; tcmalloc can only be chosen when a process starts).

`trim_between_blocks(model, device)` calls `malloc_trim(0)` as each transformer block starts its forward and its
backward: glibc then gives the free pages inside its heap back to the system (`MADV_DONTNEED`), so what is resident
follows what is live. Measured on that job: peak 3.2 GB. A fixed mmap threshold (`mallopt`) gets there too but maps
and faults every large tensor afresh (a step took ~1.9x as long); trimming at 60 points of a step refaults only the
holes reused. Linux with glibc's malloc, CPU runs; a no-op under tcmalloc/jemalloc/mimalloc, elsewhere, and with
`PEFT_MAGIC_TRIM=0`.

Every block costs a step ~29% more time (1 torch thread: 124 against 173 tok/s, 2.92 against 4.59 GB peak): the
holes given back are mostly reused by the next block and fault in again. So the trim runs at every `EVERY`-th of
those points (`PEFT_MAGIC_TRIM_EVERY` sets it): every 4th measured 3.04 GB against 2.87 (every one) and 3.78
(none) with ~a third of the page faults (probe of 3 steps; the time cost not yet measured cleanly).
"""

from __future__ import annotations

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
    """Trim glibc's heap as each of `model`'s transformer blocks starts its forward and its backward, for a run on
    `device`; returns what removes the hooks (a no-op when nothing applies)."""
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
    import os

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
