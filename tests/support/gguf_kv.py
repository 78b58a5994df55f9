"""Fast GGUF metadata reader (gguf.GGUFReader takes seconds on the 300k-string Qwen vocab)."""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFValueType


def read_metadata(path: str | Path) -> dict[str, tuple[Any, ...]]:
    """All metadata of a GGUF file: key -> (value, type[, array item type]); memory-mapped."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return _parse_kv(data, path)


def _parse_kv(data: mmap.mmap, path: str | Path) -> dict[str, tuple[Any, ...]]:
    magic, version, _n_tensors, n_kv = struct.unpack_from("<4sIQQ", data, 0)
    if magic != b"GGUF" or version not in (2, 3):
        raise ValueError(f"{path}: not a GGUF v2/v3 file")
    pos = 24
    out: dict[str, tuple[Any, ...]] = {}
    for _ in range(n_kv):
        key, pos = _read_str(data, pos)
        vtype = GGUFValueType(struct.unpack_from("<I", data, pos)[0])
        pos += 4
        if vtype == GGUFValueType.ARRAY:
            itype = GGUFValueType(struct.unpack_from("<I", data, pos)[0])
            (n,) = struct.unpack_from("<Q", data, pos + 4)
            pos += 12
            if itype == GGUFValueType.STRING:
                items: list[Any] = []
                for _ in range(n):
                    item, pos = _read_str(data, pos)
                    items.append(item)
            else:
                dtype = np.dtype(_SCALARS[itype])
                items = np.frombuffer(data, dtype, n, pos).tolist()
                pos += n * dtype.itemsize
            value: tuple[Any, ...] = (items, vtype, itype)
        elif vtype == GGUFValueType.STRING:
            text, pos = _read_str(data, pos)
            value = (text, vtype)
        else:
            (scalar,) = struct.unpack_from("<" + _SCALARS[vtype], data, pos)
            pos += struct.calcsize(_SCALARS[vtype])
            value = (bool(scalar) if vtype == GGUFValueType.BOOL else scalar, vtype)
        out[key] = value
    return out


_SCALARS = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}


def _read_str(data: mmap.mmap, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", data, pos)
    return data[pos + 8 : pos + 8 + n].decode("utf-8"), pos + 8 + n
