"""The per-request generation loop: prefill, then sample / stream / stop / decode until done.

A generator yielding text deltas and returning the GenerationOutput, so that Engine.generate
(callback) and Engine.stream (iterator) share one code path.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Generator
from collections.abc import Sequence as SequenceOf
from typing import TYPE_CHECKING

import torch

from worker_orcd.engine.sampler import make_generator, sample
from worker_orcd.engine.sequence import Sequence
from worker_orcd.engine.stop import StopMatcher
from worker_orcd.engine.types import GenerationOutput, SamplingParams, StopReason, Timings
from worker_orcd.errors import VramOomError
from worker_orcd.model import ForwardAborted

if TYPE_CHECKING:
    from worker_orcd.engine.engine import Engine

logger = logging.getLogger(__name__)


def run_generation(
    engine: Engine,
    prompt: str | SequenceOf[int],
    params: SamplingParams,
    cancel: threading.Event | None,
) -> Generator[str, None, GenerationOutput]:
    start = time.perf_counter()
    params.validate()
    prompt_ids = engine.prompt_ids(prompt)
    engine.check_fits(len(prompt_ids), params.max_tokens)
    # One request at a time: anything left by an abandoned stream goes first.
    for stale in [*engine.scheduler.waiting, *engine.scheduler.running]:
        engine.scheduler.finish(stale)
    seed = params.seed if params.seed is not None else secrets.randbits(64)
    rng = make_generator(seed, engine.device)
    seq = Sequence.from_prompt(prompt_ids)
    decoder = engine.tokenizer.decoder(prev_id=prompt_ids[-1])
    stops = StopMatcher(params.stop)
    eog = engine.tokenizer.eog_ids
    timings = Timings(prompt_tokens=len(prompt_ids))
    parts: list[str] = []
    matched: str | None = None
    reason: StopReason
    # The ids seen so far, on the device, for the repetition penalty (None when it is off).
    history: torch.Tensor | None = None
    if params.repetition_penalty != 1.0:
        history = torch.tensor(prompt_ids, dtype=torch.int64, device=engine.device)
    abort = cancel.is_set if cancel is not None else None
    engine.scheduler.add(seq)
    try:
        prefill_start = time.perf_counter()
        logits = _step_until_due(engine, seq, abort)  # prefill (in chunks when long)
        token = None if logits is None else _sample(engine, logits, params, rng, history)
        now = time.perf_counter()
        timings.prefill_ms = (now - prefill_start) * 1e3
        if token is not None:
            timings.first_token_ms = (now - start) * 1e3
        prefill_end = now
        # token is None once a cancel interrupted a forward pass.
        while token is not None:
            seq.append(token)
            if token in eog:
                reason = StopReason.EOS
                break
            text, matched = stops.feed(decoder.push(token))
            if text:
                parts.append(text)
                yield text
            if matched is not None:
                reason = StopReason.STOP_SEQUENCE
                break
            if len(seq.generated) >= params.max_tokens:
                reason = StopReason.MAX_TOKENS
                break
            if len(seq) >= engine.context_length:
                reason = StopReason.CONTEXT_FULL
                break
            if cancel is not None and cancel.is_set():
                reason = StopReason.CANCELLED
                break
            if history is not None:
                history = torch.cat([history, history.new_tensor([token])])
            logits = _step_until_due(engine, seq, abort)
            token = None if logits is None else _sample(engine, logits, params, rng, history)
        else:
            reason = StopReason.CANCELLED
        timings.decode_ms = (time.perf_counter() - prefill_end) * 1e3
        if reason is not StopReason.STOP_SEQUENCE:
            text, matched = stops.feed(decoder.flush())
            tail = text if matched is not None else text + stops.flush()
            if matched is not None:
                reason = StopReason.STOP_SEQUENCE
            if tail:
                parts.append(tail)
                yield tail
    except torch.OutOfMemoryError as e:
        engine.scheduler.finish(seq)
        engine.release_cached_memory()
        raise VramOomError(
            f"out of GPU memory generating from a {len(prompt_ids)}-token prompt; "
            "the request's KV cache was freed"
        ) from e
    finally:
        engine.scheduler.finish(seq)
    timings.tokens_out = len(seq.generated)
    out = GenerationOutput(
        prompt_ids=prompt_ids,
        token_ids=seq.generated,
        text="".join(parts),
        stop_reason=reason,
        seed=seed,
        stop_sequence=matched,
        timings=timings,
    )
    _log_request(out)
    return out


def _step_until_due(
    engine: Engine, seq: Sequence, abort: Callable[[], bool] | None
) -> torch.Tensor | None:
    """Run forward passes until seq's next token is due; return its logits [1, V], or None when
    `abort()` turned True during a pass (the caller finishes the sequence, freeing its blocks)."""
    while True:
        batch = engine.scheduler.schedule()
        try:
            logits = engine.runner.forward(batch, abort=abort)
        except ForwardAborted:
            return None
        if seq in engine.scheduler.postprocess(batch):
            return logits


def _sample(
    engine: Engine,
    logits: torch.Tensor,
    params: SamplingParams,
    rng: torch.Generator,
    history: torch.Tensor | None,
) -> int:
    """The next token from logits [1, V]; history [L] is the sequence so far (repetition
    penalty)."""
    ids = sample(logits, [params], [rng], None if history is None else [history], engine.banned_ids)
    return int(ids[0])


def _log_request(out: GenerationOutput) -> None:
    t = out.timings
    logger.info(
        "request: %d prompt tokens, prefill %.1f ms (%.1f tok/s), TTFT %.1f ms, decode %.1f tok/s, "
        "%d tokens out, stop %s",
        t.prompt_tokens,
        t.prefill_ms,
        t.prefill_tok_s,
        t.first_token_ms,
        t.decode_tok_s,
        t.tokens_out,
        out.stop_reason.value,
    )
