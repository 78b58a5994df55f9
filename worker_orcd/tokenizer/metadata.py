"""Tokenizer metadata from a GGUF file or from an already parsed metadata mapping.

`gguf.GGUFReader` builds one numpy view per array element, which takes seconds for a 151936-token
vocabulary. The tokenizer needs only the key/value section, so we walk it ourselves: a string array
is a sequence of (u64 length, bytes) records and is decoded in one pass over a memory map; numeric
arrays are read with one `np.frombuffer` each. Tensor infos and tensor data are never touched.
"""

from __future__ import annotations

import logging
import mmap
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from worker_orcd.errors import ModelLoadError

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"

# GGUF value types -> numpy dtype for the fixed-size ones (little-endian files only).
_NUMPY_TYPES: dict[int, np.dtype] = {
    0: np.dtype("<u1"),
    1: np.dtype("<i1"),
    2: np.dtype("<u2"),
    3: np.dtype("<i2"),
    4: np.dtype("<u4"),
    5: np.dtype("<i4"),
    6: np.dtype("<f4"),
    7: np.dtype("?"),
    10: np.dtype("<u8"),
    11: np.dtype("<i8"),
    12: np.dtype("<f8"),
}
_STRING, _ARRAY = 8, 9

# llama.cpp token types (tokenizer.ggml.token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def read_gguf_metadata(
    path: str | PathLike[str], prefixes: tuple[str, ...] = ("",)
) -> dict[str, Any]:
    """Read the key/value metadata of a GGUF file (keys starting with one of `prefixes`).

    Scalars become Python values, string arrays lists of str, numeric arrays numpy arrays.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _parse_kv(memoryview(mm), path, prefixes)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read GGUF metadata from {path}: {e}") from e


def _parse_kv(buf: memoryview, path: Path, prefixes: tuple[str, ...]) -> dict[str, Any]:
    try:
        if bytes(buf[:4]) != GGUF_MAGIC:
            raise ModelLoadError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r})")
        (version,) = struct.unpack_from("<I", buf, 4)
        if version not in (2, 3):
            raise ModelLoadError(f"{path}: unsupported GGUF version {version} (expected 2 or 3)")
        _n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        off = 24
        out: dict[str, Any] = {}
        for _ in range(n_kv):
            key, off = _read_str(buf, off)
            (vtype,) = struct.unpack_from("<I", buf, off)
            off += 4
            keep = key.startswith(prefixes)
            value, off = _read_value(buf, off, vtype, keep)
            if keep:
                out[key] = value
        return out
    except (struct.error, IndexError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: truncated or corrupt GGUF metadata ({e})") from e
    finally:
        buf.release()


def _read_str(buf: memoryview, off: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, off)
    off += 8
    if off + n > len(buf):
        raise ModelLoadError(f"string of {n} bytes at offset {off} runs past the end of the file")
    return str(buf[off : off + n], "utf-8"), off + n


def _read_value(buf: memoryview, off: int, vtype: int, keep: bool) -> tuple[Any, int]:
    if vtype == _STRING:
        return _read_str(buf, off)
    if vtype in _NUMPY_TYPES:
        dt = _NUMPY_TYPES[vtype]
        value = np.frombuffer(buf, dtype=dt, count=1, offset=off)[0].item()
        return value, off + dt.itemsize
    if vtype != _ARRAY:
        raise ModelLoadError(f"unknown GGUF value type {vtype} at offset {off}")
    etype, count = struct.unpack_from("<IQ", buf, off)
    off += 12
    if etype in _NUMPY_TYPES:
        dt = _NUMPY_TYPES[etype]
        end = off + dt.itemsize * count
        if end > len(buf):
            raise ModelLoadError(f"array of {count} items at offset {off} runs past the end")
        arr = np.frombuffer(buf, dtype=dt, count=count, offset=off).copy() if keep else None
        return arr, end
    if etype == _STRING:
        return _read_str_array(buf, off, count, keep)
    if etype == _ARRAY:
        items = []
        for _ in range(count):  # each element carries its own element type and count
            item, off = _read_value(buf, off, _ARRAY, keep)
            items.append(item)
        return items, off
    raise ModelLoadError(f"unknown GGUF array element type {etype} at offset {off}")


def _read_str_array(
    buf: memoryview, off: int, count: int, keep: bool
) -> tuple[list[str] | None, int]:
    unpack = struct.Struct("<Q").unpack_from
    spans: list[tuple[int, int]] = []
    for _ in range(count):
        (n,) = unpack(buf, off)
        off += 8
        spans.append((off, off + n))
        off += n
    if off > len(buf):
        raise ModelLoadError(f"string array of {count} items runs past the end of the file")
    if not keep:
        return None, off
    raw = buf.obj  # the mmap: slicing it gives bytes directly
    return [raw[a:b].decode("utf-8", "surrogateescape") for a, b in spans], off


def load_metadata(source: str | PathLike[str] | Mapping[str, Any]) -> Mapping[str, Any]:
    """A path is read for `tokenizer.*` and `general.*` keys; a mapping is used as it is."""
    if isinstance(source, Mapping):
        return source
    return read_gguf_metadata(source, prefixes=("tokenizer.", "general."))


@dataclass(slots=True)
class VocabData:
    """The tokenizer part of GGUF metadata, validated."""

    model: str  # tokenizer.ggml.model: "gpt2" or "llama"
    pre: str | None
    tokens: list[str]
    types: np.ndarray  # int32 [V]
    scores: np.ndarray | None  # float32 [V]
    merges: list[str] | None
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    eot_id: int | None
    eom_id: int | None
    fim_ids: dict[str, int | None]  # fill-in-the-middle: "pre", "suf", "mid", "pad", "rep", "sep"
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    architecture: str | None
    name: str | None  # general.name
    chat_template: str | None

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any]) -> VocabData:
        model = _require(md, "tokenizer.ggml.model")
        if model not in ("gpt2", "llama"):
            raise ModelLoadError(
                f"tokenizer.ggml.model is {model!r}; supported: 'gpt2' (byte-level BPE), "
                "'llama' (SentencePiece)"
            )
        tokens = list(_require(md, "tokenizer.ggml.tokens"))
        n = len(tokens)
        if n == 0:
            raise ModelLoadError("tokenizer.ggml.tokens is empty")
        types = _array(md, "tokenizer.ggml.token_type", n, np.int32)
        if types is None:
            types = np.full(n, NORMAL, dtype=np.int32)
        scores = _array(md, "tokenizer.ggml.scores", n, np.float32)
        merges = md.get("tokenizer.ggml.merges")
        if model == "gpt2" and merges is None:
            raise ModelLoadError("tokenizer.ggml.merges is missing (required for a gpt2 tokenizer)")
        if model == "llama" and scores is None:
            raise ModelLoadError(
                "tokenizer.ggml.scores is missing (required for a llama tokenizer)"
            )
        is_spm = model == "llama"
        pre = md.get("tokenizer.ggml.pre")
        return cls(
            model=model,
            pre=pre,
            tokens=tokens,
            types=types,
            scores=scores,
            merges=list(merges) if merges is not None else None,
            bos_id=_token_id(md, "tokenizer.ggml.bos_token_id", n, 1 if is_spm else None),
            eos_id=_token_id(md, "tokenizer.ggml.eos_token_id", n, 2 if is_spm else None),
            unk_id=_token_id(md, "tokenizer.ggml.unknown_token_id", n, 0 if is_spm else None),
            eot_id=_token_id(md, "tokenizer.ggml.eot_token_id", n, None),
            eom_id=_token_id(md, "tokenizer.ggml.eom_token_id", n, None),
            fim_ids=_fim_ids(md, n),
            # llama.cpp's defaults when the key is absent: BOS for SentencePiece and llama3 BPE.
            add_bos=bool(md.get("tokenizer.ggml.add_bos_token", is_spm or pre == "llama-bpe")),
            add_eos=bool(md.get("tokenizer.ggml.add_eos_token", False)),
            add_space_prefix=bool(md.get("tokenizer.ggml.add_space_prefix", is_spm)),
            architecture=md.get("general.architecture"),
            name=md.get("general.name"),
            chat_template=md.get("tokenizer.chat_template"),
        )


# tokenizer.ggml.fim_{kind}_token_id; the older prefix/suffix/middle keys win when both are set,
# as in llama.cpp, which reads them last.
_FIM_KEYS = {
    "pre": ("fim_pre", "prefix"),
    "suf": ("fim_suf", "suffix"),
    "mid": ("fim_mid", "middle"),
    "pad": ("fim_pad",),
    "rep": ("fim_rep",),
    "sep": ("fim_sep",),
}


def _fim_ids(md: Mapping[str, Any], n: int) -> dict[str, int | None]:
    ids: dict[str, int | None] = {}
    for kind, names in _FIM_KEYS.items():
        ids[kind] = None
        for name in names:
            value = _token_id(md, f"tokenizer.ggml.{name}_token_id", n, None)
            if value is not None:
                ids[kind] = value
    return ids


def _require(md: Mapping[str, Any], key: str) -> Any:
    if key not in md:
        raise ModelLoadError(f"tokenizer metadata key {key!r} is missing")
    return md[key]


def _array(md: Mapping[str, Any], key: str, n: int, dtype: type) -> np.ndarray | None:
    if key not in md:
        return None
    arr = np.asarray(md[key], dtype=dtype)
    if arr.shape != (n,):
        raise ModelLoadError(
            f"{key} has shape {arr.shape}, expected ({n},) like tokenizer.ggml.tokens"
        )
    return arr


def _token_id(md: Mapping[str, Any], key: str, n: int, default: int | None) -> int | None:
    value = md.get(key, default)
    if value is None:
        return None
    value = int(value)
    if not 0 <= value < n:
        raise ModelLoadError(f"{key} = {value} is outside the vocabulary (0..{n - 1})")
    return value
