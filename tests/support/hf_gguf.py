"""Random-weight Qwen2 / Phi-3 models built with transformers and written to GGUF as llama.cpp does.

Parity tests compare the engine with transformers (float32, CPU) on these models. The writer follows
llama.cpp's convert_hf_to_gguf.py: the same metadata keys, tensor names and layouts (Qwen2: separate
q/k/v with biases, gate/up; Phi-3: fused `attn_qkv` rows q|k|v and `ffn_up` rows gate|up; no q/k
permutation, both use NEOX RoPE), plus the real tokenizer metadata of llama.cpp's vocab files
(tests/support/vocab.py).
"""

from __future__ import annotations

import functools
import logging
import math
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType
from torch import nn
from transformers import Phi3Config, Phi3ForCausalLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from .gguf_kv import read_metadata
from .vocab import vocab_dir

logger = logging.getLogger(__name__)

VOCAB_FILES = {"qwen2": "ggml-vocab-qwen2.gguf", "phi3": "ggml-vocab-phi-3.gguf"}
VOCAB_SIZES = {"qwen2": 151936, "phi3": 32064}

# Per-layer dimensions of the real models (pass as **dims to make_*; the layer count stays small).
PHI3_MINI_DIMS: dict[str, int] = dict(
    hidden_size=3072,
    num_attention_heads=32,
    num_key_value_heads=32,
    intermediate_size=8192,
    num_hidden_layers=2,
)
QWEN25_05B_DIMS: dict[str, int] = dict(
    hidden_size=896,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    num_hidden_layers=2,
)

# What gguf-py can quantize (checked against gguf 0.19). The K-quants (Q2_K..Q6_K) and the IQ types
# have dequantizers only, so files holding them cannot be written from float weights here.
QUANTIZABLE: frozenset[GGMLQuantizationType] = frozenset(
    {
        GGMLQuantizationType.F32,
        GGMLQuantizationType.F16,
        GGMLQuantizationType.BF16,
        GGMLQuantizationType.Q4_0,
        GGMLQuantizationType.Q4_1,
        GGMLQuantizationType.Q5_0,
        GGMLQuantizationType.Q5_1,
        GGMLQuantizationType.Q8_0,
    }
)

# K-quants that gguf-py cannot quantize to: write_gguf fills such tensors with random valid blocks
# (random_kquant_blocks) and, as it must then, copies their values into the model (sync_model).
RANDOM_BLOCKS: frozenset[GGMLQuantizationType] = frozenset(
    {GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K}
)
# Byte offsets of the fp16 scales (d, then dmin) inside one block.
_KQUANT_F16_FIELDS: dict[GGMLQuantizationType, tuple[int, ...]] = {
    GGMLQuantizationType.Q4_K: (0, 2),
    GGMLQuantizationType.Q5_K: (0, 2),
    GGMLQuantizationType.Q6_K: (208,),
}


def random_kquant_blocks(
    qtype: GGMLQuantizationType, shape: tuple[int, int], *, std: float, seed: int
) -> np.ndarray:
    """Random valid `qtype` blocks for a [rows, cols] tensor: uniform quant and 6-bit scale bytes,
    fp16 d (and dmin) drawn from U(0.5, 1.5) and then scaled together so that the dequantized
    tensor has standard deviation ~`std` (every value is linear in d and dmin). Returns uint8
    [rows, cols / 256 * type_size], as gguf.quants.quantize would."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    if cols % block:
        raise ValueError(f"{qtype.name} needs rows of a multiple of {block} values, got {cols}")
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // block, type_size), dtype=np.uint8)
    fields = _KQUANT_F16_FIELDS[qtype]
    scales = rng.uniform(0.5, 1.5, (len(fields), rows, cols // block))

    def put(values: np.ndarray) -> None:
        for off, v in zip(fields, values, strict=True):
            raw[..., off : off + 2] = v.astype(np.float16)[..., None].view(np.uint8)

    put(scales)
    got = float(gguf.quants.dequantize(raw.reshape(rows, -1), qtype).std())
    put(scales * (std / got))
    return raw.reshape(rows, -1)


def make_qwen2(
    *, seed: int = 0, rope_theta: float = 1_000_000.0, **overrides: Any
) -> Qwen2ForCausalLM:
    """A seeded random Qwen2 (default: hidden 64, 4 layers, 4 heads / 2 KV heads, head_dim 16)."""
    cfg: dict[str, Any] = dict(
        vocab_size=VOCAB_SIZES["qwen2"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        use_sliding_window=False,
    )
    cfg.update(overrides)
    cfg.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": rope_theta})
    model = Qwen2ForCausalLM(Qwen2Config(**cfg, attn_implementation="eager"))
    return _randomize(model, seed)


def make_phi3(
    *, seed: int = 0, rope_theta: float = 10_000.0, longrope: bool = False, **overrides: Any
) -> Phi3ForCausalLM:
    """A seeded random Phi-3 (default: hidden 128, 4 layers, 4 heads MHA, head_dim 32, FFN 256).

    `longrope=True` adds random LongRoPE factors; the context is then 4x the original context
    (`original_max_position_embeddings`) unless `max_position_embeddings` is given. Use a small
    original context to reach the long factors in a test.
    """
    cfg: dict[str, Any] = dict(
        vocab_size=VOCAB_SIZES["phi3"],
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        original_max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=None,
    )
    cfg.update(overrides)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": rope_theta}
    if longrope:
        if "max_position_embeddings" not in overrides:
            cfg["max_position_embeddings"] = 4 * cfg["original_max_position_embeddings"]
        half = cfg["hidden_size"] // cfg["num_attention_heads"] // 2
        g = torch.Generator().manual_seed(seed + 1)
        rope.update(
            rope_type="longrope",
            original_max_position_embeddings=cfg["original_max_position_embeddings"],
            short_factor=(1.0 + torch.rand(half, generator=g)).tolist(),
            long_factor=(1.0 + 8.0 * torch.rand(half, generator=g)).tolist(),
        )
    cfg.setdefault("rope_parameters", rope)
    model = Phi3ForCausalLM(Phi3Config(**cfg, attn_implementation="eager"))
    return _randomize(model, seed)


@torch.no_grad()
def hf_logits(model: PreTrainedModel, ids: Sequence[int]) -> torch.Tensor:
    """transformers' float32 logits at every position of one sequence: [T, V]."""
    return model(torch.tensor([list(ids)], dtype=torch.long)).logits[0].float()


@torch.no_grad()
def hf_greedy(model: PreTrainedModel, ids: Sequence[int], n: int) -> list[int]:
    """`n` greedy tokens from transformers with its KV cache (no stopping at EOS)."""
    out = model(torch.tensor([list(ids)], dtype=torch.long), use_cache=True)
    tokens: list[int] = []
    while True:
        tokens.append(int(out.logits[0, -1].argmax()))
        if len(tokens) == n:
            return tokens
        nxt = torch.tensor([[tokens[-1]]], dtype=torch.long)
        out = model(nxt, cache=out.cache, use_cache=True)


@torch.no_grad()
def _randomize(model: PreTrainedModel, seed: int) -> Any:
    """Weights that keep activations near unit scale, so a wrong RoPE or mask changes the logits.

    Linear weights ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norm weights ~ U(0.5, 1.5),
    biases ~ N(0, 0.5).
    """
    g = torch.Generator().manual_seed(seed)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    done: set[int] = set()
    for m in linears:
        m.weight.normal_(0.0, 1.0 / math.sqrt(m.in_features), generator=g)
        if m.bias is not None:
            m.bias.normal_(0.0, 0.5, generator=g)
            done.add(id(m.bias))
        done.add(id(m.weight))
    for m in embeddings:  # after the linears: a tied lm_head shares this weight
        m.weight.normal_(0.0, 1.0, generator=g)
        done.add(id(m.weight))
    for name, p in model.named_parameters():
        if id(p) in done:
            continue
        if p.ndim != 1:
            raise AssertionError(f"unexpected parameter {name} {tuple(p.shape)}")
        p.uniform_(0.5, 1.5, generator=g)
    return model.float().eval()


def write_gguf(
    model: PreTrainedModel,
    path: str | Path,
    *,
    tokenizer: str | None = "auto",
    qtypes: Mapping[str, GGMLQuantizationType] | None = None,
    tie_embeddings: bool | None = None,
    extra_metadata: Mapping[str, Any] | None = None,
    sync_model: bool = False,
) -> Path:
    """Write `model` as llama.cpp would convert it; return the path.

    tokenizer: "qwen2" / "phi3" copies that vocab's `tokenizer.*` keys (incl. chat template);
      "auto" takes the architecture's own; None writes none (then `{arch}.vocab_size` is written).
    qtypes: quant type per full tensor name ("blk.0.ffn_down.weight") or per whole dotted segments
      ("ffn_down", "blk.1.attn_v"); the longest matching pattern wins. Unmatched 2-D tensors stay
      F32; 1-D tensors stay F32 unless named in full. Every pattern must match some tensor.
      Q4_K/Q5_K/Q6_K tensors get random valid blocks of the tensor's standard deviation
      (random_kquant_blocks) instead of their values, and need sync_model=True.
    tie_embeddings: omit `output.weight`; None follows the config. True needs lm_head == embedding.
    extra_metadata: key -> value (int: UINT32, float: FLOAT32, str, bool, list) or (value, type);
      a value of None removes a key the writer would otherwise write.
    sync_model: copy the dequantized values of quantized tensors back into `model`, so that
      transformers and the file hold the same weights and exact parity tests still apply.
    """
    arch = model.config.model_type
    if arch not in ("qwen2", "phi3"):
        raise ValueError(f"write_gguf supports qwen2 and phi3 models, not {arch!r}")
    tied = model.config.tie_word_embeddings if tie_embeddings is None else tie_embeddings
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    if tied and not torch.equal(embed, head):
        raise ValueError("tie_embeddings=True but the model's lm_head differs from its embedding")

    tensors = _tensors(model, arch, tied)
    metadata = _hparams(model.config, arch)
    if tokenizer is not None:
        vocab = arch if tokenizer == "auto" else tokenizer
        if vocab not in VOCAB_FILES:
            raise ValueError(f"tokenizer must be one of {sorted(VOCAB_FILES)}, 'auto' or None")
        n_tokens = VOCAB_SIZES[vocab]
        if model.config.vocab_size != n_tokens:
            raise ValueError(
                f"the {vocab} vocab has {n_tokens} tokens but the model's vocab_size is "
                f"{model.config.vocab_size}; build it with vocab_size={n_tokens} "
                "or pass tokenizer=None"
            )
        metadata.update(vocab_metadata(vocab))
    else:
        metadata[f"{arch}.vocab_size"] = (model.config.vocab_size, GGUFValueType.UINT32)
    chosen = _choose_qtypes(tensors, dict(qtypes or {}))
    metadata["general.file_type"] = (_file_type(chosen, tensors), GGUFValueType.UINT32)
    if any(t not in (GGMLQuantizationType.F32,) for t in chosen.values()):
        metadata["general.quantization_version"] = (gguf.GGML_QUANT_VERSION, GGUFValueType.UINT32)
    for key, value in (extra_metadata or {}).items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value if isinstance(value, tuple) else _typed(value)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_name(f"worker-orcd random {arch}")
    for key, value in metadata.items():
        val, vtype, *sub = value
        writer.add_key_value(key, val, vtype, sub[0] if sub else None)
    for name, tensor in tensors:
        qtype = chosen[name]
        data = tensor.detach().contiguous().numpy()
        if qtype == GGMLQuantizationType.F32:
            writer.add_tensor(name, data)
            continue
        if qtype in RANDOM_BLOCKS:
            if not sync_model:
                raise ValueError(
                    f"{name}: {qtype.name} blocks are random, not the model's values; "
                    "pass sync_model=True"
                )
            seed = zlib.crc32(name.encode())
            q = random_kquant_blocks(qtype, data.shape, std=float(data.std()), seed=seed)
        else:
            try:
                q = gguf.quants.quantize(data, qtype)
            except ValueError as e:
                raise ValueError(f"cannot quantize {name} {data.shape} to {qtype.name}: {e}") from e
        writer.add_tensor(name, q, raw_dtype=qtype)
        if sync_model:
            deq = gguf.quants.dequantize(q, qtype).reshape(data.shape)
            with torch.no_grad():
                tensor.copy_(torch.from_numpy(np.ascontiguousarray(deq)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    logger.debug("wrote %s (%d tensors, %.1f MB)", path, len(tensors), path.stat().st_size / 1e6)
    return path


def _tensors(model: PreTrainedModel, arch: str, tied: bool) -> list[tuple[str, torch.Tensor]]:
    """GGUF name -> HF parameter (the model's own storage, so that sync_model can write back)."""
    m = model.model
    out: list[tuple[str, torch.Tensor]] = [("token_embd.weight", m.embed_tokens.weight)]
    for i, layer in enumerate(m.layers):
        a, f, b = layer.self_attn, layer.mlp, f"blk.{i}"
        out.append((f"{b}.attn_norm.weight", layer.input_layernorm.weight))
        if arch == "qwen2":
            for short, proj in (("q", a.q_proj), ("k", a.k_proj), ("v", a.v_proj)):
                out.append((f"{b}.attn_{short}.weight", proj.weight))
                out.append((f"{b}.attn_{short}.bias", proj.bias))
        else:
            out.append((f"{b}.attn_qkv.weight", a.qkv_proj.weight))  # rows: q | k | v
        out.append((f"{b}.attn_output.weight", a.o_proj.weight))
        out.append((f"{b}.ffn_norm.weight", layer.post_attention_layernorm.weight))
        if arch == "qwen2":
            out.append((f"{b}.ffn_gate.weight", f.gate_proj.weight))
            out.append((f"{b}.ffn_up.weight", f.up_proj.weight))
        else:
            out.append((f"{b}.ffn_up.weight", f.gate_up_proj.weight))  # rows: gate | up
        out.append((f"{b}.ffn_down.weight", f.down_proj.weight))
    out.append(("output_norm.weight", m.norm.weight))
    if not tied:
        out.append(("output.weight", model.lm_head.weight))
    rope = model.config.rope_parameters or {}
    if arch == "phi3" and rope.get("rope_type") == "longrope":
        out.append(
            ("rope_factors_long.weight", torch.tensor(rope["long_factor"], dtype=torch.float32))
        )
        out.append(
            ("rope_factors_short.weight", torch.tensor(rope["short_factor"], dtype=torch.float32))
        )
    return out


def _hparams(config: Any, arch: str) -> dict[str, tuple[Any, ...]]:
    u32, f32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
    rope = config.rope_parameters or {}
    md: dict[str, tuple[Any, ...]] = {
        f"{arch}.context_length": (config.max_position_embeddings, u32),
        f"{arch}.embedding_length": (config.hidden_size, u32),
        f"{arch}.feed_forward_length": (config.intermediate_size, u32),
        f"{arch}.block_count": (config.num_hidden_layers, u32),
        f"{arch}.attention.head_count": (config.num_attention_heads, u32),
        f"{arch}.attention.head_count_kv": (config.num_key_value_heads, u32),
        f"{arch}.rope.freq_base": (float(rope["rope_theta"]), f32),
        f"{arch}.attention.layer_norm_rms_epsilon": (float(config.rms_norm_eps), f32),
    }
    if arch == "qwen2":
        if config.use_sliding_window:
            raise ValueError("llama.cpp's qwen2 has no sliding window; use a phi3 model for that")
        return md
    head_dim = config.hidden_size // config.num_attention_heads
    md[f"{arch}.rope.dimension_count"] = (
        int(head_dim * rope.get("partial_rotary_factor", 1.0)),
        u32,
    )
    orig_ctx = config.original_max_position_embeddings
    md[f"{arch}.rope.scaling.original_context_length"] = (orig_ctx, u32)
    if config.sliding_window is not None:
        md[f"{arch}.attention.sliding_window"] = (config.sliding_window, u32)
    if rope.get("rope_type") == "longrope":
        scale = config.max_position_embeddings / orig_ctx
        attn_factor = rope.get("attention_factor")
        if attn_factor is None:  # llama.cpp's formula, which transformers also uses by default
            attn_factor = math.sqrt(1 + math.log(scale) / math.log(orig_ctx)) if scale > 1 else 1.0
        md[f"{arch}.rope.scaling.attn_factor"] = (float(attn_factor), f32)
    return md


@functools.cache
def vocab_metadata(vocab: str) -> dict[str, tuple[Any, ...]]:
    """The `tokenizer.*` keys of a real vocab file: key -> (value, type[, array item type])."""
    md = read_metadata(vocab_dir() / VOCAB_FILES[vocab])
    return {k: v for k, v in md.items() if k.startswith("tokenizer.")}


def _typed(value: Any) -> tuple[Any, ...]:
    if isinstance(value, bool):
        return (value, GGUFValueType.BOOL)
    if isinstance(value, int):
        return (value, GGUFValueType.UINT32)
    if isinstance(value, float):
        return (value, GGUFValueType.FLOAT32)
    if isinstance(value, str):
        return (value, GGUFValueType.STRING)
    if isinstance(value, Sequence) and value:
        return (list(value), GGUFValueType.ARRAY, _typed(value[0])[1])
    raise TypeError(f"cannot infer a GGUF type for {value!r}; pass (value, GGUFValueType)")


def _choose_qtypes(
    tensors: list[tuple[str, torch.Tensor]], qtypes: dict[str, GGMLQuantizationType]
) -> dict[str, GGMLQuantizationType]:
    for pattern, qtype in qtypes.items():
        if qtype not in QUANTIZABLE | RANDOM_BLOCKS:
            raise ValueError(
                f"gguf-py cannot quantize to {GGMLQuantizationType(qtype).name} "
                f"(pattern {pattern!r}); "
                f"supported: {sorted(t.name for t in QUANTIZABLE)}, "
                f"as random blocks: {sorted(t.name for t in RANDOM_BLOCKS)}"
            )
    ndim = {name: t.ndim for name, t in tensors}
    used: set[str] = set()
    chosen: dict[str, GGMLQuantizationType] = {}
    for name, _ in tensors:
        best: tuple[int, str] | None = None
        for pattern in qtypes:
            exact = pattern == name
            if not exact and (ndim[name] == 1 or not _segments_match(pattern, name)):
                continue
            rank = (1_000 if exact else len(pattern.split(".")), pattern)
            if best is None or rank[0] > best[0]:
                best = rank
        if best is None:
            chosen[name] = GGMLQuantizationType.F32
        else:
            used.add(best[1])
            chosen[name] = GGMLQuantizationType(qtypes[best[1]])
    unused = [p for p in qtypes if p not in used]
    if unused:
        raise ValueError(f"qtypes patterns match no quantizable tensor: {unused}")
    return chosen


def _segments_match(pattern: str, name: str) -> bool:
    """True when the dotted segments of `pattern` occur as a contiguous run in `name`."""
    p, n = pattern.split("."), name.split(".")
    return any(n[i : i + len(p)] == p for i in range(len(n) - len(p) + 1))


def _file_type(
    chosen: Mapping[str, GGMLQuantizationType], tensors: list[tuple[str, torch.Tensor]]
) -> int:
    """llama.cpp's general.file_type: the type of most 2-D tensors (ALL_F32 if none quantized)."""
    counts: dict[GGMLQuantizationType, int] = {}
    for name, t in tensors:
        if t.ndim == 2:
            counts[chosen[name]] = counts.get(chosen[name], 0) + 1
    main = max(counts, key=lambda k: counts[k])
    if main == GGMLQuantizationType.F32:
        return int(gguf.LlamaFileType.ALL_F32)
    names = gguf.LlamaFileType.__members__
    # Q4_K and Q5_K files are named by their mix (Q4_K_M: mostly Q4_K, some Q6_K)
    return int(names.get(f"MOSTLY_{main.name}") or names[f"MOSTLY_{main.name}_M"])
