"""Request: everything request-shaped that hangs off one sequence in the step loop.

The step loop hands each sampled id to `Request.push`, which appends it to the sequence, streams its
text through the stop matcher to `on_text`, and says whether generation ends after it. `finish`
flushes the held-back text, builds the GenerationOutput and calls `on_done` exactly once; `fail`
ends the request with an error instead. Callbacks run on the engine thread: they must be quick
(hand the value to a queue or an event loop) and must not call back into the engine.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from worker_orcd.engine.sequence import Sequence
from worker_orcd.engine.stop import StopMatcher
from worker_orcd.engine.types import (
    GenerationOutput,
    SamplingParams,
    StopReason,
    Timings,
    TokenLogprob,
)
from worker_orcd.errors import WorkerError
from worker_orcd.tokenizer.decoder import IncrementalDecoder

logger = logging.getLogger(__name__)

TextCallback = Callable[[str], None]
DoneCallback = Callable[[GenerationOutput | None, WorkerError | None], None]
LogprobsCallback = Callable[[list[TokenLogprob]], None]


@dataclass(slots=True, eq=False)
class Request:
    seq: Sequence
    params: SamplingParams
    seed: int
    rng: torch.Generator
    decoder: IncrementalDecoder
    eog: frozenset[int]
    context_length: int
    on_text: TextCallback | None = None
    on_done: DoneCallback | None = None
    # with params.logprobs: the entries of the tokens behind each text delta, just before on_text
    # hands it over (and before on_done, those of tokens that gave no text)
    on_logprobs: LogprobsCallback | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    stops: StopMatcher = field(init=False)
    parts: list[str] = field(default_factory=list)
    timings: Timings = field(init=False)
    submitted_at: float = field(default_factory=time.perf_counter)
    scheduled_at: float = 0.0  # first forward pass that carried its prompt
    first_token_at: float = 0.0
    output: GenerationOutput | None = None
    error: WorkerError | None = None
    done: threading.Event = field(default_factory=threading.Event)
    callback_error: Exception | None = None  # on_text raised: the request fails at its next step
    logprobs: list[TokenLogprob] = field(default_factory=list)  # with params.logprobs
    _cancel_seen: bool = False
    _logprobs_sent: int = 0

    def __post_init__(self) -> None:
        self.stops = StopMatcher(self.params.stop)
        self.timings = Timings(prompt_tokens=self.seq.n_prompt)

    def cancelled(self) -> bool:
        """Whether the cancel is set; once seen, it is not polled again."""
        if not self._cancel_seen and self.cancel.is_set():
            self._cancel_seen = True
        return self._cancel_seen

    @property
    def greedy_on_device(self) -> bool:
        """Whether a graph's own argmax picks what `sample` would (greedy, banned ids only)."""
        p = self.params
        return (
            p.temperature == 0
            and p.repetition_penalty == 1.0
            and not p.counts_outputs
            and p.logprobs is None  # the host needs the logits
        )

    def history(self) -> torch.Tensor | None:
        """The ids seen so far, for the repetition penalty (None when it is off)."""
        if self.params.repetition_penalty == 1.0:
            return None
        return torch.tensor(self.seq.token_ids, dtype=torch.int64)

    def outputs(self) -> torch.Tensor | None:
        """The ids generated so far, for the presence and frequency penalties (None when off)."""
        if not self.params.counts_outputs:
            return None
        return torch.tensor(self.seq.generated, dtype=torch.int64)

    def push(self, token: int, logprob: TokenLogprob | None = None) -> StopReason | None:
        """Append token (and its log-probability entry, with params.logprobs), stream its text;
        EOS, STOP_SEQUENCE or a count limit if generation ends after it (None: go on). A cancel is
        the step loop's to check."""
        seq = self.seq
        if not seq.generated and not self.first_token_at:
            self.first_token_at = time.perf_counter()
        seq.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        if token in self.eog:
            return StopReason.EOS
        text, matched = self.stops.feed(self.decoder.push(token))
        self._emit(text)
        if matched is not None:
            return StopReason.STOP_SEQUENCE
        return self.limit()

    def limit(self) -> StopReason | None:
        if len(self.seq.generated) >= self.params.max_tokens:
            return StopReason.MAX_TOKENS
        if len(self.seq) >= self.context_length:
            return StopReason.CONTEXT_FULL
        return None

    def room_for(self, n: int) -> bool:
        """Whether generation can go on once n more tokens are appended (count limits only)."""
        seq = self.seq
        return (
            len(seq.generated) + n < self.params.max_tokens and len(seq) + n < self.context_length
        )

    def _emit(self, text: str) -> None:
        if not text:
            return
        self.parts.append(text)
        self._call(self._send_logprobs)
        if self.on_text is not None:
            self._call(self.on_text, text)

    def _send_logprobs(self) -> None:
        """Hand the entries not yet handed over to on_logprobs."""
        if self.on_logprobs is not None and self._logprobs_sent < len(self.logprobs):
            entries = self.logprobs[self._logprobs_sent :]
            self._logprobs_sent = len(self.logprobs)
            self.on_logprobs(entries)

    def _call(self, fn: Callable[..., None], *args: object) -> None:
        """A listener's callback; its bug ends this request (at its next step), no other."""
        if self.callback_error is not None:
            return
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001
            logger.exception("callback of sequence %d failed", self.seq.seq_id)
            self.callback_error = exc
            self.cancel.set()

    def finish(self, reason: StopReason) -> GenerationOutput | None:
        """End with `reason`: flush the held-back text (a stop string may complete in it), then
        report the output once. A request whose on_text failed ends with that error instead."""
        if self.done.is_set():
            return self.output
        if self.callback_error is None and reason is not StopReason.STOP_SEQUENCE:
            text, _ = self.stops.feed(self.decoder.flush())
            tail = text if self.stops.matched is not None else text + self.stops.flush()
            if self.stops.matched is not None:  # in the flushed text, or held back behind a longer
                reason = StopReason.STOP_SEQUENCE
            self._emit(tail)
        self._call(self._send_logprobs)  # tokens that gave no text: EOS, a stop string's
        if self.callback_error is not None:
            exc = self.callback_error
            self.fail(WorkerError(f"on_text callback failed: {type(exc).__name__}: {exc}"))
            return None
        now = time.perf_counter()
        t = self.timings
        t.tokens_out = len(self.seq.generated)
        start = self.scheduled_at or now
        first = self.first_token_at or now
        t.prefill_ms = (first - start) * 1e3 if self.first_token_at else 0.0
        t.first_token_ms = (first - self.submitted_at) * 1e3 if self.first_token_at else 0.0
        t.decode_ms = (now - first) * 1e3 if self.first_token_at else 0.0
        self.output = GenerationOutput(
            prompt_ids=self.seq.token_ids[: self.seq.n_prompt],
            token_ids=self.seq.generated,
            text="".join(self.parts),
            stop_reason=reason,
            seed=self.seed,
            stop_sequence=self.stops.matched,
            timings=t,
            logprobs=list(self.logprobs) if self.params.logprobs is not None else None,
        )
        _log_request(self.output)
        self._done()
        return self.output

    def fail(self, error: WorkerError) -> None:
        if self.done.is_set():
            return
        self.error = error
        self._done()

    def _done(self) -> None:
        self.done.set()
        if self.on_done is not None:
            try:
                self.on_done(self.output, self.error)
            except Exception:  # noqa: BLE001 - a listener's bug must not stop the step loop
                logger.exception("on_done callback of sequence %d failed", self.seq.seq_id)


class RequestHandle:
    """What `Engine.submit` returns: wait for the output, or cancel (the request then ends with
    CANCELLED within one engine step, keeping the text produced so far)."""

    def __init__(self, request: Request) -> None:
        self._request = request

    @property
    def seed(self) -> int:
        return self._request.seed

    @property
    def prompt_tokens(self) -> int:
        return self._request.seq.n_prompt

    @property
    def done(self) -> bool:
        return self._request.done.is_set()

    def cancel(self) -> None:
        self._request.cancel.set()

    def result(self, timeout: float | None = None) -> GenerationOutput:
        """The output once the request has ended; raises its error if it failed."""
        if not self._request.done.wait(timeout):
            raise TimeoutError(f"request not done after {timeout} s")
        if self._request.error is not None:
            raise self._request.error
        assert self._request.output is not None
        return self._request.output


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
