"""The official `openai` client, unchanged, against the shared live server."""

from __future__ import annotations

import pytest

from tests.server.live_server import LiveServer
from worker_orcd.engine.types import SamplingParams

# A test extra: always there under `make test`; GPU machines that run `-m gpu` may lack it.
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{server.url}/v1", api_key="not-checked", max_retries=0, timeout=120
    )


def greedy(engine, max_tokens: int, logprobs: int | None = None, **prompt: object):  # noqa: ANN001, ANN003, ANN201
    """The in-process engine's greedy output (with `logprobs` alternatives per token)."""
    ids = engine.encode_prompt(**prompt)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, seed=0, logprobs=logprobs)
    return engine.generate(ids, params)


def finish_reasons(chunks: list) -> list[str]:  # noqa: ANN001
    return [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]


def test_models_list(client: openai.OpenAI, engine) -> None:  # noqa: ANN001
    models = client.models.list()
    assert [m.id for m in models.data] == [engine.model_name]


def test_completions(client: openai.OpenAI, engine) -> None:  # noqa: ANN001
    prompt = "def fibonacci(n):"
    ref = greedy(engine, 10, prompt=prompt)
    out = client.completions.create(
        model=engine.model_name, prompt=prompt, max_tokens=10, temperature=0
    )
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    assert out.choices[0].text == ref.text
    assert out.choices[0].finish_reason == ("length" if len(ref.token_ids) == 10 else "stop")
    assert out.usage is not None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (
        len(ref.prompt_ids),
        len(ref.token_ids),
    )
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_completions_streaming_with_usage(client: openai.OpenAI, engine) -> None:  # noqa: ANN001
    prompt = "def fibonacci(n):"
    ref = greedy(engine, 10, prompt=prompt)
    chunks = list(
        client.completions.create(
            model="any",
            prompt=prompt,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ref.text
    assert finish_reasons(chunks) == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids) == 10
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_stop_gives_finish_reason_stop(client: openai.OpenAI, engine) -> None:  # noqa: ANN001
    prompt = "def add(a, b):\n"
    ref = greedy(engine, 16, prompt=prompt)
    stop = ref.text.strip()[:3]
    out = client.completions.create(
        model="any", prompt=prompt, max_tokens=16, temperature=0, stop=[stop]
    )
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == ref.text[: ref.text.index(stop)]


def test_chat_completions(client: openai.OpenAI, engine) -> None:  # noqa: ANN001
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2 + 2? Answer with the number only."},
    ]
    ref = greedy(engine, 16, messages=messages)
    out = client.chat.completions.create(
        model=engine.model_name, messages=messages, max_tokens=16, temperature=0
    )
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    msg = out.choices[0].message
    assert msg.role == "assistant" and msg.content == ref.text
    assert "4" in msg.content
    assert out.choices[0].finish_reason == "stop"  # the model ends its answer
    assert out.usage is not None and out.usage.completion_tokens == len(ref.token_ids)


def test_chat_completions_streaming(client: openai.OpenAI, engine) -> None:  # noqa: ANN001
    messages = [{"role": "user", "content": "Name three colours, comma separated."}]
    ref = greedy(engine, 8, messages=messages)
    stream = client.chat.completions.create(
        model="any",
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    assert finish_reasons(chunks) == ["length" if len(ref.token_ids) == 8 else "stop"]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == len(ref.prompt_ids)


def test_chat_streaming_without_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="any",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=3,
            stream=True,
            seed=7,
            extra_body={"top_k": 20},
        )
    )
    assert all(c.usage is None for c in chunks)
    assert len(finish_reasons(chunks)) == 1


def test_chat_logprobs(client: openai.OpenAI, engine) -> None:  # noqa: ANN001
    """Each generated token with its bytes, its log-probability and the 2 most likely, as the
    engine in this process gives them; the official client parses every field."""
    messages = [{"role": "user", "content": "Name three colours, comma separated."}]
    ref = greedy(engine, 6, 2, messages=messages)
    out = client.chat.completions.create(
        model="any", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )
    content = out.choices[0].logprobs.content
    assert len(content) == len(ref.token_ids) == out.usage.completion_tokens
    for got, want in zip(content, ref.logprobs, strict=True):
        raw = engine.token_bytes(want.token_id)
        assert got.bytes == list(raw) and got.token == raw.decode("utf-8", "replace")
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
        assert [t.bytes for t in got.top_logprobs] == [
            list(engine.token_bytes(t)) for t, _ in want.top
        ]
        assert [t.logprob for t in got.top_logprobs] == pytest.approx(
            [v for _, v in want.top], abs=1e-4
        )
        assert got.top_logprobs[0].logprob >= got.logprob - 1e-6  # greedy: the most likely
    assert "".join(c.token for c in content).startswith(out.choices[0].message.content[:3])


def test_completions_streaming_logprobs(client: openai.OpenAI, engine) -> None:  # noqa: ANN001
    """Across the chunks of a stream: one entry per generated token, each once, in order, the
    offsets running on over the chunks; the chosen token is among each position's top."""
    prompt = "def fibonacci(n):"
    ref = greedy(engine, 10, 1, prompt=prompt)
    chunks = list(
        client.completions.create(
            model="any",
            prompt=prompt,
            max_tokens=10,
            temperature=0,
            logprobs=1,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    parts = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    tokens = [t for p in parts for t in p.tokens]
    values = [v for p in parts for v in p.token_logprobs]
    offsets = [o for p in parts for o in p.text_offset]
    tops = [t for p in parts for t in p.top_logprobs]
    assert len(tokens) == len(ref.token_ids) == chunks[-1].usage.completion_tokens
    assert tokens == [engine.token_bytes(t).decode("utf-8", "replace") for t in ref.token_ids]
    assert values == pytest.approx([e.logprob for e in ref.logprobs], abs=1e-4)
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    assert all(tok in top and len(top) <= 2 for tok, top in zip(tokens, tops, strict=True))


def test_echo_scores_a_prompt_as_generation_saw_it(client: openai.OpenAI, engine) -> None:  # noqa: ANN001
    """echo with max_tokens 0 on a prompt of token ids (how evaluation harnesses score text):
    the prompt comes back as text, its first token without a log-probability, and the tokens a
    completion generated, scored again as prompt (one prefill), get the log-probabilities that
    the decode steps gave them."""
    prompt = "def fibonacci(n):"
    gen = client.completions.create(
        model="any", prompt=prompt, max_tokens=6, temperature=0, logprobs=0
    )
    ids = engine.encode_prompt(prompt=prompt)
    out_ids = greedy(engine, 6, 0, prompt=prompt).token_ids
    scored = client.completions.create(
        model="any", prompt=[ids + out_ids], max_tokens=0, echo=True, logprobs=2
    )
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text == engine.decode(ids + out_ids)
    assert (
        scored.usage.prompt_tokens == len(ids) + len(out_ids)
        and scored.usage.completion_tokens == 0
    )
    assert len(lp.tokens) == len(ids) + len(out_ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    tail = lp.token_logprobs[len(ids) :]
    assert tail == pytest.approx(gen.choices[0].logprobs.token_logprobs, abs=2e-3)
    assert lp.tokens[len(ids) :] == gen.choices[0].logprobs.tokens
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs[1:])  # the top 2, and the token's own
    echoed = client.completions.create(
        model="any", prompt=prompt, max_tokens=3, temperature=0, echo=True
    )
    assert echoed.choices[0].text == prompt + greedy(engine, 3, 0, prompt=prompt).text
    assert echoed.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="outside 0"):
        client.completions.create(model="any", prompt=[[1, 10**7]], max_tokens=1)


def test_invalid_request_is_a_bad_request_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="any", prompt="x", max_tokens=5, temperature=3, n=2)
    error = info.value.body
    assert isinstance(error, dict) and error["code"] == "INVALID_REQUEST"
    assert {f["field"] for f in error["fields"]} == {"temperature", "n"}
