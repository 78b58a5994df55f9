"""Engine: load a GGUF model once, then score prompts and generate text, one request at a time.

    engine = Engine.load(path)   # cpu/float32; Engine.load(path, device="cuda") is bf16
    out = engine.generate("Hello", SamplingParams(max_tokens=16, temperature=0))
    for delta in engine.stream("Hello", params): ...

The engine is driven from one worker thread at a time (the server serialises jobs). The pieces below
it: Sequence (state), Scheduler (policy), BlockManager (KV blocks), ModelRunner (tensors);
generation.py holds the per-request loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from worker_orcd.config import ModelConfig
from worker_orcd.engine.block_manager import BlockManager
from worker_orcd.engine.generation import run_generation
from worker_orcd.engine.kv_cache import KVCache
from worker_orcd.engine.model_runner import ModelRunner
from worker_orcd.engine.scheduler import Scheduler
from worker_orcd.engine.sequence import Sequence
from worker_orcd.engine.types import GenerationOutput, SamplingParams
from worker_orcd.errors import (
    InsufficientVramError,
    InvalidRequestError,
    ModelLoadError,
    VramOomError,
)
from worker_orcd.gguf import GGUFFile
from worker_orcd.loader import WEIGHT_MODES, load_model
from worker_orcd.model import CausalLM
from worker_orcd.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# Prompt tokens per forward pass; longer prompts are prefilled in chunks over the cached ones.
MAX_PREFILL_TOKENS = 4096


@dataclass(frozen=True, slots=True)
class EngineInfo:
    model_name: str
    architecture: str
    device: str
    dtype: str
    weights: str  # "quantized" (GGUF blocks kept on the device) or "dequantized"
    weight_bytes: int  # on the device
    weight_mix: dict[str, int]  # storage type on the device ("Q4_K", "bfloat16", ...) -> bytes
    kv_cache_bytes: int
    quant_mix: dict[str, int]  # GGUF quant type -> number of tensors in the file
    tokenizer_kind: str
    vocab_size: int
    context_length: int


def resolve_weights(weights: str | None, device: torch.device) -> str:
    """Default: GGUF blocks stay quantized, on CUDA (fused Triton kernels) and on the CPU (the
    compiled CPU kernels read them in the file's memory map); "dequantized" is the float path the
    parity tests ask for. On a CPU without the compiled kernels (the extension did not build) the
    default falls back to dequantized, with a warning."""
    if weights is None:
        if device.type == "cpu":
            from worker_orcd.kernels.cpu import ops as cpu_ops

            if not cpu_ops.available():
                cpu_ops.warn_if_unavailable()
                return "dequantized"
        return "quantized"
    if weights not in WEIGHT_MODES:
        raise ModelLoadError(f"unsupported weights={weights!r} (use {' or '.join(WEIGHT_MODES)})")
    return weights


def resolve_cuda_graphs(cuda_graphs: bool | None, device: torch.device) -> bool:
    """Default: captured graphs on CUDA where Triton is installed (the graphs need its kernels),
    eager elsewhere. True asks for graphs and needs a CUDA device."""
    if cuda_graphs is None:
        from worker_orcd.kernels import triton as triton_kernels

        return triton_kernels.available(device)
    if cuda_graphs and device.type != "cuda":
        raise ModelLoadError(f"cuda_graphs=True needs a CUDA device (got {device})")
    return bool(cuda_graphs)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ModelLoadError(f"unsupported compute dtype {dtype} (use {', '.join(DTYPES)})")
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"unsupported compute dtype '{dtype}' (use {', '.join(DTYPES)})")
    return DTYPES[dtype]


class Engine:
    def __init__(
        self,
        *,
        model: CausalLM,
        config: ModelConfig,
        tokenizer: Tokenizer,
        kv: KVCache,
        context_length: int,
        info: EngineInfo,
        path: Path | None = None,
        cuda_graphs: bool | None = None,
    ) -> None:
        self.path = path
        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.device = kv.k.device
        self.dtype = kv.k.dtype
        self.model_name = info.model_name
        self._info = info
        self.blocks = BlockManager(kv.num_blocks, kv.block_size)
        self.scheduler = Scheduler(
            self.blocks, max_batch_tokens=min(MAX_PREFILL_TOKENS, context_length), max_seqs=1
        )
        self.banned_ids = self._banned_ids()  # [n] int64 on the device
        self.runner = ModelRunner(
            model,
            kv,
            cuda_graphs=resolve_cuda_graphs(cuda_graphs, self.device),
            banned_ids=self.banned_ids,
        )
        # Greedy requests (no repetition penalty) decode on the graph fed by its own argmax, the
        # host one token behind; False keeps them on the host-fed loop (bench, tests).
        self.pipelined_greedy = True

    # -- loading -----------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        max_context: int | None = None,
        *,
        cuda_graphs: bool | None = None,
        weights: str | None = None,
    ) -> Engine:
        """Load a GGUF model, KV cache for min(model context, max_context) tokens allocated up
        front. `weights`: "quantized" keeps Q4_0/Q5_0/Q8_0/Q4_K/Q5_K/Q6_K tensors in their blocks
        on `device` (fused dequantize-matmul kernels), "dequantized" turns every tensor into
        `dtype`; default quantized on CUDA, dequantized on CPU. `cuda_graphs` captures the decode
        and prompt graphs on CUDA (Triton kernels) and replays them where a batch fits; default on
        for CUDA when Triton is installed, off on CPU (True there is an error)."""
        start = time.perf_counter()
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError("device 'cuda' was asked for but CUDA is not available")
        compute_dtype = resolve_dtype(dtype, dev)
        weight_mode = resolve_weights(weights, dev)
        use_graphs = resolve_cuda_graphs(cuda_graphs, dev)
        if max_context is not None and (not isinstance(max_context, int) or max_context < 1):
            raise ModelLoadError(f"max_context must be a positive integer (got {max_context!r})")
        with GGUFFile.open(path) as f:
            config = ModelConfig.from_gguf(f)
            tokenizer = Tokenizer.from_gguf(f.metadata)
            context = min(config.context_length, max_context or config.context_length)
            if max_context is not None and max_context > config.context_length:
                logger.info(
                    "max_context %d is beyond the model's context %d; using %d",
                    max_context,
                    config.context_length,
                    context,
                )
            name = f.get("general.name") or Path(path).stem
            quant_mix: dict[str, int] = {}
            for t in f.tensors.values():
                quant_mix[t.qtype.name] = quant_mix.get(t.qtype.name, 0) + 1
            logger.info(
                "loading %s (%s, %d layers) on %s as %s, %s weights, context %d",
                name,
                config.architecture,
                config.n_layers,
                dev,
                str(compute_dtype).removeprefix("torch."),
                weight_mode,
                context,
            )
            try:
                model, report = load_model(
                    f,
                    config,
                    device=dev,
                    dtype=compute_dtype,
                    max_positions=context,
                    weights=weight_mode,
                )
                kv = KVCache.allocate(config, context, dtype=compute_dtype, device=dev)
            except torch.OutOfMemoryError as e:
                if weight_mode == "quantized":  # about the file's size (F32 norms stay small)
                    need = sum(t.n_bytes for t in f.tensors.values())
                else:
                    elem = torch.empty(0, dtype=compute_dtype).element_size()
                    need = config.n_params_estimate() * elem
                kv_need = KVCache.bytes_for(config, context, compute_dtype)
                raise InsufficientVramError(
                    f"out of GPU memory loading {name} on {dev}: weights need ~{need / 1e9:.2f} GB "
                    f"and the KV cache for {context} tokens {kv_need / 1e9:.2f} GB "
                    "(a smaller max_context shrinks the cache)"
                ) from e
        info = EngineInfo(
            model_name=str(name),
            architecture=config.architecture,
            device=str(dev),
            dtype=str(compute_dtype).removeprefix("torch."),
            weights=weight_mode,
            weight_bytes=report.weight_bytes,
            weight_mix=report.weight_mix,
            kv_cache_bytes=kv.nbytes,
            quant_mix=quant_mix,
            tokenizer_kind=tokenizer.kind,
            vocab_size=config.vocab_size,
            context_length=context,
        )
        logger.info(
            "loaded %s in %.2fs: %d tensors, weights %.1f MB, KV cache %.1f MB (%d tokens)",
            name,
            time.perf_counter() - start,
            report.n_tensors,
            report.weight_bytes / 1e6,
            kv.nbytes / 1e6,
            context,
        )
        return cls(
            model=model,
            config=config,
            tokenizer=tokenizer,
            kv=kv,
            context_length=context,
            info=info,
            path=Path(path),
            cuda_graphs=use_graphs,
        )

    def info(self) -> EngineInfo:
        return self._info

    def _banned_ids(self) -> torch.Tensor:
        """Ids sampling must never draw: the tokenizer's unused ids and output rows past its
        vocab."""
        ids = set(self.tokenizer.unused_ids)
        ids.update(range(self.tokenizer.vocab_size, self.config.vocab_size))
        return torch.tensor(
            sorted(i for i in ids if i < self.config.vocab_size),
            dtype=torch.int64,
            device=self.device,
        )

    # -- prompts -----------------------------------------------------------------------------------

    def encode_prompt(
        self,
        prompt: str | None = None,
        messages: SequenceOf[Mapping[str, Any]] | None = None,
        system: str | None = None,
    ) -> list[int]:
        """Token ids of a raw prompt, or of chat messages rendered through the model's template
        (with `system` as a leading system message)."""
        if (prompt is None) == (messages is None):
            raise InvalidRequestError("give exactly one of prompt or messages")
        if messages is None:
            if system is not None:
                raise InvalidRequestError("a system message needs chat messages, not a raw prompt")
            return self.tokenizer.encode(prompt, add_special=True)
        msgs = list(messages)
        if system is not None:
            msgs.insert(0, {"role": "system", "content": system})
        return self.tokenizer.encode_chat(msgs, add_generation_prompt=True)

    def prompt_ids(self, prompt: str | SequenceOf[int]) -> list[int]:
        ids = self.encode_prompt(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not ids:
            raise InvalidRequestError("prompt is empty: it encodes to no tokens")
        vocab = self.config.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise InvalidRequestError(
                f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})"
            )
        return ids

    def check_fits(self, n_prompt: int, max_tokens: int) -> None:
        if n_prompt + max_tokens > self.context_length:
            raise InvalidRequestError(
                f"prompt of {n_prompt} tokens + max_tokens {max_tokens} = {n_prompt + max_tokens} "
                f"exceeds the context of {self.context_length} tokens"
            )

    # -- scoring and generation ----------------------------------------------------------------

    def score(self, ids: SequenceOf[int]) -> torch.Tensor:
        """float32 logits [len(ids), vocab] at every position, computed on a fresh cache."""
        token_ids = self.prompt_ids(ids)
        if len(token_ids) > self.context_length:
            raise InvalidRequestError(
                f"{len(token_ids)} tokens exceed the context of {self.context_length} tokens"
            )
        seq = Sequence.from_prompt(token_ids)
        self.scheduler.add(seq)
        chunks: list[torch.Tensor] = []
        try:
            while seq.n_uncached:
                batch = self.scheduler.schedule()
                chunks.append(self.runner.forward(batch, all_logits=True).cpu())
                self.scheduler.postprocess(batch)
        except torch.OutOfMemoryError as e:
            self.release_cached_memory()
            raise VramOomError(f"out of GPU memory scoring {len(token_ids)} tokens") from e
        finally:
            self.scheduler.finish(seq)
        return torch.cat(chunks)

    def generate(
        self,
        prompt: str | SequenceOf[int],
        params: SamplingParams,
        *,
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerationOutput:
        """Generate from a prompt (text, or token ids); on_text gets each text delta as it is
        ready."""
        steps = run_generation(self, prompt, params, cancel)
        while True:
            try:
                delta = next(steps)
            except StopIteration as done:
                return done.value
            if on_text is not None:
                on_text(delta)

    def stream(
        self,
        prompt: str | SequenceOf[int],
        params: SamplingParams,
        cancel: threading.Event | None = None,
    ) -> Iterator[str]:
        """Text deltas as they are generated; the generator's return value is the
        GenerationOutput."""
        return run_generation(self, prompt, params, cancel)

    def release_cached_memory(self) -> None:
        """After a GPU OOM: hand the allocator's cached blocks back (the request's are freed)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
