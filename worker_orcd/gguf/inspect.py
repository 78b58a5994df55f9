"""`worker-orcd inspect FILE`: a human-readable description of a GGUF file."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from gguf import LlamaFileType

from worker_orcd.config import ModelConfig
from worker_orcd.errors import ModelLoadError
from worker_orcd.gguf.dequant import DEQUANTIZERS
from worker_orcd.gguf.reader import GGUFFile

logger = logging.getLogger(__name__)


def format_report(path: str | Path) -> str:
    """Architecture, hyperparameters, tokenizer, quant mix and sizes of the GGUF file at `path`."""
    with GGUFFile.open(path, allow_unsupported_types=True) as f:
        lines = [
            f"file:          {f.path}",
            f"format:        GGUF v{f.version}, {_size(f.file_size)} ({f.file_size:,} bytes)",
            f"architecture:  {f.architecture}",
            f"name:          {f.get('general.name', '-')}",
            f"file type:     {_file_type(f.get('general.file_type'))}",
        ]
        lines += _hyperparameters(f)
        lines += _tokenizer(f)
        lines += _quant_mix(f)
    return "\n".join(lines)


def _hyperparameters(f: GGUFFile) -> list[str]:
    try:
        c = ModelConfig.from_gguf(f)
    except ModelLoadError as e:
        return [f"hyperparameters: unavailable ({e.message})"]
    scaling = c.rope_scaling_type or "none"
    if c.rope_scaling_factor is not None:
        scaling += f" x{c.rope_scaling_factor:g}"
    if c.rope_original_context is not None:
        scaling += f", original context {c.rope_original_context}"
    if c.has_rope_factors:
        scaling += ", long/short factors"
    rows = [
        ("layers", c.n_layers),
        ("hidden size", c.hidden_size),
        ("heads / kv heads", f"{c.n_heads} / {c.n_kv_heads}"),
        ("head dim", c.head_dim),
        ("ffn size", c.intermediate_size),
        ("vocab size", c.vocab_size),
        ("context length", c.context_length),
        ("rope", f"theta {c.rope_theta:.10g}, dim {c.rope_dim}, scaling {scaling}"),
        ("rms eps", f"{c.rms_eps:g}"),
        ("sliding window", c.sliding_window or "none"),
        ("qkv bias", _yes(c.qkv_bias)),
        ("tied embeddings", _yes(c.tied_embeddings)),
        ("fused qkv", _yes(c.fused_qkv)),
        ("fused gate/up", _yes(c.fused_gate_up)),
        ("parameters", f"{c.n_params_estimate() / 1e9:.2f}B (estimated from the config)"),
    ]
    return ["hyperparameters:"] + [f"  {k:<18}{v}" for k, v in rows]


def _tokenizer(f: GGUFFile) -> list[str]:
    model = f.get("tokenizer.ggml.model")
    if model is None:
        return ["tokenizer:     none"]
    tokens = f.get("tokenizer.ggml.tokens") or []
    pre = f.get("tokenizer.ggml.pre", "-")
    template = "yes" if f.get("tokenizer.chat_template") else "no"
    return [f"tokenizer:     {model} (pre {pre}), {len(tokens)} tokens, chat template {template}"]


def _quant_mix(f: GGUFFile) -> list[str]:
    counts: Counter[str] = Counter()
    nbytes: Counter[str] = Counter()
    for t in f.tensors.values():
        counts[t.qtype.name] += 1
        nbytes[t.qtype.name] += t.n_bytes
    total = sum(nbytes.values())
    unsupported = sorted({t.qtype.name for t in f.tensors.values() if t.qtype not in DEQUANTIZERS})
    if not f.tensors:
        return ["quant mix:     no tensors (vocab-only file)"]
    lines = ["quant mix:", f"  {'type':<10}{'tensors':>8}{'bytes':>16}{'share':>8}"]
    for name, n in sorted(nbytes.items(), key=lambda kv: -kv[1]):
        share = f"{100 * n / total:.1f}%"
        lines.append(f"  {name:<10}{counts[name]:>8}{n:>16,}{share:>8}")
    lines.append(
        f"total:         {len(f.tensors)} tensors, {total:,} bytes of tensor data "
        f"({_size(total)}); file {f.file_size:,} bytes"
    )
    if unsupported:
        lines.append(f"unsupported:   {', '.join(unsupported)} (this worker cannot load them)")
    return lines


def _file_type(value: object) -> str:
    if not isinstance(value, int):
        return "-"
    try:
        return f"{LlamaFileType(value).name} ({value})"
    except ValueError:
        return str(value)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    raise AssertionError("unreachable")


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"
