"""Shared fixtures.

The real test model and llama.cpp's vocab-only GGUFs (real tokenizer metadata; tests/support/
vocab.py) are fetched into the cache by `make test` before pytest runs, so tests that need them
never skip.
`write_gguf` writes small GGUF files with the reference writer (`gguf.GGUFWriter`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFWriter

from tests.support import vocab
from worker_orcd import hub


@pytest.fixture(scope="session")
def qwen_gguf_path() -> Path:
    """The real Qwen2.5-Coder-0.5B-Instruct Q4_K_M file."""
    path = hub.model_path()
    if not path.is_file():
        raise FileNotFoundError(f"test model missing: {path} (run `worker-orcd pull` first)")
    return path


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    """Vocab-only GGUFs (phi-3, qwen2, llama-spm) with their tokenizer conformance cases."""
    return vocab.vocab_dir()


# -- synthetic GGUF files -------------------------------------------------------------------------

WriteGGUF = Callable[..., Path]


@dataclass(slots=True)
class TinyModel:
    """Metadata and F32 tensors (torch-order shapes) of a tiny consistent model."""

    arch: str
    metadata: dict[str, Any]
    tensors: dict[str, Any]  # name -> float32 array, or (uint8 bytes [rows, row_bytes], qtype)
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 96
    vocab: int = 32


def _tiny_model(arch: str) -> TinyModel:
    m = TinyModel(arch, {}, {})
    h, f, v, kv = m.hidden, m.ffn, m.vocab, m.kv_heads * m.hidden // m.heads
    m.metadata = {
        f"{arch}.block_count": m.layers,
        f"{arch}.context_length": 128,
        f"{arch}.embedding_length": h,
        f"{arch}.feed_forward_length": f,
        f"{arch}.attention.head_count": m.heads,
        f"{arch}.attention.head_count_kv": m.kv_heads,
        f"{arch}.rope.freq_base": 10000.0,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(v)],
    }
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (v, h)}
    for i in range(m.layers):
        b = f"blk.{i}"
        shapes[f"{b}.attn_norm.weight"] = (h,)
        if arch == "phi3":
            shapes[f"{b}.attn_qkv.weight"] = (h + 2 * kv, h)
        else:
            shapes |= {f"{b}.attn_q.weight": (h, h), f"{b}.attn_k.weight": (kv, h)}
            shapes[f"{b}.attn_v.weight"] = (kv, h)
        if arch == "qwen2":
            shapes |= {f"{b}.attn_q.bias": (h,), f"{b}.attn_k.bias": (kv,)}
            shapes[f"{b}.attn_v.bias"] = (kv,)
        shapes[f"{b}.attn_output.weight"] = (h, h)
        shapes[f"{b}.ffn_norm.weight"] = (h,)
        if arch == "phi3":
            shapes[f"{b}.ffn_up.weight"] = (2 * f, h)
        else:
            shapes |= {f"{b}.ffn_gate.weight": (f, h), f"{b}.ffn_up.weight": (f, h)}
        shapes[f"{b}.ffn_down.weight"] = (h, f)
    shapes["output_norm.weight"] = (h,)
    shapes["output.weight"] = (v, h)
    rng = np.random.default_rng(0)
    m.tensors = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
    return m


@pytest.fixture
def tiny_model() -> Callable[[str], TinyModel]:
    """tiny_model(arch="qwen2") -> a fresh TinyModel (qwen2: qkv biases; phi3: fused tensors)."""
    return lambda arch="qwen2": _tiny_model(arch)


def _add_value(w: GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, list):
        w.add_array(key, value)
    else:
        raise TypeError(f"cannot write {key}={value!r}")


@pytest.fixture
def write_gguf(tmp_path: Path) -> WriteGGUF:
    """write_gguf(model=None, *, name=, arch=, metadata=, tensors=) -> path of a new GGUF file.

    Pass a TinyModel, or `arch`/`metadata`/`tensors` directly (tensors as in TinyModel.tensors).
    Ints are written as u32, floats as f32.
    """

    def write(
        model: TinyModel | None = None,
        *,
        name: str = "model.gguf",
        arch: str = "qwen2",
        metadata: dict[str, Any] | None = None,
        tensors: dict[str, Any] | None = None,
    ) -> Path:
        if model is not None:
            arch, metadata, tensors = model.arch, model.metadata, model.tensors
        path = tmp_path / name
        w = GGUFWriter(path, arch)
        for key, value in (metadata or {}).items():
            _add_value(w, key, value)
        for tname, t in (tensors or {}).items():
            if isinstance(t, tuple):
                w.add_tensor(tname, t[0], raw_dtype=t[1])
            else:
                w.add_tensor(tname, t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    return write


@pytest.fixture(scope="session")
def qwen_engine(qwen_gguf_path: Path):  # noqa: ANN201 - Engine is imported lazily
    """The real Qwen model in the engine (cpu, float32, context 2048), loaded once per session:
    dequantized, as the parity tests compare it with transformers' float32."""
    from worker_orcd.engine.engine import Engine

    return Engine.load(
        qwen_gguf_path, device="cpu", dtype="float32", max_context=2048, weights="dequantized"
    )


# GNU OpenMP threads spin after every parallel region unless told otherwise; on 2 busy cores each
# small op after a GEMM then waits milliseconds for a core (batch-1 decode ~4x slower). libgomp
# reads this when torch loads it, so it is set here, before any test module imports torch (importing
# worker_orcd sets it too, for the CLI and the server).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
