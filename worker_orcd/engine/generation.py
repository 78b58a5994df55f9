"""The per-request generation loop: prefill, then sample / stream / stop / decode until done.

A generator yielding text deltas and returning the GenerationOutput, so that Engine.generate
(callback) and Engine.stream (iterator) share one code path. Decode takes one of two loops: greedy
requests on the decode graph run pipelined (the graph feeds its argmax back and the host reads each
id one step behind); everything else samples each step's logits on the host-fed path.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Generator
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from worker_orcd.engine.sampler import make_generator, sample
from worker_orcd.engine.scheduler import ScheduledBatch
from worker_orcd.engine.sequence import Sequence
from worker_orcd.engine.stop import StopMatcher
from worker_orcd.engine.types import GenerationOutput, SamplingParams, StopReason, Timings
from worker_orcd.errors import VramOomError
from worker_orcd.model import ForwardAborted
from worker_orcd.tokenizer.decoder import IncrementalDecoder

if TYPE_CHECKING:
    from worker_orcd.engine.engine import Engine

logger = logging.getLogger(__name__)


class GreedyStepper(Protocol):
    """Device-fed greedy steps of one sequence (cuda_graphs.GreedySteps): `start` gives the first
    step's input token, each `launch` runs one step on the previous step's output without waiting,
    `next_id` returns the oldest unread step's id."""

    def start(self, token_id: int, position: int, block_table: SequenceOf[int]) -> None: ...

    def launch(self, position: int, block_table: SequenceOf[int]) -> None: ...

    def next_id(self) -> int: ...


@dataclass(slots=True)
class _Emitter:
    """Takes the sampled ids in order: appends each to the sequence, streams its text through the
    stop matcher, and says why generation ends after it."""

    seq: Sequence
    decoder: IncrementalDecoder
    stops: StopMatcher
    eog: frozenset[int]
    max_tokens: int
    context_length: int
    cancel: threading.Event | None
    parts: list[str] = field(default_factory=list)

    def push(self, token: int) -> tuple[str, StopReason | None]:
        """Append token; its text to emit now, and EOS or STOP_SEQUENCE if it ends generation."""
        self.seq.append(token)
        if token in self.eog:
            return "", StopReason.EOS
        text, matched = self.stops.feed(self.decoder.push(token))
        if text:
            self.parts.append(text)
        return text, StopReason.STOP_SEQUENCE if matched is not None else None

    def emit(self, token: int) -> Generator[str, None, StopReason | None]:
        """Append token and yield its text; return what ends generation after it (None: go on).
        The count limits and the cancel are checked after the text went out."""
        text, reason = self.push(token)
        if text:
            yield text
        return reason if reason is not None else self.limit()

    def limit(self) -> StopReason | None:
        """After the text of the last token went out: a count limit reached, or a cancel."""
        if len(self.seq.generated) >= self.max_tokens:
            return StopReason.MAX_TOKENS
        if len(self.seq) >= self.context_length:
            return StopReason.CONTEXT_FULL
        if self.cancel is not None and self.cancel.is_set():
            return StopReason.CANCELLED
        return None

    def room_for(self, n: int) -> bool:
        """Whether generation can go on once n more tokens are appended (count limits only)."""
        seq = self.seq
        return len(seq.generated) + n < self.max_tokens and len(seq) + n < self.context_length


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
    stops = StopMatcher(params.stop)
    out = _Emitter(
        seq,
        engine.tokenizer.decoder(prev_id=prompt_ids[-1]),
        stops,
        engine.tokenizer.eog_ids,
        params.max_tokens,
        engine.context_length,
        cancel,
    )
    timings = Timings(prompt_tokens=len(prompt_ids))
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
        greedy = None if token is None else _greedy_stepper(engine, params)
        if greedy is not None:
            reason = yield from _decode_pipelined(engine, out, token, greedy)
        else:
            reason = yield from _decode_host_fed(engine, out, token, params, rng, history, abort)
        timings.decode_ms = (time.perf_counter() - prefill_end) * 1e3
        if reason is not StopReason.STOP_SEQUENCE:
            text, _ = stops.feed(out.decoder.flush())
            tail = text if stops.matched is not None else text + stops.flush()
            if stops.matched is not None:  # in the flushed text, or held back behind a longer one
                reason = StopReason.STOP_SEQUENCE
            if tail:
                out.parts.append(tail)
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
    result = GenerationOutput(
        prompt_ids=prompt_ids,
        token_ids=seq.generated,
        text="".join(out.parts),
        stop_reason=reason,
        seed=seed,
        stop_sequence=stops.matched,
        timings=timings,
    )
    _log_request(result)
    return result


def _decode_host_fed(
    engine: Engine,
    out: _Emitter,
    token: int | None,
    params: SamplingParams,
    rng: torch.Generator,
    history: torch.Tensor | None,
    abort: Callable[[], bool] | None,
) -> Generator[str, None, StopReason]:
    """Any sampling: each step's logits sampled, the id read on the host, then the next step's
    inputs written from the host."""
    while token is not None:
        reason = yield from out.emit(token)
        if reason is not None:
            return reason
        if history is not None:
            history = torch.cat([history, history.new_tensor([token])])
        logits = _step_until_due(engine, out.seq, abort)
        token = None if logits is None else _sample(engine, logits, params, rng, history)
    return StopReason.CANCELLED


def _greedy_stepper(engine: Engine, params: SamplingParams) -> GreedyStepper | None:
    """Device-fed steps where they pick what `sample` would: greedy with nothing but the banned
    ids applied (filter_logits adds only the repetition penalty to greedy rows)."""
    if not engine.pipelined_greedy or params.temperature != 0 or params.repetition_penalty != 1.0:
        return None
    return engine.runner.greedy_steps()


def _decode_pipelined(
    engine: Engine, out: _Emitter, token: int, greedy: GreedyStepper
) -> Generator[str, None, StopReason]:
    """Greedy decode with the GPU one step ahead of the host.

    The step that consumes token i + 1 is launched before the host has read that token (the graph
    feeds its own argmax back), so it runs while the host streams token i's text and checks the
    stops. A step is launched only where the count limits let generation go on after its input
    token; one whose input token then ends generation (EOS, stop string, cancel) is dropped: its
    token is not cached and the block reserved for it goes back, so the sequence, its blocks and
    the scheduler end as the host-fed loop leaves them.
    """
    seq, blocks = out.seq, engine.blocks
    done = ScheduledBatch([seq], [1], is_prefill=False)

    def launch() -> None:  # the step of the token that goes at len(seq)
        pos = len(seq)
        blocks.reserve(seq, pos + 1)
        greedy.launch(pos, seq.block_table)

    if token not in out.eog and out.room_for(1):
        blocks.reserve(seq, len(seq) + 1)
        greedy.start(token, len(seq), seq.block_table)
        greedy.launch(len(seq), seq.block_table)
    while True:
        # token's step, if generation can go on after token, is in flight
        reason = yield from out.emit(token)
        if reason is not None:
            break
        if out.room_for(1):
            launch()  # the next token's step, ahead of reading that token
        token = greedy.next_id()
        engine.scheduler.postprocess(done)  # the step of the token pushed above has run
    # A step launched for the last token is dropped.
    blocks.trim(seq, seq.n_cached)
    return reason


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
