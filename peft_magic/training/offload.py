"""Frozen float32 weights on disk while a bf16/fp16 run on CPU multiplies with their 16-bit copies.

training/frozen_casts.py gives each frozen linear layer a 16-bit copy of its weight for the run; the float32
weight is then not read until the run ends (a forward under autocast multiplies with the copy). `offload_originals`
moves those weights into a private mapping of an unlinked temporary file, read on demand, for the run: 4 bytes per
frozen linear weight off its resident memory (0.42 GB for SmolLM2-135M, 4 GB for a 1B model), for one write of
them when the run starts (to the page cache: ~0.3 s per GB). The tensors keep their dtype, shape and values;
anything that reads one (a float32 forward outside autocast, a merge) reads the file, and `page_out` gives those
pages back afterwards; anything that writes one (a checkpoint's load) writes to private memory (the mapping is
copy-on-write). A weight that was itself mapped from its checkpoint (safetensors) has its old pages given back too,
since the mapping stays while anything else (the embedding) lives in it. At the end of the run the weights are
copied back into memory, one at a time. Only where a real disk holds the temporary folder (not tmpfs, whose files
are RAM) with room to spare, on Linux; `PEFT_MAGIC_OFFLOAD=0` turns it off.
"""

from __future__ import annotations

RAM_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "devtmpfs", "shm"})


def _filesystem(path: str, mounts: str = "/proc/mounts") -> str | None:
    """The type of the filesystem holding `path` (the longest mount point above it), None when unknown."""
    import os

    path, best, kind = os.path.realpath(path), "", None
    try:
        with open(mounts) as fh:
            rows = [line.split() for line in fh]
    except OSError:
        return None
    for row in rows:
        if len(row) >= 3:
            point = row[1].replace("\\040", " ")
            if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                best, kind = point, row[2]
    return kind


def offload_folder(nbytes: int) -> str | None:
    """A temporary folder on a disk with room for `nbytes` and some to spare, or None (not Linux, off, tmpfs)."""
    import os
    import shutil
    import sys
    import tempfile

    from ..allocator import env_off

    if not sys.platform.startswith("linux") or env_off("PEFT_MAGIC_OFFLOAD"):
        return None
    for folder in (tempfile.gettempdir(), "/var/tmp"):
        kind = _filesystem(folder)
        if kind is None or kind in RAM_FILESYSTEMS or not os.access(folder, os.W_OK):
            continue
        try:
            if shutil.disk_usage(folder).free > 2 * nbytes + (1 << 30):
                return folder
        except OSError:
            continue
    return None


def offload_originals(modules) -> callable:
    """Move the float32 weights of `modules` (CPU layers multiplying with their 16-bit copies) into a private
    mapping of an unlinked temporary file; returns what copies them back into memory."""
    import os
    import tempfile

    import torch

    moved = [m for m in modules if m.weight.device.type == "cpu" and m.weight.is_contiguous()]
    total = sum(m.weight.numel() for m in moved)
    folder = offload_folder(4 * total) if total else None
    if folder is None:
        return lambda: None
    fd, path = tempfile.mkstemp(prefix="peft_magic-frozen-", suffix=".f32", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            for m in moved:
                fh.write(m.weight.detach().numpy().data)
        mapped = torch.from_file(path, shared=False, size=total, dtype=torch.float32)
    except (OSError, RuntimeError):
        return lambda: None
    finally:
        os.unlink(path)  # the mapping keeps the file's pages until it goes
    offset, files = 0, _file_mappings()
    for m in moved:
        n, old = m.weight.numel(), m.weight.data
        m.weight.data = mapped[offset : offset + n].view_as(m.weight)
        offset += n
        # a weight mapped from its checkpoint (safetensors) stays resident while anything else holds that mapping
        # (the embedding does): give its pages back (freed memory of others, kept by the allocator, is not touched)
        if any(start <= old.data_ptr() < end for start, end in files):
            _page_out(old.data_ptr(), 4 * n)
        del old
    ptr = mapped.untyped_storage().data_ptr()
    _MAPPED[ptr] = 4 * total
    del mapped

    def restore():
        _MAPPED.pop(ptr, None)
        for module in moved:
            w = module.weight
            if w.untyped_storage().data_ptr() == ptr:  # still the mapping (not replaced meanwhile)
                view = w.data
                w.data = view.clone()
                _page_out(view.data_ptr(), 4 * view.numel())  # read one weight at a time: no second copy at once

    return restore


def _file_mappings(maps: str = "/proc/self/maps", suffixes: tuple = ()) -> list:
    """(start, end) of this process's mappings of regular files (whose names end with one of `suffixes`, if
    given)."""
    spans = []
    try:
        with open(maps) as fh:
            for line in fh:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[4] != "0" and parts[5].startswith("/"):
                    if suffixes and not parts[5].rstrip("\n").endswith(suffixes):
                        continue
                    start, end = parts[0].split("-")
                    spans.append((int(start, 16), int(end, 16)))
    except OSError:
        pass
    return spans


CHECKPOINT_FILES = (".safetensors", ".gguf", ".bin")


def page_out_checkpoints() -> None:
    """Give back the pages of checkpoint files mapped while loading a model (safetensors maps the whole file and
    the model's tensors live in it until they are replaced; a quantized or converted model reads every page once
    and keeps few, and the mapping stays while any tensor still lives there: 0.4 GB of SmolLM2-135M's 0.54 stayed
    resident after a 4-bit load). Only clean file pages go (read again from the file, or the page cache, when
    used); written ones stay. A no-op off Linux."""
    for start, end in _file_mappings(suffixes=CHECKPOINT_FILES):
        _page_out(start, end - start)


_MAPPED: dict = {}  # address -> bytes of the live mappings of float32 originals
MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now (clean file pages dropped, written ones kept)


def _page_out(address: int, nbytes: int) -> None:
    """MADV_PAGEOUT over the pages holding [address, address + nbytes): file pages not written are dropped (read
    again from the file when needed), anything else stays (without swap). A no-op where the kernel lacks it."""
    global _MADVISE
    if _MADVISE is None:
        import ctypes

        try:
            _MADVISE = ctypes.CDLL(None, use_errno=True).madvise
            _MADVISE.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        except (OSError, AttributeError):
            _MADVISE = False
    if not _MADVISE or nbytes <= 0:
        return
    start = address - address % PAGE
    _MADVISE(start, address + nbytes - start, MADV_PAGEOUT)


_MADVISE = None
PAGE = 4096


def page_out() -> None:
    """Give back the RAM of float32 originals read during the run (a float32 forward outside autocast, such as the
    chunked loss's one check of the first batch): their pages are the file's, read again if needed. Pages written
    during the run stay (MADV_PAGEOUT drops clean file pages only, where there is no swap). Silent where the kernel
    has no MADV_PAGEOUT."""
    for address, nbytes in list(_MAPPED.items()):
        _page_out(address, nbytes)
