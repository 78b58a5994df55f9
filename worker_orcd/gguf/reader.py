"""`GGUFFile`: a validated, memory-mapped GGUF model file.

    with GGUFFile.open(path) as f:
        f.architecture, f.get("qwen2.block_count")
        w = f.load("blk.0.attn_q.weight", device="cuda")   # dequantized, torch order [out, in]

Shapes are in torch order (outermost first): GGUF stores `ne` innermost first, so `token_embd`
with ne=[896, 151936] has shape (151936, 896). All validation happens in `open`, so a file that
opens can be loaded tensor by tensor without surprises.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType

from worker_orcd.errors import ModelLoadError
from worker_orcd.gguf.dequant import DEQUANTIZERS, dequantize
from worker_orcd.gguf.header import Header, parse_header, tensor_nbytes

logger = logging.getLogger(__name__)

_MISSING = object()


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor: `shape` in torch order, `offset` the absolute byte offset in the file."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    n_bytes: int
    offset: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


class GGUFFile:
    """A GGUF file opened read-only through a memory map. Use `GGUFFile.open`."""

    def __init__(self, path: Path, data: np.memmap, header: Header, tensors: dict[str, TensorInfo]):
        self.path = path
        self.version = header.version
        self.alignment = header.alignment
        self.data_start = header.data_start
        self.file_size = header.file_size
        self.metadata: Mapping[str, Any] = MappingProxyType(header.metadata)
        self.value_types: Mapping[str, GGUFValueType] = MappingProxyType(header.value_types)
        self.array_types: Mapping[str, GGUFValueType] = MappingProxyType(header.array_types)
        self.tensors = tensors
        self._data: np.memmap | None = data
        self.architecture: str = self.require("general.architecture")
        if not isinstance(self.architecture, str):
            raise ModelLoadError(f"{path}: metadata 'general.architecture' must be a string")

    @classmethod
    def open(cls, path: str | Path, *, allow_unsupported_types: bool = False) -> GGUFFile:
        """Map and validate `path`. Raises ModelLoadError naming the problem.

        `allow_unsupported_types` lets tools that only describe a file (inspect) open files holding
        quant types we cannot dequantize; `load` still refuses those tensors.
        """
        path = Path(path)
        try:
            size = path.stat().st_size
            # Copy-on-write: pages are shared with the page cache, and torch gets writable views
            # without ever being able to change the file.
            data = np.memmap(path, dtype=np.uint8, mode="c") if size else np.zeros(0, np.uint8)
        except OSError as e:
            raise ModelLoadError(f"cannot open model file {path}: {e.strerror or e}") from e
        header = parse_header(memoryview(data), str(path))
        tensors = _tensor_table(str(path), header, allow_unsupported_types)
        f = cls(path, data, header, tensors)
        logger.debug(
            "opened %s: GGUF v%d, %s, %d tensors", path, f.version, f.architecture, len(tensors)
        )
        return f

    # -- metadata ---------------------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        value = self.metadata.get(key, _MISSING)
        if value is _MISSING:
            raise ModelLoadError(f"{self.path}: missing required metadata key '{key}'")
        return value

    # -- tensors ----------------------------------------------------------------------------------

    def require_tensor(self, name: str, shape: tuple[int, ...] | None = None) -> TensorInfo:
        """The tensor `name`, checked against the torch-order `shape` the config expects."""
        info = self.tensors.get(name)
        if info is None:
            raise ModelLoadError(f"{self.path}: missing tensor '{name}'")
        if shape is not None and tuple(shape) != info.shape:
            raise ModelLoadError(
                f"{self.path}: tensor '{name}' has shape {info.shape} "
                f"but the config expects {tuple(shape)}"
            )
        return info

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view of the memory map (no copy)."""
        view = self._raw(name)[...]
        view.flags.writeable = False
        return view

    def view(self, name: str) -> torch.Tensor:
        """The tensor's bytes as a uint8 torch tensor over the memory map (no copy). The map is
        copy-on-write, so a write would stay private to this process; nothing is read from disk
        until a page is touched."""
        return torch.from_numpy(self._raw(name))

    def load(
        self, name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Dequantize `name` on `device` (the bytes are copied there first) and cast to `dtype`."""
        info = self.require_tensor(name)
        if info.qtype not in DEQUANTIZERS:
            raise ModelLoadError(
                f"{self.path}: tensor '{name}' has unsupported quant type {info.qtype.name}"
            )
        data = torch.from_numpy(self._raw(name)).to(device)
        out = dequantize(data, info.qtype, info.shape)
        if out.dtype != dtype:
            return out.to(dtype)
        if out.device.type == "cpu" and out.data_ptr() == data.data_ptr():
            # F32 on CPU would alias the memory map: hand out an independent tensor.
            return out.clone()
        return out

    def _raw(self, name: str) -> np.ndarray:
        if self._data is None:
            raise ModelLoadError(f"{self.path}: file is closed")
        info = self.require_tensor(name)
        return self._data[info.offset : info.offset + info.n_bytes]

    # -- lifetime ---------------------------------------------------------------------------------

    def close(self) -> None:
        # Views handed out by raw() keep the mapping alive until they are dropped; that is safe.
        self._data = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors.values())

    def __repr__(self) -> str:
        return (
            f"GGUFFile({str(self.path)!r}, v{self.version}, {self.architecture}, "
            f"{len(self.tensors)} tensors)"
        )


def _tensor_table(label: str, header: Header, allow_unsupported: bool) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for raw in header.tensors:
        qtype, n_bytes = tensor_nbytes(label, raw)
        if qtype not in DEQUANTIZERS and not allow_unsupported:
            supported = ", ".join(t.name for t in DEQUANTIZERS)
            raise ModelLoadError(
                f"{label}: tensor '{raw.name}' has unsupported quant type {qtype.name} "
                f"(supported: {supported})"
            )
        if raw.offset % header.alignment:
            raise ModelLoadError(
                f"{label}: tensor '{raw.name}' data offset {raw.offset} is not a multiple of the "
                f"alignment {header.alignment}"
            )
        start = header.data_start + raw.offset
        tensors[raw.name] = TensorInfo(raw.name, qtype, tuple(reversed(raw.ne)), n_bytes, start)
    _check_data_bounds(label, header, list(tensors.values()))
    return tensors


def _check_data_bounds(label: str, header: Header, tensors: list[TensorInfo]) -> None:
    """Every tensor must lie inside the file.

    A file whose tensors are packed back to back but whose end is missing was cut short (a partial
    download); a tensor whose offset points elsewhere is corruption. The two get different messages.
    """
    size = header.file_size
    outside = [t for t in tensors if t.offset + t.n_bytes > size]
    if not outside:
        return
    ordered = sorted(tensors, key=lambda t: t.offset)
    expected = header.data_start
    packed = True
    for t in ordered:
        if not expected <= t.offset < expected + header.alignment:
            packed = False
            break
        expected = t.offset + t.n_bytes
    if packed:
        end = ordered[-1].offset + ordered[-1].n_bytes
        first = min(outside, key=lambda t: t.offset)
        raise ModelLoadError(
            f"{label}: truncated file: tensor data ends at byte {end} but the file has {size} "
            f"bytes (tensor '{first.name}' is cut off)"
        )
    t = min(outside, key=lambda t: t.offset)
    raise ModelLoadError(
        f"{label}: tensor '{t.name}' data [{t.offset}, {t.offset + t.n_bytes}) lies outside "
        f"the file ({size} bytes)"
    )
