"""worker-orcd: a GPU inference worker for Llama-family GGUF models (Qwen2.5, Phi-3)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# Idle OpenMP threads spin by default; on a small CPU machine shared with other work that made
# decode several times slower. Passive waiting costs nothing on a quiet machine. Only effective
# before torch is imported, hence here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
__all__ = ["Engine", "SamplingParams", "GenerationOutput", "StopReason", "__version__"]

if TYPE_CHECKING:
    from worker_orcd.engine.engine import Engine
    from worker_orcd.engine.types import GenerationOutput, SamplingParams, StopReason


def __getattr__(name: str) -> Any:
    # Lazy, so `import worker_orcd` (the CLI, the pull step) does not import torch.
    if name == "Engine":
        from worker_orcd.engine.engine import Engine

        return Engine
    if name in ("SamplingParams", "GenerationOutput", "StopReason"):
        from worker_orcd.engine import types

        return getattr(types, name)
    raise AttributeError(name)
