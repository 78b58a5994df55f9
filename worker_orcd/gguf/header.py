"""Parse and validate a GGUF header (v2/v3): metadata key/values and the tensor table.

We parse the header ourselves instead of going through `gguf.GGUFReader` for two reasons: the
reader builds one numpy view per array element (~10 s for the Qwen vocabulary and merges), and it
reports corrupt input as raw `ValueError`/`KeyError`/numpy errors. Here every read is bounds-checked
and every problem becomes a `ModelLoadError` that says what is wrong and where. The `gguf` package
still supplies the constants (value types, quant types, block sizes).

Layout (little-endian):

    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x       (string key, u32 value_type, value)
    n_tensors x  (string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset)
    padding to `general.alignment` (default 32)
    tensor data: each tensor at data_start + offset

string = u64 length + utf-8 bytes; array = u32 item_type + u64 count + items.
"""

from __future__ import annotations

import logging
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from worker_orcd.errors import ModelLoadError

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_TENSORS = 65536
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32
_MAX_ARRAY_DEPTH = 4
# Smallest possible encodings, used to reject counts that cannot fit in the file.
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, 1-byte key, value type, 1-byte value
# name length, 1-byte name, n_dims, one ne, type, offset
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8

_SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
    GGUFValueType.BOOL: "<?",
}
_NUMPY_DTYPES: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<u1",
    GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4",
    GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8",
    GGUFValueType.BOOL: "<u1",
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class RawTensorInfo:
    """A tensor-table entry as stored: `ne` innermost first, `offset` relative to the data start."""

    name: str
    type_id: int
    ne: tuple[int, ...]
    offset: int


@dataclass(slots=True)
class Header:
    version: int
    metadata: dict[str, Any]
    value_types: dict[str, GGUFValueType]
    tensors: list[RawTensorInfo]
    alignment: int
    data_start: int
    file_size: int = 0
    # Keys whose values are arrays (for reports: the element type of each).
    array_types: dict[str, GGUFValueType] = field(default_factory=dict)


class _Cursor:
    """Sequential bounds-checked reads; errors name the file and what was being read."""

    __slots__ = ("buf", "pos", "size", "label")

    def __init__(self, buf: memoryview, label: str):
        self.buf = buf
        self.pos = 0
        self.size = len(buf)
        self.label = label

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise ModelLoadError(
                f"{self.label}: truncated file: header ends while reading {what} "
                f"(needs {n} bytes at offset {self.pos}, file has {self.size} bytes)"
            )

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self, what: str) -> str:
        n = self.u64(f"the length of {what}")
        self.need(n, what)
        start = self.pos
        self.pos += n
        try:
            return str(self.buf[start : self.pos], "utf-8")
        except UnicodeDecodeError as e:
            raise ModelLoadError(f"{self.label}: {what} is not valid UTF-8 ({e.reason})") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        try:
            t = GGUFValueType(vtype)
        except ValueError:
            raise ModelLoadError(f"{self.label}: unknown value type {vtype} for {what}") from None
        fmt = _SCALAR_FORMATS.get(t)
        if fmt is not None:
            n = struct.calcsize(fmt)
            self.need(n, what)
            (v,) = struct.unpack_from(fmt, self.buf, self.pos)
            self.pos += n
            return v
        if t == GGUFValueType.STRING:
            return self.string(what)
        # ARRAY
        if depth >= _MAX_ARRAY_DEPTH:
            raise ModelLoadError(f"{self.label}: arrays nested too deeply in {what}")
        item_type = self.u32(f"the item type of {what}")
        count = self.u64(f"the length of {what}")
        try:
            it = GGUFValueType(item_type)
        except ValueError:
            raise ModelLoadError(
                f"{self.label}: unknown value type {item_type} for the items of {what}"
            ) from None
        dtype = _NUMPY_DTYPES.get(it)
        if dtype is not None:  # numeric arrays: one numpy read
            nbytes = count * np.dtype(dtype).itemsize
            self.need(nbytes, what)
            arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
            self.pos += nbytes
            if it == GGUFValueType.BOOL:
                return [bool(x) for x in arr.tolist()]
            return arr.tolist()
        if it == GGUFValueType.STRING:
            # Each string takes at least its 8-byte length: reject absurd counts before looping.
            self.need(count * 8, what)
            return self._strings(count, what)
        self.need(count * 12, what)  # each nested array holds at least its type and length
        return [self.value(item_type, f"{what}[{i}]", depth + 1) for i in range(count)]

    def _strings(self, count: int, what: str) -> list[str]:
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        out: list[str] = []
        append = out.append
        try:
            for _ in range(count):
                (n,) = unpack(buf, pos)
                pos += 8
                if pos + n > size:
                    self.pos = pos
                    self.need(n, f"{what}[{len(out)}]")
                append(str(buf[pos : pos + n], "utf-8"))
                pos += n
        except struct.error:
            self.pos = pos
            self.need(8, f"the length of {what}[{len(out)}]")
        except UnicodeDecodeError as e:
            raise ModelLoadError(
                f"{self.label}: {what}[{len(out)}] is not valid UTF-8 ({e.reason})"
            ) from None
        self.pos = pos
        return out


def parse_header(buf: memoryview, label: str) -> Header:
    """Parse and validate everything up to the tensor data. `label` names the file in errors."""
    c = _Cursor(buf, label)
    size = c.size
    if size < 4:
        raise ModelLoadError(f"{label}: truncated file: {size} bytes is too short for GGUF")
    magic = bytes(buf[:4])
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"{label}: not a GGUF file (bad magic {magic!r}, expected b'GGUF')")
    c.pos = 4
    version = c.u32("the version")
    if version not in SUPPORTED_VERSIONS:
        if int.from_bytes(version.to_bytes(4, "little"), "big") in SUPPORTED_VERSIONS:
            raise ModelLoadError(f"{label}: big-endian GGUF files are not supported")
        raise ModelLoadError(
            f"{label}: unsupported GGUF version {version} (supported: "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))})"
        )
    n_tensors = c.u64("the tensor count")
    n_kv = c.u64("the metadata key count")
    if n_tensors > MAX_TENSORS:
        raise ModelLoadError(f"{label}: too many tensors: {n_tensors} (limit {MAX_TENSORS})")
    if n_kv * _MIN_KV_BYTES > size - c.pos:
        raise ModelLoadError(
            f"{label}: too many metadata keys: a count of {n_kv} needs at least "
            f"{n_kv * _MIN_KV_BYTES} bytes but the file has {size} (corrupt count or truncated "
            "file)"
        )

    metadata: dict[str, Any] = {}
    value_types: dict[str, GGUFValueType] = {}
    array_types: dict[str, GGUFValueType] = {}
    for i in range(n_kv):
        key = c.string(f"metadata key #{i}")
        vtype = c.u32(f"the value type of '{key}'")
        if key in metadata:
            raise ModelLoadError(f"{label}: duplicate metadata key '{key}'")
        start = c.pos
        metadata[key] = c.value(vtype, f"metadata '{key}'")
        value_types[key] = GGUFValueType(vtype)
        if vtype == GGUFValueType.ARRAY:
            array_types[key] = GGUFValueType(_U32.unpack_from(buf, start)[0])

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if "general.alignment" in metadata and (
        value_types["general.alignment"] != GGUFValueType.UINT32
        or alignment == 0
        or alignment & (alignment - 1)
    ):
        raise ModelLoadError(
            f"{label}: metadata 'general.alignment' must be a non-zero power of two (u32), "
            f"got {alignment!r}"
        )

    if n_tensors * _MIN_TENSOR_INFO_BYTES > size - c.pos:
        raise ModelLoadError(
            f"{label}: too many tensors: a tensor count of {n_tensors} is implausible, its table "
            f"needs at least {n_tensors * _MIN_TENSOR_INFO_BYTES} bytes but only {size - c.pos} "
            f"remain after the metadata (corrupt count or truncated file)"
        )
    tensors: list[RawTensorInfo] = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = c.string(f"the name of tensor #{i}")
        n_dims = c.u32(f"the dimension count of tensor '{name}'")
        if not 1 <= n_dims <= MAX_DIMS:
            raise ModelLoadError(
                f"{label}: tensor '{name}' has {n_dims} dimensions (expected 1 to {MAX_DIMS})"
            )
        ne = tuple(c.u64(f"the shape of tensor '{name}'") for _ in range(n_dims))
        type_id = c.u32(f"the type of tensor '{name}'")
        offset = c.u64(f"the data offset of tensor '{name}'")
        if name in names:
            raise ModelLoadError(f"{label}: duplicate tensor '{name}'")
        names.add(name)
        tensors.append(RawTensorInfo(name, type_id, ne, offset))

    data_start = -(-c.pos // alignment) * alignment
    return Header(
        version=version,
        metadata=metadata,
        value_types=value_types,
        tensors=tensors,
        alignment=alignment,
        data_start=data_start,
        file_size=size,
        array_types=array_types,
    )


def tensor_nbytes(label: str, t: RawTensorInfo) -> tuple[GGMLQuantizationType, int]:
    """The tensor's quant type and byte size; rejects unknown types and partial blocks."""
    try:
        qtype = GGMLQuantizationType(t.type_id)
    except ValueError:
        raise ModelLoadError(
            f"{label}: tensor '{t.name}' has unknown ggml type id {t.type_id}"
        ) from None
    if qtype not in GGML_QUANT_SIZES:
        raise ModelLoadError(f"{label}: tensor '{t.name}' has unsupported type {qtype.name}")
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if any(d == 0 for d in t.ne):
        raise ModelLoadError(f"{label}: tensor '{t.name}' has an empty dimension: ne={list(t.ne)}")
    if t.ne[0] % block_size:
        raise ModelLoadError(
            f"{label}: tensor '{t.name}' rows of {t.ne[0]} values are not a whole number of "
            f"{qtype.name} blocks of {block_size}"
        )
    return qtype, math.prod(t.ne) // block_size * type_size
