"""Engine: load a GGUF model once, then serve many requests at once through one step loop.

    engine = Engine.load(path)   # cpu/float32; Engine.load(path, device="cuda") is bf16
    out = engine.generate("Hello", SamplingParams(max_tokens=16, temperature=0))
    for delta in engine.stream("Hello", params): ...
    outs = engine.generate_batch(["a", "b"], params)
    handle = engine.submit(prompt, params, on_text=..., on_done=...)  # from any thread

Requests are added from any thread; one engine thread (started with the first request) runs
`step()`: the scheduler picks prompt chunks and one decode token of every running sequence, one
forward pass runs the flat batch, each sequence due samples with its own parameters and seeded
generator, and its Request streams the text, checks stops and ends it. The pieces: Sequence
(state), Scheduler (policy), BlockManager (KV blocks), ModelRunner (tensors), Request (a request's
output side), StepLoop (the engine thread and its steps, steps.py).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from worker_orcd.config import ModelConfig
from worker_orcd.engine.block_manager import BlockManager
from worker_orcd.engine.kv_cache import KVCache, plan_kv_tokens
from worker_orcd.engine.model_runner import ModelRunner
from worker_orcd.engine.parallel import (
    GGUFShard,
    TensorParallelRunner,
    closing_on_error,
    resolve_graphs,
    start_ranks,
)
from worker_orcd.engine.request import (
    DoneCallback,
    LogprobsCallback,
    Request,
    RequestHandle,
    TextCallback,
)
from worker_orcd.engine.sampler import make_generator, token_logprobs
from worker_orcd.engine.scheduler import ScheduledBatch, Scheduler
from worker_orcd.engine.sequence import Sequence
from worker_orcd.engine.steps import EngineStats, StepLoop, StepObserver
from worker_orcd.engine.types import GenerationOutput, SamplingParams, TokenLogprob
from worker_orcd.errors import (
    InsufficientVramError,
    InvalidRequestError,
    ModelLoadError,
    VramOomError,
    WorkerError,
)
from worker_orcd.gguf import GGUFFile
from worker_orcd.loader import WEIGHT_MODES, load_model
from worker_orcd.model import CausalLM
from worker_orcd.parallel import SINGLE, Parallel, rank_config
from worker_orcd.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# Tokens per forward pass (prompt chunks and decode tokens); longer prompts are prefilled in
# chunks over the cached ones.
MAX_BATCH_TOKENS = 4096
MAX_NUM_SEQS = 64  # sequences decoded together
GPU_MEMORY_UTILIZATION = 0.9  # share of the device's memory the weights, cache and work may use


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
    kv_cache_tokens: int  # slots of the paged cache, shared by every sequence
    max_num_seqs: int
    max_batch_tokens: int
    quant_mix: dict[str, int]  # GGUF quant type -> number of tensors in the file
    tokenizer_kind: str
    vocab_size: int
    context_length: int
    tensor_parallel_size: int = 1  # ranks the model is split over (weight_bytes: rank 0's part)


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


class KVCacheBusyError(WorkerError):
    """Blocks a request needs are held by others for now; a retry later can succeed."""

    code = "KV_CACHE_BUSY"
    retriable = True


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
        max_num_seqs: int = MAX_NUM_SEQS,
        max_batch_tokens: int | None = None,
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
            self.blocks,
            max_batch_tokens=max_batch_tokens or min(MAX_BATCH_TOKENS, context_length),
            max_seqs=max_num_seqs,
        )
        self.banned_ids = self._banned_ids()  # [n] int64 on the device
        self.runner = ModelRunner(
            model,
            kv,
            cuda_graphs=resolve_cuda_graphs(cuda_graphs, self.device),
            banned_ids=self.banned_ids,
            max_num_seqs=max_num_seqs,
        )
        self.loop = StepLoop(self.runner, self.scheduler, self.banned_ids, self.device)

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
        max_num_seqs: int = MAX_NUM_SEQS,
        max_batch_tokens: int | None = None,
        kv_cache_tokens: int | None = None,
        gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION,
        tensor_parallel_size: int = 1,
    ) -> Engine:
        """Load a GGUF model; a sequence holds at most min(model context, max_context) tokens.

        The paged KV cache is shared by all sequences: `kv_cache_tokens` slots, or on CUDA as many
        as fit in `gpu_memory_utilization` of the device's memory once the weights are loaded
        (capped at what max_num_seqs full-length sequences could use); on CPU one full-length
        sequence by default, its pages committed as they are written. Up to `max_num_seqs`
        sequences decode together and a forward pass carries at most `max_batch_tokens` tokens
        (default min(4096, context)). `weights`: "quantized" keeps Q4_0/Q5_0/Q8_0/Q4_K/Q5_K/Q6_K
        tensors in their blocks on `device` (fused dequantize-matmul kernels), "dequantized"
        turns every tensor into `dtype`; default quantized on CUDA, dequantized on CPU.
        `cuda_graphs` captures the decode and prompt graphs on CUDA (Triton kernels) and replays
        them where a batch fits; default on for CUDA when Triton is installed, off on CPU (True
        there is an error). `tensor_parallel_size` N > 1 splits the model over N ranks: N - 1
        follower processes are started, one per GPU after `device` on CUDA (engine/parallel.py);
        passes then run eagerly, and every rank's cache has the same slots, planned before the
        followers load (from the free memory less this rank's share of the weights on CUDA).
        """
        start = time.perf_counter()
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError("device 'cuda' was asked for but CUDA is not available")
        compute_dtype = resolve_dtype(dtype, dev)
        weight_mode = resolve_weights(weights, dev)
        use_graphs = resolve_graphs(
            cuda_graphs, tensor_parallel_size, resolve_cuda_graphs(cuda_graphs, dev)
        )
        if max_context is not None and (not isinstance(max_context, int) or max_context < 1):
            raise ModelLoadError(f"max_context must be a positive integer (got {max_context!r})")
        _check_batch_options(
            max_num_seqs, max_batch_tokens, kv_cache_tokens, gpu_memory_utilization
        )
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
            batch_tokens = max_batch_tokens or min(MAX_BATCH_TOKENS, context)

            def kv_tokens_for(kv_config: ModelConfig, weights_to_come: int = 0) -> int:
                return plan_kv_tokens(
                    kv_config,
                    context,
                    dtype=compute_dtype,
                    device=dev,
                    max_num_seqs=max_num_seqs,
                    max_batch_tokens=batch_tokens,
                    kv_cache_tokens=kv_cache_tokens,
                    gpu_memory_utilization=gpu_memory_utilization,
                    weights_to_come=weights_to_come,
                )

            shard_tokens = 0
            if tensor_parallel_size > 1:  # the followers size their caches as rank 0 does
                share = _weight_bytes(f, config, weight_mode, compute_dtype) // tensor_parallel_size
                shard_tokens = kv_tokens_for(
                    rank_config(config, Parallel(0, tensor_parallel_size)), share
                )
            shard = GGUFShard(str(path), compute_dtype, context, weight_mode, shard_tokens)
            group = start_ranks(shard, tensor_parallel_size, dev, config, f.path)
            parallel = SINGLE if group is None else group.parallel
            with closing_on_error(group):
                try:
                    model, report = load_model(
                        f,
                        config,
                        device=dev,
                        dtype=compute_dtype,
                        max_positions=context,
                        weights=weight_mode,
                        parallel=parallel,
                    )
                    kv_config = rank_config(config, parallel)
                    kv_tokens = shard_tokens or kv_tokens_for(kv_config)
                    kv = KVCache.allocate(kv_config, kv_tokens, dtype=compute_dtype, device=dev)
                except torch.OutOfMemoryError as e:
                    need = _weight_bytes(f, config, weight_mode, compute_dtype)
                    tokens = kv_cache_tokens or context
                    kv_need = KVCache.bytes_for(config, tokens, compute_dtype)
                    raise InsufficientVramError(
                        f"out of GPU memory loading {name} on {dev}: weights need "
                        f"~{need / 1e9:.2f} GB and a KV cache of {tokens} tokens "
                        f"{kv_need / 1e9:.2f} GB (a smaller --kv-cache-tokens or --max-context "
                        "shrinks the cache)"
                    ) from e
                if group is not None:
                    group.wait_ready()
        info = EngineInfo(
            model_name=str(name),
            architecture=config.architecture,
            device=str(dev),
            dtype=str(compute_dtype).removeprefix("torch."),
            weights=weight_mode,
            weight_bytes=report.weight_bytes,
            weight_mix=report.weight_mix,
            kv_cache_bytes=kv.nbytes,
            kv_cache_tokens=kv.num_slots,
            max_num_seqs=max_num_seqs,
            max_batch_tokens=batch_tokens,
            quant_mix=quant_mix,
            tokenizer_kind=tokenizer.kind,
            vocab_size=config.vocab_size,
            context_length=context,
            tensor_parallel_size=parallel.size,
        )
        logger.info(
            "loaded %s in %.2fs: %d tensors, weights %.1f MB, KV cache %.1f MB (%d tokens shared "
            "by up to %d sequences of at most %d)",
            name,
            time.perf_counter() - start,
            report.n_tensors,
            report.weight_bytes / 1e6,
            kv.nbytes / 1e6,
            kv.num_slots,
            max_num_seqs,
            context,
        )
        engine = cls(
            model=model,
            config=config,
            tokenizer=tokenizer,
            kv=kv,
            context_length=context,
            info=info,
            path=Path(path),
            cuda_graphs=use_graphs,
            max_num_seqs=max_num_seqs,
            max_batch_tokens=batch_tokens,
        )
        if group is not None:  # rank 0 sends every pass to the followers
            engine.runner = TensorParallelRunner(engine.runner, group)
            engine.loop = StepLoop(engine.runner, engine.scheduler, engine.banned_ids, dev)
        return engine

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
        """A request must fit the context, and the whole KV cache when it runs alone."""
        total = n_prompt + max_tokens
        if total > self.context_length:
            raise InvalidRequestError(
                f"prompt of {n_prompt} tokens + max_tokens {max_tokens} = {total} "
                f"exceeds the context of {self.context_length} tokens"
            )
        slots = self.blocks.num_blocks * self.blocks.block_size
        if total > slots:
            raise InvalidRequestError(
                f"prompt of {n_prompt} tokens + max_tokens {max_tokens} = {total} "
                f"exceeds the KV cache of {slots} tokens"
            )

    # -- scoring and generation ----------------------------------------------------------------

    def score(self, ids: SequenceOf[int]) -> torch.Tensor:
        """float32 logits [len(ids), vocab] at every position, computed on a fresh cache (between
        two engine steps; blocks from the shared pool)."""
        token_ids = self.prompt_ids(ids)
        if len(token_ids) > self.context_length:
            raise InvalidRequestError(
                f"{len(token_ids)} tokens exceed the context of {self.context_length} tokens"
            )
        seq = Sequence.from_prompt(token_ids)
        slots = self.blocks.num_blocks * self.blocks.block_size
        if len(token_ids) > slots:
            raise InvalidRequestError(
                f"{len(token_ids)} tokens exceed the KV cache of {slots} tokens"
            )
        chunk = self.scheduler.max_batch_tokens
        chunks: list[torch.Tensor] = []
        loop = self.loop
        with loop.lock, torch.inference_mode():
            # Running requests may hold the blocks it needs: wait for them to end (between
            # steps), unless called from a step itself, which cannot wait for the next.
            while not self.blocks.can_hold(seq, len(token_ids)):
                if loop.on_engine_thread() or not loop.live():
                    raise KVCacheBusyError(
                        f"{len(token_ids)} tokens need {self.blocks.blocks_for(len(token_ids))} "
                        f"KV blocks; {self.blocks.num_free} of {self.blocks.num_blocks} are free "
                        "while other requests run"
                    )
                loop.stepped.wait()
            try:
                while seq.n_uncached:
                    n = min(seq.n_uncached, chunk)
                    self.blocks.reserve(seq, seq.n_cached + n)
                    batch = ScheduledBatch([seq], [n], is_prefill=True)
                    chunks.append(self.runner.forward(batch, all_logits=True).cpu())
                    seq.n_cached += n
            except torch.OutOfMemoryError as e:
                self.release_cached_memory()
                raise VramOomError(f"out of GPU memory scoring {len(token_ids)} tokens") from e
            finally:
                self.blocks.release(seq)
        return torch.cat(chunks)

    def token_bytes(self, token_id: int) -> bytes:
        """One token's bytes (`Tokenizer.token_bytes`), for log-probability reports."""
        return self.tokenizer.token_bytes(token_id)

    def decode(self, ids: SequenceOf[int]) -> str:
        """Token ids to text, special tokens included (a prompt given as ids, echoed back)."""
        return self.tokenizer.decode(ids)

    def prompt_logprobs(self, ids: SequenceOf[int], top: int) -> list[TokenLogprob]:
        """Each prompt token's log-probability after those before it, with the `top` most likely
        ids at its position, from `score`'s logits (the raw model distribution); the first token
        has none. Blocks: call it off the event loop."""
        token_ids = self.prompt_ids(ids)
        if len(token_ids) < 2:
            return []
        logits = self.score(token_ids)[:-1]
        targets = torch.tensor(token_ids[1:], dtype=torch.int64)
        return token_logprobs(logits, targets, [top] * (len(token_ids) - 1))

    def submit(
        self,
        prompt: str | SequenceOf[int],
        params: SamplingParams,
        *,
        on_text: TextCallback | None = None,
        on_done: DoneCallback | None = None,
        cancel: threading.Event | None = None,
        on_logprobs: LogprobsCallback | None = None,
    ) -> RequestHandle:
        """Queue a request from any thread; it runs batched with the others. Invalid parameters,
        a prompt that does not fit and the like raise InvalidRequestError here. `on_text` gets each
        text delta and `on_done(output, error)` is called exactly once, both on the engine thread
        (keep them quick). Setting `cancel` (or `handle.cancel()`) ends it within one step. With
        params.logprobs, `on_logprobs` gets the entries of the tokens behind each delta just
        before it (and any left, of tokens that gave no text, before on_done)."""
        params.validate()
        prompt_ids = self.prompt_ids(prompt)
        self.check_fits(len(prompt_ids), params.max_tokens)
        seed = params.seed if params.seed is not None else secrets.randbits(64)
        request = Request(
            seq=Sequence.from_prompt(prompt_ids),
            params=params,
            seed=seed,
            rng=make_generator(seed, self.device),
            decoder=self.tokenizer.decoder(prev_id=prompt_ids[-1]),
            eog=frozenset() if params.ignore_eos else self.tokenizer.eog_ids,
            context_length=self.context_length,
            on_text=on_text,
            on_done=on_done,
            on_logprobs=on_logprobs,
            cancel=cancel if cancel is not None else threading.Event(),
        )
        self.loop.add(request)
        return RequestHandle(request)

    def generate(
        self,
        prompt: str | SequenceOf[int],
        params: SamplingParams,
        *,
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerationOutput:
        """Generate from a prompt (text, or token ids), batched with whatever else runs; on_text
        gets each text delta as it is ready (on the engine thread)."""
        self._not_from_a_callback()
        handle = self.submit(prompt, params, on_text=on_text, cancel=cancel)
        try:
            return handle.result()
        except BaseException:
            handle.cancel()  # an interrupted caller leaves nothing running
            raise

    def generate_batch(
        self,
        prompts: SequenceOf[str | SequenceOf[int]],
        params: SamplingParams | SequenceOf[SamplingParams],
    ) -> list[GenerationOutput]:
        """Run many requests together; outputs in prompt order. One SamplingParams serves all, or
        give one per prompt. Every request is validated before any is submitted."""
        per = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per) != len(prompts):
            raise InvalidRequestError(f"{len(per)} sampling parameters for {len(prompts)} prompts")
        ids: list[list[int]] = []
        for i, (prompt, p) in enumerate(zip(prompts, per, strict=True)):
            try:
                p.validate()
                ids.append(self.prompt_ids(prompt))
                self.check_fits(len(ids[-1]), p.max_tokens)
            except InvalidRequestError as e:
                raise InvalidRequestError(f"request {i}: {e.message}") from e
        self._not_from_a_callback()
        handles: list[RequestHandle] = []
        try:
            for prompt_ids, p in zip(ids, per, strict=True):
                handles.append(self.submit(prompt_ids, p))
            return [h.result() for h in handles]
        except BaseException:
            for h in handles:
                h.cancel()
            raise

    def stream(
        self,
        prompt: str | SequenceOf[int],
        params: SamplingParams,
        cancel: threading.Event | None = None,
    ) -> Iterator[str]:
        """Text deltas as they are generated; the generator's return value is the
        GenerationOutput. Closing the generator early cancels the request."""
        deltas: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        handle = self.submit(
            prompt, params, on_text=deltas.put, on_done=lambda *_: deltas.put(None), cancel=cancel
        )
        return _drain(handle, deltas)

    def _not_from_a_callback(self) -> None:
        """Waiting for a result on the engine thread would wait for itself."""
        if self.loop.on_engine_thread():
            raise RuntimeError(
                "generate() was called from an on_text / on_done callback or a step observer, "
                "on the engine thread; use submit() there"
            )

    def stats(self) -> EngineStats:
        """Running and waiting sequences, KV blocks in use, preemptions, steps so far."""
        return self.loop.stats()

    def set_step_observer(self, observer: StepObserver | None) -> None:
        """Called on the engine thread after every forward pass with (sequences, tokens)."""
        self.loop.on_step = observer

    def close(self) -> None:
        """Stop the engine thread (requests still running end with CANCELLED) and the other
        ranks of a model split over several."""
        self.loop.close()
        if isinstance(self.runner, TensorParallelRunner):
            self.runner.close()

    def release_cached_memory(self) -> None:
        """After a GPU OOM: hand the allocator's cached blocks back (the request's are freed)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _drain(
    handle: RequestHandle, deltas: queue.SimpleQueue[str | None]
) -> Generator[str, None, GenerationOutput]:
    try:
        while (delta := deltas.get()) is not None:
            yield delta
        return handle.result()
    finally:
        if not handle.done:  # closed early: the request ends within one step, blocks freed
            handle.cancel()
            with contextlib.suppress(WorkerError):
                handle.result()


def _weight_bytes(f: GGUFFile, config: ModelConfig, weights: str, dtype: torch.dtype) -> int:
    """About what the model's weights take on the device."""
    if weights == "quantized":  # about the file's size (F32 norms stay small)
        return sum(t.n_bytes for t in f.tensors.values())
    return config.n_params_estimate() * torch.empty(0, dtype=dtype).element_size()


def _check_batch_options(
    max_num_seqs: int,
    max_batch_tokens: int | None,
    kv_cache_tokens: int | None,
    gpu_memory_utilization: float,
) -> None:
    problems = []
    if not isinstance(max_num_seqs, int) or max_num_seqs < 1:
        problems.append(f"max_num_seqs must be a positive integer (got {max_num_seqs!r})")
    if max_batch_tokens is not None and (
        not isinstance(max_batch_tokens, int) or max_batch_tokens < 1
    ):
        problems.append(f"max_batch_tokens must be a positive integer (got {max_batch_tokens!r})")
    if kv_cache_tokens is not None and (
        not isinstance(kv_cache_tokens, int) or kv_cache_tokens < 1
    ):
        problems.append(f"kv_cache_tokens must be a positive integer (got {kv_cache_tokens!r})")
    if not 0.0 < gpu_memory_utilization <= 1.0:
        problems.append(f"gpu_memory_utilization must be in (0, 1] (got {gpu_memory_utilization})")
    if problems:
        raise ModelLoadError("; ".join(problems))
