"""Model loading for the server: a GPU-memory check first, progress lines, one clear error line."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from worker_orcd.errors import InsufficientVramError, ModelLoadError, WorkerError
from worker_orcd.server.logs import log_event
from worker_orcd.server.options import ServerSettings
from worker_orcd.server.worker import ModelFacts

if TYPE_CHECKING:
    from worker_orcd.engine.engine import Engine

logger = logging.getLogger(__name__)

PROGRESS_EVERY_S = 5.0


def load_engine(settings: ServerSettings) -> Engine | None:
    """The loaded engine, or None after logging one `error` line with the code and the path."""
    from worker_orcd.engine.engine import Engine

    wid, path = settings.worker_id, settings.model_path
    size = os.path.getsize(path) if os.path.isfile(path) else None
    log_event(
        logger,
        "model_load_start",
        worker_id=wid,
        path=path,
        file_bytes=size,
        device=settings.device,
        dtype=settings.dtype,
        weights=settings.weights,
        max_context=settings.max_context,
        **settings.batch_kwargs(),
    )
    t0 = time.perf_counter()

    def progress(elapsed: float) -> None:
        log_event(logger, "model_load_progress", worker_id=wid, path=path, elapsed_s=elapsed)

    try:
        if size is None:
            raise ModelLoadError(f"no such file: {path}")
        needed = None
        if settings.device.startswith("cuda"):
            needed = check_vram(settings)
        with _every(PROGRESS_EVERY_S, progress):
            try:
                engine = Engine.load(
                    path,
                    device=settings.device,
                    dtype=settings.dtype,
                    max_context=settings.max_context,
                    weights=settings.weights,
                    **settings.batch_kwargs(),
                    tensor_parallel_size=settings.tensor_parallel_size,
                )
            except ModelLoadError as exc:
                if _is_cuda_oom(exc.__cause__):
                    raise _insufficient(settings, needed, "ran out while loading") from exc
                raise
    except WorkerError as exc:
        log_event(
            logger,
            "error",
            worker_id=wid,
            code=exc.code,
            path=path,
            message=exc.message,
            level=logging.ERROR,
        )
        return None
    info = engine.info()
    log_event(
        logger,
        "model_load_complete",
        worker_id=wid,
        path=path,
        model=engine.model_name,
        load_ms=(time.perf_counter() - t0) * 1e3,
        weight_bytes=info.weight_bytes,
        kv_cache_bytes=info.kv_cache_bytes,
        dtype=info.dtype,
        weights=info.weights,
        device=info.device,
        context_length=info.context_length,
        kv_cache_tokens=info.kv_cache_tokens,
        max_num_seqs=info.max_num_seqs,
        max_batch_tokens=info.max_batch_tokens,
    )
    return engine


def check_vram(settings: ServerSettings) -> int:
    """Estimate what loading needs at least (weights as the file stores them when kept quantized,
    else in the compute dtype, plus a KV cache of --kv-cache-tokens or one full-length sequence)
    and refuse before loading when the GPU has less free; return the estimate. The engine then
    sizes the cache from --gpu-memory-utilization."""
    import torch

    from worker_orcd.config import ModelConfig
    from worker_orcd.engine.engine import resolve_dtype, resolve_weights
    from worker_orcd.gguf import GGUFFile

    device = torch.device(settings.device)
    if not torch.cuda.is_available():
        raise ModelLoadError(f"device '{settings.device}' was asked for but CUDA is not available")
    itemsize = resolve_dtype(settings.dtype, device).itemsize
    with GGUFFile.open(settings.model_path) as f:
        config = ModelConfig.from_gguf(f)
        if resolve_weights(settings.weights, device) == "quantized":
            weights = sum(t.n_bytes for t in f.tensors.values())
        else:
            weights = sum(t.n_elements for t in f.tensors.values()) * itemsize
    context = min(config.context_length, settings.max_context or config.context_length)
    tokens = settings.kv_cache_tokens or context
    kv = 2 * config.n_layers * tokens * config.n_kv_heads * config.head_dim * itemsize
    needed = (weights + kv) // settings.tensor_parallel_size  # about one rank's part
    free, _ = torch.cuda.mem_get_info(device)
    if needed > free:
        raise _insufficient(settings, needed, "not enough free before loading")
    return needed


def _insufficient(settings: ServerSettings, needed: int | None, why: str) -> InsufficientVramError:
    import torch

    free, total = torch.cuda.mem_get_info(torch.device(settings.device))
    return InsufficientVramError(
        f"model does not fit {settings.device} ({why}): needs about {needed} bytes "
        f"(weights + KV cache), {free} of {total} bytes free"
    )


def _is_cuda_oom(exc: BaseException | None) -> bool:
    if exc is None:
        return False
    import torch

    return isinstance(exc, torch.OutOfMemoryError)


@contextlib.contextmanager
def _every(period_s: float, report: Callable[[float], None]) -> Iterator[None]:
    """Call `report(elapsed_s)` every `period_s` until the block ends."""
    done = threading.Event()
    t0 = time.perf_counter()

    def tick() -> None:
        while not done.wait(period_s):
            report(time.perf_counter() - t0)

    thread = threading.Thread(target=tick, name="load-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def model_facts(engine: Engine, settings: ServerSettings) -> ModelFacts:
    info = engine.info()
    return ModelFacts(
        model=info.model_name,
        architecture=info.architecture,
        device=info.device,
        dtype=info.dtype,
        quant_kind=quant_kind(settings.model_path, info.quant_mix),
        weights=info.weights,
        weight_mix=dict(info.weight_mix),
        tokenizer_kind=info.tokenizer_kind,
        vocab_size=info.vocab_size,
        context_length=info.context_length,
        weight_bytes=info.weight_bytes,
        kv_cache_bytes=info.kv_cache_bytes,
    )


def quant_kind(path: str, quant_mix: dict[str, int]) -> str:
    """The file's declared type (`general.file_type`, e.g. Q4_K_M), else its most common
    quantized tensor type."""
    import gguf

    from worker_orcd.gguf import GGUFFile

    with GGUFFile.open(path) as f:
        file_type = f.get("general.file_type")
    if isinstance(file_type, int):
        with contextlib.suppress(ValueError):
            return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_")
    quantized = {k: n for k, n in quant_mix.items() if k not in ("F32", "F16", "BF16")}
    pool = quantized or quant_mix
    return max(pool, key=lambda k: pool[k]) if pool else "unknown"
