"""ModelConfig: every hyperparameter and architecture difference the model needs, read from GGUF.

The model reads flags (`qkv_bias`, `fused_qkv`, `fused_gate_up`, ...), never architecture names.
Flags that describe tensors are taken from the tensors that are present; a vocab-only file (no
tensors) gets the architecture's usual layout from `_LAYOUT_DEFAULTS`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from worker_orcd.errors import ModelLoadError

if TYPE_CHECKING:
    from worker_orcd.gguf import GGUFFile

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Layout:
    qkv_bias: bool
    fused_qkv: bool
    fused_gate_up: bool


# How each supported architecture stores its weights (used only when the file has no tensors).
_LAYOUT_DEFAULTS: dict[str, _Layout] = {
    "llama": _Layout(qkv_bias=False, fused_qkv=False, fused_gate_up=False),
    "qwen2": _Layout(qkv_bias=True, fused_qkv=False, fused_gate_up=False),
    "phi3": _Layout(qkv_bias=False, fused_qkv=True, fused_gate_up=True),
}
SUPPORTED_ARCHITECTURES = tuple(_LAYOUT_DEFAULTS)
DEFAULT_ROPE_THETA = 10000.0
_REQUIRED = object()


@dataclass(frozen=True, slots=True)
class ModelConfig:
    architecture: str
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    context_length: int
    rope_theta: float
    rope_dim: int
    rope_scaling_type: str | None
    rope_scaling_factor: float | None
    rope_original_context: int | None
    has_rope_factors: bool
    rms_eps: float
    sliding_window: int | None
    qkv_bias: bool
    tied_embeddings: bool
    fused_qkv: bool
    fused_gate_up: bool
    # LongRoPE attention scale (Phi-3 128k: `{arch}.rope.scaling.attn_factor`), when the file says.
    rope_attn_factor: float | None = None

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> ModelConfig:
        arch = f.architecture
        if arch not in _LAYOUT_DEFAULTS:
            raise ModelLoadError(
                f"{f.path}: unknown architecture '{arch}' "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        r = _Keys(f, arch)
        hidden = r.integer("embedding_length")
        n_heads = r.integer("attention.head_count")
        n_kv_heads = r.integer("attention.head_count_kv", default=n_heads)
        if n_heads % n_kv_heads:
            raise ModelLoadError(
                f"{f.path}: '{arch}.attention.head_count' ({n_heads}) is not a multiple of "
                f"'{arch}.attention.head_count_kv' ({n_kv_heads})"
            )
        if r.has("attention.key_length"):
            head_dim = r.integer("attention.key_length")
            value_dim = r.integer("attention.value_length", default=head_dim)
            if value_dim != head_dim:
                raise ModelLoadError(
                    f"{f.path}: key_length {head_dim} != value_length {value_dim} is not supported"
                )
        elif hidden % n_heads:
            raise ModelLoadError(
                f"{f.path}: '{arch}.embedding_length' ({hidden}) is not a multiple of "
                f"'{arch}.attention.head_count' ({n_heads})"
            )
        else:
            head_dim = hidden // n_heads
        rope_dim = r.integer("rope.dimension_count", default=head_dim)
        if rope_dim > head_dim or rope_dim % 2:
            raise ModelLoadError(
                f"{f.path}: '{arch}.rope.dimension_count' ({rope_dim}) must be even and at most "
                f"head_dim ({head_dim})"
            )

        tensors = f.tensors
        has_rope_factors = (
            "rope_factors_long.weight" in tensors and "rope_factors_short.weight" in tensors
        )
        if tensors:
            qkv_bias = "blk.0.attn_q.bias" in tensors or "blk.0.attn_qkv.bias" in tensors
            fused_qkv = "blk.0.attn_qkv.weight" in tensors
            fused_gate_up = "blk.0.ffn_gate.weight" not in tensors
            tied = "output.weight" not in tensors
        else:
            layout = _LAYOUT_DEFAULTS[arch]
            qkv_bias, fused_qkv = layout.qkv_bias, layout.fused_qkv
            fused_gate_up = layout.fused_gate_up
            tied = False

        scaling_type = r.string("rope.scaling.type", default=None)
        if scaling_type == "none":
            scaling_type = None
        if scaling_type is None and has_rope_factors:
            scaling_type = "longrope"
        window = r.integer("attention.sliding_window", default=None, allow_zero=True)

        return cls(
            architecture=arch,
            n_layers=r.integer("block_count"),
            hidden_size=hidden,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            intermediate_size=r.integer("feed_forward_length"),
            vocab_size=_vocab_size(f, r),
            context_length=r.integer("context_length"),
            rope_theta=r.number("rope.freq_base", default=DEFAULT_ROPE_THETA),
            rope_dim=rope_dim,
            rope_scaling_type=scaling_type,
            rope_scaling_factor=r.number("rope.scaling.factor", default=None),
            rope_original_context=r.integer("rope.scaling.original_context_length", default=None),
            has_rope_factors=has_rope_factors,
            rms_eps=r.number("attention.layer_norm_rms_epsilon"),
            sliding_window=window or None,
            qkv_bias=qkv_bias,
            tied_embeddings=tied,
            fused_qkv=fused_qkv,
            fused_gate_up=fused_gate_up,
            rope_attn_factor=r.number("rope.scaling.attn_factor", default=None),
        )

    def n_params_estimate(self) -> int:
        """Parameter count implied by the config (embeddings counted twice unless tied)."""
        attn = self.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden_size
        if self.qkv_bias:
            attn += self.q_size + 2 * self.kv_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        layer = attn + mlp + 2 * self.hidden_size
        embed = self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)
        return self.n_layers * layer + embed + self.hidden_size


def _vocab_size(f: GGUFFile, r: _Keys) -> int:
    embd = f.tensors.get("token_embd.weight")
    if embd is not None:
        return embd.shape[0]
    if r.has("vocab_size"):
        return r.integer("vocab_size")
    tokens = f.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ModelLoadError(
            f"{f.path}: cannot tell the vocabulary size: no 'token_embd.weight' tensor and no "
            "'tokenizer.ggml.tokens' list"
        )
    return len(tokens)


class _Keys:
    """Typed access to `{arch}.*` keys; errors name the full key and the file."""

    __slots__ = ("f", "arch")

    def __init__(self, f: GGUFFile, arch: str):
        self.f = f
        self.arch = arch

    def has(self, name: str) -> bool:
        return f"{self.arch}.{name}" in self.f.metadata

    def _get(self, name: str, default: Any) -> tuple[str, Any]:
        key = f"{self.arch}.{name}"
        if default is _REQUIRED:
            return key, self.f.require(key)
        return key, self.f.get(key, default)

    def integer(self, name: str, default: Any = _REQUIRED, *, allow_zero: bool = False) -> Any:
        key, v = self._get(name, default)
        if v is default and default is not _REQUIRED:
            return v
        if isinstance(v, list):
            raise ModelLoadError(f"{self.f.path}: per-layer values for '{key}' are not supported")
        if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (v == 0 and not allow_zero):
            raise ModelLoadError(f"{self.f.path}: '{key}' must be a positive integer, got {v!r}")
        return v

    def number(self, name: str, default: Any = _REQUIRED) -> Any:
        key, v = self._get(name, default)
        if v is default and default is not _REQUIRED:
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ModelLoadError(f"{self.f.path}: '{key}' must be a positive number, got {v!r}")
        return float(v)

    def string(self, name: str, default: Any = _REQUIRED) -> Any:
        key, v = self._get(name, default)
        if v is default and default is not _REQUIRED:
            return v
        if not isinstance(v, str):
            raise ModelLoadError(f"{self.f.path}: metadata '{key}' must be a string, got {v!r}")
        return v
