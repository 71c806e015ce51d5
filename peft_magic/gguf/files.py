"""Writing GGUF files tensor by tensor (never the whole model in memory twice), with room checked first, and
atomically: a `.partial` file renamed into place at the end, removed on any failure."""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass
class Planned:
    """One tensor of the file: its GGUF name, numpy shape, GGML type and a function that makes its float32 data."""

    name: str
    shape: tuple
    ggml_type: str
    make: object  # () -> numpy float32 array of `shape`

    @property
    def nbytes(self) -> int:
        import gguf

        qtype = gguf.GGMLQuantizationType[self.ggml_type]
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        n = 1
        for d in self.shape:
            n *= d
        return n // block * size


def check_room(folder: str, nbytes: int, what: str) -> None:
    """Refuse before writing when the disk cannot hold `nbytes` (plus 5% for metadata and alignment)."""
    free = shutil.disk_usage(folder).free
    need = int(nbytes * 1.05) + (1 << 20)
    if free < need:
        raise ConfigError(f"not enough disk space for {what}: it needs {need / 1e9:.2f} GB and '{folder}' has "
                          f"{free / 1e9:.2f} GB free. Fix: free space, export elsewhere, or pick a smaller "
                          "quantization (q4_1, q8_0).", key="gguf")  # fmt: skip


@contextlib.contextmanager
def atomic_file(path: str):
    """Yield a temporary path beside `path`; rename it to `path` when the block succeeds, delete it otherwise."""
    tmp = os.path.join(os.path.dirname(path) or ".", "." + os.path.basename(path) + ".partial")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_gguf(path: str, writer_setup, tensors: list[Planned], arch_name: str, progress=None) -> str:
    """Write a GGUF file: `writer_setup(writer)` adds the metadata, then each tensor is made, quantized and
    written in turn. `progress(done, total, name)` is called after each tensor. Returns `path`."""
    import gguf
    import numpy as np
    from gguf import quants

    folder = os.path.dirname(os.path.abspath(path))
    check_room(folder, sum(t.nbytes for t in tensors), os.path.basename(path))
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch_name, use_temp_file=False)
        try:
            writer_setup(writer)
            for t in tensors:
                qtype = gguf.GGMLQuantizationType[t.ggml_type]
                if t.ggml_type in ("F32", "F16"):
                    dtype = np.float32 if t.ggml_type == "F32" else np.float16
                    writer.add_tensor_info(t.name, t.shape, np.dtype(dtype), t.nbytes)
                else:
                    byte_shape = gguf.quant_shape_to_byte_shape(t.shape, qtype)
                    writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=qtype)
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for i, t in enumerate(tensors):
                data = np.ascontiguousarray(t.make(), dtype=np.float32)
                if data.shape != tuple(t.shape):
                    raise ValueError(f"tensor {t.name}: made {data.shape}, planned {t.shape}")
                if t.ggml_type == "F16":
                    data = data.astype(np.float16)
                elif t.ggml_type != "F32":
                    data = quants.quantize(data, gguf.GGMLQuantizationType[t.ggml_type])
                writer.write_tensor_data(data)
                if progress is not None:
                    progress(i + 1, len(tensors), t.name)
        finally:
            writer.close()
    return path
