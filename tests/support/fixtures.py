"""Session-wide cache of random-weight GGUF test models, and pytest fixtures over it.

A conftest makes them visible by importing them by name
(`from tests.support.fixtures import model_cache, tiny_phi3, tiny_qwen2  # noqa: F401`).
Building a model and writing its file takes from a fraction of a second (tiny, no tokenizer) to
tens of seconds (Phi-3 real dims, ~1.7 GB); each distinct request is built once per session.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from gguf import GGMLQuantizationType
from transformers import PreTrainedModel

from .hf_gguf import make_phi3, make_qwen2, write_gguf

logger = logging.getLogger(__name__)

_MAKERS = {"qwen2": make_qwen2, "phi3": make_phi3}


@dataclass(slots=True, frozen=True)
class BuiltModel:
    """A transformers model (float32, eval) and the GGUF file written from it."""

    kind: str
    model: PreTrainedModel
    path: Path

    @property
    def config(self) -> Any:
        return self.model.config


class ModelCache:
    """Builds each (kind, writer options, dims) once; files live under `root`.

    Quantized files are written with sync_model=True: the cached transformers model holds the
    dequantized weights, so parity with it stays exact. Treat cached models as read-only.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[str, BuiltModel] = {}

    def get(
        self,
        kind: str,
        *,
        tokenizer: str | None = "auto",
        qtypes: Mapping[str, GGMLQuantizationType] | None = None,
        tie_embeddings: bool | None = None,
        **dims: Any,
    ) -> BuiltModel:
        if kind not in _MAKERS:
            raise ValueError(f"kind must be one of {sorted(_MAKERS)}, got {kind!r}")
        qitems = sorted((k, GGMLQuantizationType(v).name) for k, v in (qtypes or {}).items())
        key = repr((kind, tokenizer, qitems, tie_embeddings, sorted(dims.items())))
        if key not in self._built:
            model = _MAKERS[kind](**dims)
            path = self.root / f"{kind}-{len(self._built)}.gguf"
            write_gguf(
                model,
                path,
                tokenizer=tokenizer,
                qtypes=qtypes,
                tie_embeddings=tie_embeddings,
                sync_model=True,
            )
            logger.info("built %s -> %s", key, path)
            self._built[key] = BuiltModel(kind, model, path)
        return self._built[key]


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelCache]:
    yield ModelCache(tmp_path_factory.mktemp("hf_gguf"))


@pytest.fixture(scope="session")
def tiny_qwen2(model_cache: ModelCache) -> BuiltModel:
    """hidden 64, 4 layers, 4 heads / 2 KV heads (GQA), head_dim 16, qkv bias, real Qwen2 vocab."""
    return model_cache.get("qwen2")


@pytest.fixture(scope="session")
def tiny_phi3(model_cache: ModelCache) -> BuiltModel:
    """hidden 128, 4 layers, 4 heads MHA, head_dim 32, fused qkv / gate_up, real Phi-3 vocab."""
    return model_cache.get("phi3")
