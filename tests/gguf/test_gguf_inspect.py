"""`format_report`: the numbers people read from `worker-orcd inspect`."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q

from worker_orcd.gguf.inspect import format_report


def _row(report: str, label: str) -> str:
    match = re.search(rf"^\s*{re.escape(label)}\s+(.+)$", report, re.MULTILINE)
    assert match, f"no '{label}' line in:\n{report}"
    return match.group(1).strip()


def test_real_qwen_report(qwen_gguf_path: Path):
    report = format_report(qwen_gguf_path)
    assert _row(report, "architecture:") == "qwen2"
    assert _row(report, "name:") == "Qwen2.5 Coder 0.5B Instruct AWQ"
    assert _row(report, "file type:") == "MOSTLY_Q4_K_M (15)"
    assert _row(report, "layers") == "24"
    assert _row(report, "hidden size") == "896"
    assert _row(report, "heads / kv heads") == "14 / 2"
    assert _row(report, "head dim") == "64"
    assert _row(report, "ffn size") == "4864"
    assert _row(report, "vocab size") == "151936"
    assert _row(report, "context length") == "32768"
    assert _row(report, "rope").startswith("theta 1000000, dim 64")
    assert _row(report, "qkv bias") == "yes"
    assert _row(report, "tied embeddings") == "no"
    assert _row(report, "tokenizer:") == "gpt2 (pre qwen2), 151936 tokens, chat template yes"
    # Counts and bytes per type as gguf.GGUFReader reports them for this file.
    expected = {
        "Q5_0": (133, 266_742_784),
        "Q8_0": (13, 146_105_344),
        "Q6_K": (12, 42_900_480),
        "Q4_K": (12, 29_417_472),
        "F32": (121, 286_208),
    }
    for qtype, (count, nbytes) in expected.items():
        cols = _row(report, qtype).split()
        assert (int(cols[0]), int(cols[1].replace(",", ""))) == (count, nbytes), qtype
    total = _row(report, "total:")
    assert total.startswith("291 tensors, 485,452,288 bytes of tensor data")
    assert total.endswith("file 491,400,064 bytes")


def test_report_for_unknown_architecture_and_unsupported_types(write_gguf):
    raw = np.zeros((2, 66), dtype=np.uint8)  # one IQ2_XXS block per row
    path = write_gguf(arch="mamba", tensors={"w.weight": (raw, Q.IQ2_XXS)})
    report = format_report(path)
    assert _row(report, "architecture:") == "mamba"
    assert "hyperparameters: unavailable" in report and "unknown architecture 'mamba'" in report
    assert _row(report, "IQ2_XXS").split()[:2] == ["1", "132"]
    assert "unsupported:   IQ2_XXS" in report
    assert _row(report, "tokenizer:") == "none"


def test_vocab_only_report(vocab_dir: Path):
    report = format_report(vocab_dir / "ggml-vocab-phi-3.gguf")
    assert _row(report, "heads / kv heads") == "32 / 32"
    assert _row(report, "head dim") == "96"
    assert _row(report, "fused qkv") == "yes"
    assert "no tensors (vocab-only file)" in report
