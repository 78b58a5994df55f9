"""Request bodies: parse JSON objects into typed requests, naming every failing field at once.

Validation is written by hand rather than left to a framework so that one 400 answer lists every
field that is wrong together with the constraint it broke, and so that unknown fields are rejected.
`null` counts as absent. The prompt's fit in the context is checked later, once it is tokenized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from worker_orcd.engine.types import MAX_LOGPROBS, U64_MAX, SamplingParams
from worker_orcd.errors import InvalidRequestError
from worker_orcd.server.options import MAX_STOP_STRINGS, PROMPT_MAX_CHARS

CHAT_ROLES = ("system", "user", "assistant", "developer")
MAX_MESSAGES = 256
MAX_JOB_ID_CHARS = 256
OPENAI_COMPLETIONS_DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True, slots=True)
class FieldError:
    field: str
    constraint: str

    def to_dict(self) -> dict[str, str]:
        return {"field": self.field, "constraint": self.constraint}


class RequestValidationError(InvalidRequestError):
    """A request body broke one or more rules; `errors` names each field and its constraint."""

    def __init__(self, errors: list[FieldError]) -> None:
        assert errors, "a validation error needs at least one field"
        detail = "; ".join(f"{e.field} {e.constraint}" for e in errors)
        super().__init__(f"invalid request: {detail}")
        self.errors = errors


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """What to generate from, shared by /execute and the OpenAI endpoints."""

    prompt: str | None
    messages: tuple[dict[str, str], ...] | None
    max_tokens: int | None  # None: as many as --max-tokens-out and the context allow
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    stop: tuple[str, ...]
    seed: int | None
    ignore_eos: bool  # end-of-generation tokens do not end the request (vLLM's, llama.cpp's)
    logprobs: int | None = None  # OpenAI endpoints: alternatives per token's log-probability
    prompt_ids: tuple[int, ...] | None = None  # /v1/completions: a prompt given as token ids

    @property
    def prompt_chars(self) -> int:
        if self.prompt is not None:
            return len(self.prompt)
        if self.prompt_ids is not None:
            return 0
        return sum(len(m["content"]) for m in self.messages or ())

    def sampling(self, *, max_tokens: int, seed: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=seed,
            stop=self.stop,
            ignore_eos=self.ignore_eos,
            logprobs=self.logprobs,
        )


@dataclass(frozen=True, slots=True)
class ExecuteRequest:
    job_id: str
    generation: GenerationRequest


@dataclass(frozen=True, slots=True)
class OpenAIRequest:
    generation: GenerationRequest
    model: str | None
    stream: bool
    include_usage: bool
    echo: bool = False  # completions: the prompt (and its logprobs) ahead of the completion


class _Body:
    """Reads typed fields out of one JSON object, recording every problem instead of stopping."""

    def __init__(self, body: Any, errors: list[FieldError]) -> None:
        self.errors = errors
        self.body: dict[str, Any] = body if isinstance(body, dict) else {}
        if not isinstance(body, dict):
            errors.append(FieldError("body", "must be a JSON object"))
        self.seen: set[str] = set()

    def fail(self, name: str, constraint: str) -> None:
        self.errors.append(FieldError(name, constraint))

    def get(self, name: str) -> Any:
        self.seen.add(name)
        return self.body.get(name)

    def reject_unknown(self) -> None:
        for name in self.body:
            if name not in self.seen:
                self.fail(name, "is not a known field")

    def integer(self, name: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
        value = self.get(name)
        if value is None:
            return default
        rule = f"must be an integer in [{lo}, {hi}]" if hi is not None else ""
        rule = rule or f"must be an integer >= {lo}"
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(name, rule)
            return default
        if value < lo or (hi is not None and value > hi):
            self.fail(name, rule + f" (got {value})")
            return default
        return value

    def number(
        self, name: str, default: float, lo: float, hi: float, *, lo_open: bool = False
    ) -> float:
        value = self.get(name)
        if value is None:
            return default
        rule = f"must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
        if not _is_number(value):
            self.fail(name, rule)
            return default
        if value < lo or value > hi or (lo_open and value == lo):
            self.fail(name, rule + f" (got {value:g})")
            return default
        return float(value)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(name, "must be true or false")
            return default
        return value

    def string(self, name: str, *, required: bool, max_chars: int) -> str | None:
        value = self.get(name)
        if value is None:
            if required:
                self.fail(name, "is required")
            return None
        if not isinstance(value, str) or not 1 <= len(value) <= max_chars:
            self.fail(name, f"must be a string of 1..{max_chars} characters")
            return None
        return value

    def stop(self) -> tuple[str, ...]:
        value = self.get("stop")
        if value is None:
            return ()
        if isinstance(value, str):
            value = [value]
        rule = (
            f"must be a non-empty string or a list of at most {MAX_STOP_STRINGS} non-empty strings"
        )
        if (
            not isinstance(value, list)
            or len(value) > MAX_STOP_STRINGS
            or any(not isinstance(s, str) or not s for s in value)
        ):
            self.fail("stop", rule)
            return ()
        return tuple(value)

    def must_equal(self, name: str, allowed: tuple[Any, ...], rule: str) -> None:
        """OpenAI fields we accept only at their neutral value."""
        value = self.get(name)
        if value is not None and value not in allowed:
            self.fail(name, rule)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _generation(
    b: _Body,
    *,
    max_tokens_out: int,
    default_max_tokens: int | None,
    allow_content_parts: bool,
    allow_token_ids: bool = False,
    min_max_tokens: int = 1,
) -> GenerationRequest:
    prompt_value = b.get("prompt")
    messages_value = b.get("messages")
    prompt: str | None = None
    prompt_ids: tuple[int, ...] | None = None
    messages: tuple[dict[str, str], ...] | None = None
    ids = _token_ids(prompt_value) if allow_token_ids else None
    if prompt_value is None and messages_value is None:
        b.fail("prompt", "is required (or messages)")
    elif prompt_value is not None and messages_value is not None:
        b.fail("prompt", "and messages are mutually exclusive: give one")
    elif ids is not None:
        if len(ids) > PROMPT_MAX_CHARS or any(x < 0 for x in ids):
            b.fail("prompt", f"token ids must be 1..{PROMPT_MAX_CHARS} integers >= 0")
        else:
            prompt_ids = tuple(ids)
    elif prompt_value is not None:
        prompt = _prompt(b, prompt_value, allow_token_ids)
    else:
        messages = _messages(b, messages_value, allow_content_parts)
    return GenerationRequest(
        prompt=prompt,
        messages=messages,
        prompt_ids=prompt_ids,
        max_tokens=b.integer("max_tokens", default_max_tokens, min_max_tokens, max_tokens_out),
        temperature=b.number("temperature", 1.0, 0.0, 2.0),
        top_p=b.number("top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=b.integer("top_k", 0, 0) or 0,
        min_p=b.number("min_p", 0.0, 0.0, 1.0),
        repetition_penalty=b.number("repetition_penalty", 1.0, 0.0, 2.0, lo_open=True),
        presence_penalty=b.number("presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=b.number("frequency_penalty", 0.0, -2.0, 2.0),
        stop=b.stop(),
        seed=b.integer("seed", None, 0, U64_MAX),
        ignore_eos=b.boolean("ignore_eos", False),
    )


def _prompt(b: _Body, value: Any, allow_token_ids: bool = False) -> str | None:
    # The OpenAI completions API also allows a list; we take a list of exactly one string.
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str) or not 1 <= len(value) <= PROMPT_MAX_CHARS:
        ids = f", a list of 1..{PROMPT_MAX_CHARS} token ids" if allow_token_ids else ""
        b.fail("prompt", f"must be a string of 1..{PROMPT_MAX_CHARS} characters{ids}")
        return None
    return value


def _token_ids(value: Any) -> list[int] | None:
    """A prompt of token ids as its list, from OpenAI's two forms for one prompt (a list of
    integers, or a list holding one such list); None for any other value."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], list):
        value = value[0]
    if isinstance(value, list) and value and all(_is_int(x) for x in value):
        return value
    return None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _messages(b: _Body, value: Any, allow_content_parts: bool) -> tuple[dict[str, str], ...] | None:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_MESSAGES:
        b.fail("messages", f"must be a list of 1..{MAX_MESSAGES} messages")
        return None
    out: list[dict[str, str]] = []
    ok = True
    for i, msg in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            b.fail(where, "must be an object with role and content")
            ok = False
            continue
        for key in msg:
            if key not in ("role", "content"):
                b.fail(f"{where}.{key}", "is not a known field")
                ok = False
        role = msg.get("role")
        if role not in CHAT_ROLES:
            b.fail(f"{where}.role", f"must be one of {', '.join(CHAT_ROLES)}")
            ok = False
        content = _content(msg.get("content"), allow_content_parts)
        if content is None:
            rule = "must be a string" + (" or a list of text parts" if allow_content_parts else "")
            b.fail(f"{where}.content", rule)
            ok = False
            continue
        out.append({"role": "system" if role == "developer" else str(role), "content": content})
    if not ok:
        return None
    total = sum(len(m["content"]) for m in out)
    if not 1 <= total <= PROMPT_MAX_CHARS:
        b.fail("messages", f"content must total 1..{PROMPT_MAX_CHARS} characters (got {total})")
        return None
    return tuple(out)


def _content(value: Any, allow_parts: bool) -> str | None:
    if isinstance(value, str):
        return value
    if allow_parts and isinstance(value, list):
        texts = [p.get("text") for p in value if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) == len(value) and all(isinstance(t, str) for t in texts):
            return "".join(texts)
    return None


def parse_execute(body: Any, *, max_tokens_out: int) -> ExecuteRequest:
    errors: list[FieldError] = []
    b = _Body(body, errors)
    job_id = b.string("job_id", required=True, max_chars=MAX_JOB_ID_CHARS)
    generation = _generation(
        b, max_tokens_out=max_tokens_out, default_max_tokens=None, allow_content_parts=False
    )
    b.reject_unknown()
    if errors:
        raise RequestValidationError(errors)
    assert job_id is not None
    return ExecuteRequest(job_id=job_id, generation=generation)


def parse_openai(body: Any, *, chat: bool, max_tokens_out: int) -> OpenAIRequest:
    """/v1/completions (chat=False) or /v1/chat/completions (chat=True)."""
    errors: list[FieldError] = []
    b = _Body(body, errors)
    model = b.string("model", required=False, max_chars=1024)
    if chat:
        # Accept `max_completion_tokens` (the newer name) as well as `max_tokens`.
        if "max_completion_tokens" in b.body and "max_tokens" not in b.body:
            b.body = {**b.body, "max_tokens": b.body["max_completion_tokens"]}
        b.get("max_completion_tokens")
        if "prompt" in b.body:
            b.fail("prompt", "is not a chat field: use messages")
            b.seen.add("prompt")
            b.body = {k: v for k, v in b.body.items() if k != "prompt"}
    elif "messages" in b.body:
        b.fail("messages", "is not a completions field: use prompt")
        b.seen.add("messages")
        b.body = {k: v for k, v in b.body.items() if k != "messages"}
    default_max = None if chat else OPENAI_COMPLETIONS_DEFAULT_MAX_TOKENS
    # completions' echo: the prompt and its tokens' log-probabilities come back ahead of the
    # completion, which may then be empty (max_tokens 0): how evaluation harnesses score text
    echo = False if chat else b.boolean("echo", False)
    generation = _generation(
        b,
        max_tokens_out=max_tokens_out,
        default_max_tokens=default_max,
        allow_content_parts=chat,
        allow_token_ids=not chat,
        min_max_tokens=0 if echo else 1,
    )
    stream = b.boolean("stream", False)
    if echo and stream:
        b.fail("echo", "is supported without stream only")
    include_usage = False
    options = b.get("stream_options")
    if options is not None:
        if not stream:
            b.fail("stream_options", "is only allowed with stream: true")
        elif not isinstance(options, dict) or set(options) - {"include_usage"}:
            b.fail("stream_options", "must be an object with at most include_usage")
        elif not isinstance(options.get("include_usage", False), bool):
            b.fail("stream_options.include_usage", "must be true or false")
        else:
            include_usage = bool(options.get("include_usage", False))
    b.must_equal("n", (1,), "must be 1")
    b.must_equal("logit_bias", ({},), "must be empty (not supported)")
    b.get("user")
    if chat:  # logprobs: true, and top_logprobs alternatives (0 without it)
        top = b.integer("top_logprobs", None, 0, MAX_LOGPROBS)
        logprobs = (top or 0) if b.boolean("logprobs", False) else None
        if top is not None and logprobs is None:
            b.fail("top_logprobs", "needs logprobs: true")
        b.must_equal("response_format", ({"type": "text"},), 'must be {"type": "text"}')
    else:  # logprobs: the alternatives per token
        logprobs = b.integer("logprobs", None, 0, MAX_LOGPROBS)
        b.must_equal("best_of", (1,), "must be 1")
        b.must_equal("suffix", ("",), "must be empty (not supported)")
    b.reject_unknown()
    if errors:
        raise RequestValidationError(errors)
    return OpenAIRequest(
        generation=replace(generation, logprobs=logprobs),
        model=model,
        stream=stream,
        include_usage=include_usage,
        echo=echo,
    )
