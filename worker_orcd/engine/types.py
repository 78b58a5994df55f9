"""Public value types of the engine: what a request asks for and what it gets back."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from worker_orcd.errors import InvalidRequestError

U64_MAX = 2**64 - 1
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs allows


class StopReason(str, enum.Enum):
    MAX_TOKENS = "MAX_TOKENS"
    EOS = "EOS"
    STOP_SEQUENCE = "STOP_SEQUENCE"
    CONTEXT_FULL = "CONTEXT_FULL"
    CANCELLED = "CANCELLED"


@dataclass(slots=True)
class SamplingParams:
    """Decoding settings. temperature 0 is greedy; top_k 0, top_p 1, min_p 0, repetition penalty
    1 and presence and frequency penalties 0 are off."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    # OpenAI's, as vLLM applies them: over the generated tokens only, each id's logit less
    # presence_penalty once it has appeared and frequency_penalty times its count
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # End-of-generation tokens do not end the request (vLLM's and llama.cpp's ignore_eos): it runs
    # to max_tokens, as llama-batched-bench's streams do; `bench --streams` sets it.
    ignore_eos: bool = False
    # Report each generated token's log-probability and this many most likely alternatives, from
    # the model's distribution (log-softmax of the raw logits, before penalties and sampling
    # settings, as vLLM reports them by default); None: off
    logprobs: int | None = None

    def validate(self) -> None:
        """Raise InvalidRequestError naming every field that is out of range."""
        problems: list[str] = []
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            problems.append(f"max_tokens must be an integer >= 1 (got {self.max_tokens!r})")
        if not _finite(self.temperature) or not 0.0 <= self.temperature <= 2.0:
            problems.append(f"temperature must be in [0, 2] (got {self.temperature!r})")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0 (got {self.top_k!r})")
        if not _finite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p!r})")
        if not _finite(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            problems.append(f"min_p must be in [0, 1] (got {self.min_p!r})")
        if not _finite(self.repetition_penalty) or not 0.0 < self.repetition_penalty <= 2.0:
            problems.append(
                f"repetition_penalty must be in (0, 2] (got {self.repetition_penalty!r})"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _finite(value) or not -2.0 <= value <= 2.0:
                problems.append(f"{name} must be in [-2, 2] (got {value!r})")
        seed = self.seed
        if seed is not None and (not isinstance(seed, int) or not 0 <= seed <= U64_MAX):
            problems.append(f"seed must be an unsigned 64-bit integer (got {self.seed!r})")
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append("stop must hold non-empty strings")
        if not isinstance(self.ignore_eos, bool):
            problems.append(f"ignore_eos must be true or false (got {self.ignore_eos!r})")
        lp = self.logprobs
        if lp is not None and (
            isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= MAX_LOGPROBS
        ):
            problems.append(
                f"logprobs must be null or an integer in [0, {MAX_LOGPROBS}] (got {lp!r})"
            )
        if problems:
            raise InvalidRequestError("; ".join(problems))

    @property
    def counts_outputs(self) -> bool:
        """Whether the presence or frequency penalty needs the counts of generated ids."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(slots=True)
class Timings:
    prompt_tokens: int = 0
    prefill_ms: float = 0.0
    first_token_ms: float = 0.0
    decode_ms: float = 0.0
    tokens_out: int = 0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / (self.prefill_ms / 1e3) if self.prefill_ms > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        # The first generated token comes out of prefill; decode steps make the rest.
        steps = max(self.tokens_out - 1, 0)
        return steps / (self.decode_ms / 1e3) if self.decode_ms > 0 else 0.0


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token's log-probability and the most likely alternatives at its position
    (`SamplingParams.logprobs` of them, most likely first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(slots=True)
class GenerationOutput:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    stop_reason: StopReason
    seed: int
    stop_sequence: str | None = None
    timings: Timings = field(default_factory=Timings)
    logprobs: list[TokenLogprob] | None = None  # one per generated token, with params.logprobs
