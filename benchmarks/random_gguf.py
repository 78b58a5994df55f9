"""Write a GGUF file of random weights at a model's real dimensions, for serving benchmarks.

    python -m benchmarks.random_gguf phi3-mini /tmp/phi3-mini-bf16.gguf [--dtype bf16|f16]

The dimensions are `worker-orcd bench`'s presets (worker_orcd/bench.py); the tokenizer is a real
vocab file's `tokenizer.*` keys (the test data `worker-orcd pull --testdata` fetches, or --vocab),
so prompts tokenize as they would for the real model. Projections are N(0, 1/fan_in) and
embeddings N(0, 1) in bf16 or f16; norms and biases are F32, as llama.cpp writes them. The output
rows (the embedding rows, when tied) of the end-of-generation tokens are zero: their logit is then
0 against the maximum over the whole vocabulary, so greedy decoding never ends early and every
request runs to its max_tokens.

Tensors are written one at a time (gguf.GGUFWriter's tensor-info-then-data path), so the whole
model never sits in memory.
"""

from __future__ import annotations

import argparse
import logging
import time
import zlib
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, LlamaFileType

from worker_orcd.config import ModelConfig

logger = logging.getLogger("benchmarks.random_gguf")

VOCAB_FILES = {"phi3": "ggml-vocab-phi-3.gguf", "qwen2": "ggml-vocab-qwen2.gguf"}
DTYPES: dict[str, tuple[torch.dtype, GGMLQuantizationType, LlamaFileType]] = {
    "bf16": (torch.bfloat16, GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "f16": (torch.float16, GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
}


def default_vocab(arch: str) -> Path:
    if arch not in VOCAB_FILES:
        raise ValueError(f"no vocab file for architecture {arch!r} (have {sorted(VOCAB_FILES)})")
    from worker_orcd.testdata import testdata_dir

    path = testdata_dir() / VOCAB_FILES[arch]
    if not path.is_file():
        raise FileNotFoundError(
            f"vocab file missing: {path} (run `worker-orcd pull --testdata`, set WORKER_ORCD_CACHE "
            "to a copy of that cache, or give one with --vocab)"
        )
    return path


def tokenizer_keys(vocab: Path) -> dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]]:
    """The `tokenizer.*` keys of a GGUF file: key -> (value, type, array item type)."""
    if not vocab.is_file():
        raise FileNotFoundError(f"vocab file missing: {vocab} (give one with --vocab)")
    out = {}
    for key, field in GGUFReader(vocab).fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
            out[key] = (field.contents(), field.types[0], sub)
    return out


def tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> torch-order shape, as llama.cpp's converter names and lays them out."""
    h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.q_size, config.kv_size
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (v, h)}
    for i in range(config.n_layers):
        b = f"blk.{i}"
        shapes[f"{b}.attn_norm.weight"] = (h,)
        if config.architecture == "phi3":
            shapes[f"{b}.attn_qkv.weight"] = (q + 2 * kv, h)  # rows q | k | v
        else:
            for name, rows in (("q", q), ("k", kv), ("v", kv)):
                shapes[f"{b}.attn_{name}.weight"] = (rows, h)
                if config.qkv_bias:
                    shapes[f"{b}.attn_{name}.bias"] = (rows,)
        shapes[f"{b}.attn_output.weight"] = (h, q)
        shapes[f"{b}.ffn_norm.weight"] = (h,)
        if config.architecture == "phi3":
            shapes[f"{b}.ffn_up.weight"] = (2 * f, h)  # rows gate | up
        else:
            shapes[f"{b}.ffn_gate.weight"] = (f, h)
            shapes[f"{b}.ffn_up.weight"] = (f, h)
        shapes[f"{b}.ffn_down.weight"] = (h, f)
    shapes["output_norm.weight"] = (h,)
    if not config.tied_embeddings:
        shapes["output.weight"] = (v, h)
    return shapes


def _hparams(config: ModelConfig) -> dict[str, tuple[Any, GGUFValueType]]:
    a, u32, f32 = config.architecture, GGUFValueType.UINT32, GGUFValueType.FLOAT32
    md = {
        f"{a}.context_length": (config.context_length, u32),
        f"{a}.embedding_length": (config.hidden_size, u32),
        f"{a}.feed_forward_length": (config.intermediate_size, u32),
        f"{a}.block_count": (config.n_layers, u32),
        f"{a}.attention.head_count": (config.n_heads, u32),
        f"{a}.attention.head_count_kv": (config.n_kv_heads, u32),
        f"{a}.rope.freq_base": (float(config.rope_theta), f32),
        f"{a}.attention.layer_norm_rms_epsilon": (float(config.rms_eps), f32),
    }
    if a == "phi3":
        md[f"{a}.rope.dimension_count"] = (config.rope_dim, u32)
        md[f"{a}.rope.scaling.original_context_length"] = (config.context_length, u32)
    return md


def _random(name: str, shape: tuple[int, ...], fan_in: int, seed: int) -> torch.Tensor:
    """float32 values of one tensor, seeded by its name."""
    g = torch.Generator().manual_seed(seed ^ zlib.crc32(name.encode()))
    t = torch.empty(shape, dtype=torch.float32)
    if name.endswith("norm.weight"):
        return t.uniform_(0.8, 1.2, generator=g)
    if name.endswith(".bias"):
        return t.normal_(0.0, 0.1, generator=g)
    std = 1.0 if name == "token_embd.weight" else fan_in**-0.5
    return t.normal_(0.0, std, generator=g)


def write_random_gguf(
    config: ModelConfig,
    path: str | Path,
    *,
    vocab: str | Path | None = None,
    dtype: str = "bf16",
    seed: int = 0,
    name: str | None = None,
) -> Path:
    """Write `config`'s model with random weights to `path` (see the module docstring)."""
    from worker_orcd.tokenizer import Tokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} (got {dtype!r})")
    torch_dtype, qtype, file_type = DTYPES[dtype]
    vocab_path = Path(vocab) if vocab is not None else default_vocab(config.architecture)
    keys = tokenizer_keys(vocab_path)
    n_tokens = len(keys["tokenizer.ggml.tokens"][0])
    if n_tokens != config.vocab_size:
        raise ValueError(
            f"{vocab_path} has {n_tokens} tokens but the model's vocab_size is {config.vocab_size}"
        )
    eog = sorted(Tokenizer.from_gguf(vocab_path).eog_ids)
    head = "token_embd.weight" if config.tied_embeddings else "output.weight"
    shapes = tensor_shapes(config)

    t0 = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch=config.architecture)
    writer.add_name(name or f"random {config.architecture} {dtype}")
    writer.add_key_value("general.file_type", int(file_type), GGUFValueType.UINT32)
    for key, (value, vtype) in _hparams(config).items():
        writer.add_key_value(key, value, vtype)
    for key, (value, vtype, sub) in keys.items():
        writer.add_key_value(key, value, vtype, sub)
    stored: dict[str, GGMLQuantizationType] = {}
    for tname, shape in shapes.items():
        kind = qtype if len(shape) == 2 else GGMLQuantizationType.F32
        stored[tname] = kind
        item = 4 if kind == GGMLQuantizationType.F32 else 2
        n_bytes = item * int(np.prod(shape))
        np_dtype = np.float32 if kind == GGMLQuantizationType.F32 else np.uint16
        writer.add_tensor_info(tname, shape, np.dtype(np_dtype), n_bytes, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tname, shape in shapes.items():
        values = _random(tname, shape, shape[-1], seed)
        if tname == head:
            values[eog] = 0.0  # never the argmax: greedy runs to max_tokens
        if stored[tname] == GGMLQuantizationType.F32:
            data = values.numpy()
        else:
            data = values.to(torch_dtype).view(torch.int16).numpy().view(np.uint16)
        writer.write_tensor_data(data)
    writer.close()
    logger.info(
        "wrote %s: %d tensors, %.2f GB, in %.1f s",
        path,
        len(shapes),
        path.stat().st_size / 1e9,
        time.perf_counter() - t0,
    )
    return path


def preset(name: str, *, n_layers: int | None = None) -> ModelConfig:
    """A `worker-orcd bench` preset's config, with fewer layers if asked (for a quick file)."""
    from dataclasses import replace

    from worker_orcd.bench import PRESETS

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (have {sorted(PRESETS)})")
    config = PRESETS[name]
    return config if n_layers is None else replace(config, n_layers=n_layers)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("preset", help="phi3-mini or qwen2.5-0.5b")
    p.add_argument("path")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--vocab", default=None, help="GGUF file whose tokenizer.* keys to copy")
    p.add_argument("--layers", type=int, default=None, help="fewer layers than the real model")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = preset(args.preset, n_layers=args.layers)
    write_random_gguf(config, args.path, vocab=args.vocab, dtype=args.dtype, seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
