"""Streaming safetensors I/O: read one memory-mapped tensor at a time, write tensors as they are produced.

The `safetensors` package reads bfloat16 only into torch/flax and writes only whole dicts; a checkpoint of a
few GB must never sit twice in host memory, so we read and write the (simple, documented) format directly.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

from kimina_jax.errors import KiminaError

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsFile:
    """A memory-mapped safetensors file: `names`, `shape(name)`, `read(name)` (a view, no copy)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise KiminaError(f"{self.path}: not a readable safetensors file ({err})") from err
        if not isinstance(header, dict):
            raise KiminaError(f"{self.path}: not a safetensors file (its header is not a JSON object)")
        header.pop("__metadata__", None)
        self._entries = header
        self._data_start = 8 + header_len
        try:
            end = max((int(e["data_offsets"][1]) for e in header.values()), default=0)
        except (TypeError, KeyError, IndexError, ValueError) as err:
            raise KiminaError(f"{self.path}: not a safetensors file (a tensor entry has no data_offsets)") from err
        size = self.path.stat().st_size
        if size < self._data_start + end:
            raise KiminaError(f"{self.path}: truncated ({size} bytes; its header describes {self._data_start + end}): "
                              "copy or download it again")
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def read(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise KiminaError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        raw = self._mmap[self._data_start + begin : self._data_start + end]
        return raw.view(dtype).reshape(entry["shape"])


def write_safetensors(
    path: str | Path,
    specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
    produce: Callable[[str], np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Writes tensors named in `specs` (name, shape, dtype), calling `produce(name)` for each in turn."""
    specs = list(specs)
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype in specs:
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section must start 8-byte aligned
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in specs:
            array = np.ascontiguousarray(produce(name), dtype=dtype)
            if array.shape != tuple(shape):
                raise ValueError(f"tensor {name}: produced shape {array.shape}, declared {tuple(shape)}")
            f.write(array.tobytes())
    tmp.replace(path)
