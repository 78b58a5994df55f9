"""Thin nn.Modules over the kernels; each parameter knows how to load its (fused) weight."""

from __future__ import annotations

from worker_orcd.layers.activation import SiluAndMul
from worker_orcd.layers.attention import Attention
from worker_orcd.layers.embedding import LMHead, VocabEmbedding
from worker_orcd.layers.linear import GateUpLinear, Linear, QKVLinear, default_weight_loader
from worker_orcd.layers.norm import RMSNorm
from worker_orcd.layers.rotary import RotaryEmbedding

__all__ = [
    "Attention",
    "GateUpLinear",
    "LMHead",
    "Linear",
    "QKVLinear",
    "RMSNorm",
    "RotaryEmbedding",
    "SiluAndMul",
    "VocabEmbedding",
    "default_weight_loader",
]
