"""Request validation: every rule of /execute and the OpenAI bodies, all failures at once."""

from __future__ import annotations

from typing import Any

import pytest

from worker_orcd.engine.types import U64_MAX
from worker_orcd.server.schemas import RequestValidationError, parse_execute, parse_openai

MAX_OUT = 64
USER_X = [{"role": "user", "content": "x"}]


def fields_of(body: Any) -> dict[str, str]:
    with pytest.raises(RequestValidationError) as info:
        parse_execute(body, max_tokens_out=MAX_OUT)
    return {e.field: e.constraint for e in info.value.errors}


def test_minimal_body_gets_defaults() -> None:
    req = parse_execute({"job_id": "j", "prompt": "hi"}, max_tokens_out=MAX_OUT)
    g = req.generation
    assert (req.job_id, g.prompt, g.messages, g.max_tokens, g.seed) == ("j", "hi", None, None, None)
    assert (g.temperature, g.top_p, g.top_k, g.min_p, g.repetition_penalty, g.stop) == (
        1.0,
        1.0,
        0,
        0.0,
        1.0,
        (),
    )
    assert g.ignore_eos is False
    params = g.sampling(max_tokens=5, seed=7)
    params.validate()
    assert (params.max_tokens, params.seed, params.ignore_eos) == (5, 7, False)


def test_full_body_is_read() -> None:
    req = parse_execute(
        {
            "job_id": "j",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": MAX_OUT,
            "temperature": 0,
            "top_p": 0.5,
            "top_k": 40,
            "min_p": 0.05,
            "repetition_penalty": 2,
            "stop": ["a", "b", "c", "d"],
            "seed": U64_MAX,
            "ignore_eos": True,
            "presence_penalty": -2,
            "frequency_penalty": 0.5,
        },
        max_tokens_out=MAX_OUT,
    )
    g = req.generation
    assert g.messages == ({"role": "user", "content": "hi"},)
    assert (g.max_tokens, g.temperature, g.top_p, g.top_k, g.min_p) == (MAX_OUT, 0.0, 0.5, 40, 0.05)
    assert (g.repetition_penalty, g.stop, g.seed) == (2.0, ("a", "b", "c", "d"), U64_MAX)
    assert g.ignore_eos is True and g.sampling(max_tokens=1, seed=0).ignore_eos is True
    params = g.sampling(max_tokens=1, seed=0)
    assert (params.presence_penalty, params.frequency_penalty) == (-2.0, 0.5)


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("job_id", "", "1..256"),
        ("job_id", 5, "string"),
        ("prompt", "", "1..32768"),
        ("prompt", "x" * 32769, "1..32768"),
        ("prompt", ["a", "b"], "string"),
        ("max_tokens", 0, f"[1, {MAX_OUT}]"),
        ("max_tokens", MAX_OUT + 1, f"[1, {MAX_OUT}]"),
        ("max_tokens", 2.0, "integer"),
        ("max_tokens", True, "integer"),
        ("temperature", -0.1, "[0, 2]"),
        ("temperature", 2.01, "[0, 2]"),
        ("temperature", "1", "number"),
        ("top_p", 0, "(0, 1]"),
        ("top_p", 1.5, "(0, 1]"),
        ("top_k", -1, ">= 0"),
        ("min_p", 1.1, "[0, 1]"),
        ("repetition_penalty", 0, "(0, 2]"),
        ("repetition_penalty", 2.5, "(0, 2]"),
        ("presence_penalty", 2.01, "[-2, 2]"),
        ("frequency_penalty", -3, "[-2, 2]"),
        ("frequency_penalty", "1", "number"),
        ("stop", ["a", "b", "c", "d", "e"], "at most 4"),
        ("stop", [""], "non-empty"),
        ("stop", [1], "non-empty"),
        ("seed", -1, f"[0, {U64_MAX}]"),
        ("seed", U64_MAX + 1, f"[0, {U64_MAX}]"),
        ("seed", 1.5, "integer"),
        ("ignore_eos", 1, "true or false"),
        ("ignore_eos", "yes", "true or false"),
        ("surprise", 1, "not a known field"),
    ],
)
def test_each_rule_names_field_and_constraint(field: str, value: Any, words: str) -> None:
    body = {"job_id": "j", "prompt": "hi", field: value}
    errors = fields_of(body)
    assert list(errors) == [field]
    assert words in errors[field]


def test_every_failing_field_is_reported_together() -> None:
    errors = fields_of(
        {
            "job_id": "",
            "prompt": "hi",
            "temperature": 9,
            "top_p": 0,
            "top_k": -2,
            "stop": ["a"] * 5,
            "bogus": True,
            "also": None,
        }
    )
    assert set(errors) == {"job_id", "temperature", "top_p", "top_k", "stop", "bogus", "also"}


def test_prompt_or_messages() -> None:
    assert "required" in fields_of({"job_id": "j"})["prompt"]
    both = {"job_id": "j", "prompt": "a", "messages": [{"role": "user", "content": "b"}]}
    errors = fields_of(both)
    assert "mutually exclusive" in errors["prompt"]


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([], "messages"),
        ("hi", "messages"),
        ([{"role": "robot", "content": "x"}], "messages[0].role"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": "x", "name": "n"}], "messages[0].name"),
        ([{"role": "user", "content": "x"}, "x"], "messages[1]"),
        ([{"role": "user", "content": ""}], "messages"),
        ([{"role": "user", "content": [{"type": "text", "text": "x"}]}], "messages[0].content"),
    ],
)
def test_message_rules(messages: Any, field: str) -> None:
    assert field in fields_of({"job_id": "j", "messages": messages})


def test_body_must_be_an_object() -> None:
    assert "body" in fields_of(["job_id"])


def test_openai_completions_defaults_and_extensions() -> None:
    req = parse_openai(
        {
            "model": "m",
            "prompt": ["hi"],
            "stream": True,
            "stream_options": {"include_usage": True},
            "stop": "\n",
            "n": 1,
            "presence_penalty": 0,
            "logprobs": None,
            "user": "u",
            "top_k": 5,
            "ignore_eos": True,
        },
        chat=False,
        max_tokens_out=MAX_OUT,
    )
    assert (req.model, req.stream, req.include_usage) == ("m", True, True)
    g = req.generation
    assert (g.prompt, g.max_tokens, g.stop, g.top_k, g.ignore_eos) == ("hi", 16, ("\n",), 5, True)
    assert (g.presence_penalty, g.frequency_penalty, g.logprobs) == (0.0, 0.0, None)
    for prompt in ([5, 6, 7], [[5, 6, 7]]):  # token ids, as OpenAI takes them
        req = parse_openai({"prompt": prompt}, chat=False, max_tokens_out=MAX_OUT)
        assert (req.generation.prompt, req.generation.prompt_ids) == (None, (5, 6, 7))
    req = parse_openai(
        {"prompt": "x", "echo": True, "max_tokens": 0}, chat=False, max_tokens_out=MAX_OUT
    )
    assert req.echo and req.generation.max_tokens == 0
    for body, want in [({"logprobs": 3}, 3), ({"logprobs": 0}, 0)]:
        req = parse_openai({"prompt": "x", **body}, chat=False, max_tokens_out=MAX_OUT)
        assert req.generation.sampling(max_tokens=1, seed=0).logprobs == want
    for body, want in [
        ({"logprobs": True, "top_logprobs": 5}, 5),
        ({"logprobs": True}, 0),
        ({"logprobs": False}, None),
    ]:
        req = parse_openai({"messages": USER_X, **body}, chat=True, max_tokens_out=MAX_OUT)
        assert req.generation.logprobs == want


def test_openai_chat_accepts_content_parts_and_max_completion_tokens() -> None:
    req = parse_openai(
        {
            "model": "m",
            "max_completion_tokens": 7,
            "messages": [
                {"role": "developer", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
            ],
        },
        chat=True,
        max_tokens_out=MAX_OUT,
    )
    assert req.generation.max_tokens == 7
    assert req.generation.messages == (
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab"},
    )
    assert not req.stream


@pytest.mark.parametrize(
    ("chat", "body", "field"),
    [
        (False, {"prompt": "x", "n": 2}, "n"),
        (False, {"prompt": "x", "best_of": 3}, "best_of"),
        (False, {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        (False, {"messages": [{"role": "user", "content": "x"}]}, "messages"),
        (True, {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "prompt"),
        (True, {"messages": USER_X, "frequency_penalty": 2.5}, "frequency_penalty"),
        (False, {"prompt": "x", "presence_penalty": -2.1}, "presence_penalty"),
        (True, {"messages": USER_X, "tools": []}, "tools"),
        (True, {"messages": USER_X, "logprobs": 1}, "logprobs"),
        (True, {"messages": USER_X, "top_logprobs": 2}, "top_logprobs"),
        (True, {"messages": USER_X, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        (False, {"prompt": "x", "logprobs": 21}, "logprobs"),
        (False, {"prompt": "x", "logprobs": True}, "logprobs"),
        (False, {"prompt": "x", "echo": True, "stream": True}, "echo"),
        (False, {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        (False, {"prompt": [[1, -2]]}, "prompt"),
        (False, {"prompt": [[1], [2]]}, "prompt"),
        (True, {"messages": USER_X, "echo": True}, "echo"),
        (False, {"prompt": [1, True]}, "prompt"),
    ],
)
def test_openai_rejections(chat: bool, body: dict[str, Any], field: str) -> None:
    with pytest.raises(RequestValidationError) as info:
        parse_openai(body, chat=chat, max_tokens_out=MAX_OUT)
    assert field in [e.field for e in info.value.errors]
