"""Engine behaviour on a small random model: limits, stops, streaming, cancel, seeds, banned ids."""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import replace

import pytest
import torch

from worker_orcd.engine.engine import Engine
from worker_orcd.engine.types import SamplingParams, StopReason
from worker_orcd.errors import InvalidRequestError, VramOomError

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


def test_check_fits_names_the_numbers(phi3_engine: Engine) -> None:
    phi3_engine.check_fits(200, 56)
    with pytest.raises(InvalidRequestError, match=r"200 tokens \+ max_tokens 57 = 257.*256"):
        phi3_engine.check_fits(200, 57)
    ids = list(range(100, 300))
    with pytest.raises(InvalidRequestError, match="256"):
        phi3_engine.generate(ids, SamplingParams(max_tokens=57, temperature=0.0))
    assert not phi3_engine.scheduler.has_work()


def test_bad_prompts_are_refused(phi3_engine: Engine) -> None:
    with pytest.raises(InvalidRequestError, match="empty"):
        phi3_engine.generate([], GREEDY)
    with pytest.raises(InvalidRequestError, match="32064 is outside"):
        phi3_engine.generate([1, 32064], GREEDY)
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        phi3_engine.generate("hi", SamplingParams(max_tokens=0))


def test_stream_equals_generate_and_decode(phi3_engine: Engine) -> None:
    out = phi3_engine.generate("Once upon a time", GREEDY)
    deltas: list[str] = []
    out2 = phi3_engine.generate("Once upon a time", GREEDY, on_text=deltas.append)
    assert out2.token_ids == out.token_ids
    assert "".join(deltas) == out.text == out2.text
    assert "".join(phi3_engine.stream("Once upon a time", GREEDY)) == out.text
    prev = out.prompt_ids[-1]
    dec = phi3_engine.tokenizer.decoder(prev_id=prev)
    expected = "".join(dec.push(t) for t in out.token_ids) + dec.flush()
    assert out.text == expected
    assert out.stop_reason in (StopReason.MAX_TOKENS, StopReason.EOS)
    t = out.timings
    assert t.prompt_tokens == len(out.prompt_ids) and t.tokens_out == len(out.token_ids)
    assert 0 < t.prefill_ms <= t.first_token_ms


def test_stop_string_cuts_text(phi3_engine: Engine) -> None:
    out = phi3_engine.generate("Once upon a time", SamplingParams(max_tokens=24, temperature=0.0))
    assert len(out.text) > 6
    stop = out.text[3:6]
    first = out.text.find(stop)
    cut = phi3_engine.generate(
        "Once upon a time", SamplingParams(max_tokens=24, temperature=0.0, stop=(stop,))
    )
    assert cut.stop_reason is StopReason.STOP_SEQUENCE
    assert cut.stop_sequence == stop
    assert cut.text == out.text[:first]
    assert cut.token_ids == out.token_ids[: len(cut.token_ids)]


def test_cancel_stops_within_one_step(phi3_engine: Engine) -> None:
    cancel = threading.Event()
    seen: list[str] = []

    def on_text(delta: str) -> None:
        seen.append(delta)
        cancel.set()

    params = SamplingParams(max_tokens=50, temperature=1.0, seed=3)
    out = phi3_engine.generate("Hello", params, on_text=on_text, cancel=cancel)
    assert out.stop_reason is StopReason.CANCELLED
    full = phi3_engine.generate("Hello", params)
    assert len(out.token_ids) < len(full.token_ids)
    assert out.token_ids == full.token_ids[: len(out.token_ids)]


class _SetAfterPolls(threading.Event):
    """An event that reads as set from its n-th poll on, as if a cancel arrived mid-pass."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.polls = 0
        self.n = n

    def is_set(self) -> bool:
        self.polls += 1
        return self.polls >= self.n


@pytest.mark.parametrize("n_polls", [2, 4 + 1 + 3])  # inside the prefill; inside the first decode
def test_cancel_interrupts_a_forward_pass_between_layers(phi3_engine: Engine, n_polls: int) -> None:
    """The 4-layer model polls the cancel before each layer; a cancel seen mid-pass stops the
    request there (no further layer runs), and the engine serves the next request unchanged."""
    params = SamplingParams(max_tokens=8, temperature=0.0)
    cancel = _SetAfterPolls(n_polls)
    out = phi3_engine.generate("Hello there", params, cancel=cancel)
    assert out.stop_reason is StopReason.CANCELLED
    assert cancel.polls == n_polls  # nothing ran after the poll that saw the cancel
    full = phi3_engine.generate("Hello there", params)
    assert out.token_ids == full.token_ids[: len(out.token_ids)]
    assert len(out.token_ids) == (0 if n_polls <= 4 else 1)
    assert not phi3_engine.scheduler.has_work()
    assert phi3_engine.generate("Hello there", params).token_ids == full.token_ids


def test_seed_reproduces_and_is_reported(phi3_engine: Engine) -> None:
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234)
    a = phi3_engine.generate("The weather", params)
    b = phi3_engine.generate("The weather", params)
    assert a.seed == 1234 and a.token_ids == b.token_ids
    c = phi3_engine.generate("The weather", SamplingParams(max_tokens=10, temperature=1.0))
    assert 0 <= c.seed < 2**64
    again = SamplingParams(max_tokens=10, temperature=1.0, seed=c.seed)
    assert phi3_engine.generate("The weather", again).token_ids == c.token_ids


def test_unused_ids_are_never_sampled(phi3_engine: Engine) -> None:
    """Make the padded/unused rows of the output head dominate: greedy and sampling avoid them."""
    unused = list(phi3_engine.tokenizer.unused_ids)
    assert unused, "the Phi-3 vocab pads with unused ids"
    banned = set(phi3_engine.banned_ids.tolist())
    assert set(unused) <= banned
    head = phi3_engine.model.lm_head.weight
    saved = head[unused].clone()
    try:
        with torch.no_grad():
            head[unused] = head[unused].sign() * 50.0
        probe = phi3_engine.score([1, 450, 4799])
        assert int(probe[-1].argmax()) in banned  # the test can tell
        for params in (GREEDY, SamplingParams(max_tokens=12, temperature=2.0, seed=9)):
            out = phi3_engine.generate("Hello there", params)
            assert not set(out.token_ids) & banned
    finally:
        with torch.no_grad():
            head[unused] = saved


def test_repetition_penalty_reaches_the_sampler(phi3_engine: Engine) -> None:
    """A penalty below 1 boosts seen ids: greedy then repeats prompt tokens it would not pick."""
    plain = phi3_engine.generate("a b c d e f", SamplingParams(max_tokens=6, temperature=0.0))
    boost = phi3_engine.generate(
        "a b c d e f", SamplingParams(max_tokens=6, temperature=0.0, repetition_penalty=0.1)
    )
    assert not set(plain.token_ids) & set(plain.prompt_ids)
    assert set(boost.token_ids) <= set(boost.prompt_ids)


def test_presence_and_frequency_penalties_reach_the_sampler(phi3_engine: Engine) -> None:
    """Greedy with the penalties equals a greedy loop over the model's own logits with the
    penalties applied by hand: each id's logit less presence_penalty once generated and
    frequency_penalty per time (vLLM's and OpenAI's definition: generated ids only, the prompt's
    not counted). Negative here, so that they boost what was generated: the random model never
    repeats a token unprompted."""
    prompt = phi3_engine.prompt_ids("a b c d e f")
    params = SamplingParams(
        max_tokens=8, temperature=0.0, presence_penalty=-2.0, frequency_penalty=-1.0
    )
    out = phi3_engine.generate("a b c d e f", params)
    banned = set(phi3_engine.banned_ids.tolist())
    ids: list[int] = []
    for _ in range(8):
        logits = phi3_engine.score(prompt + ids)[-1]
        for i in set(ids):
            logits[i] -= -2.0 - 1.0 * ids.count(i)
        logits[list(banned)] = float("-inf")
        ids.append(int(logits.argmax()))
    assert out.token_ids == ids
    plain = phi3_engine.generate("a b c d e f", SamplingParams(max_tokens=8, temperature=0.0))
    assert plain.token_ids != ids  # the penalties changed the pick: the test can tell


def test_logprobs_are_the_models_distribution_and_stream_once_each(phi3_engine: Engine) -> None:
    """Each generated token's entry: its log-probability and the 3 most likely ids under
    log_softmax of the model's logits at its position, computed apart by `score`; a sampled
    request (temperature 1.7, top-k 5) reports the raw distribution, not the filtered one. The
    entries handed to on_logprobs, before the text they belong to, are the output's, once each."""
    prompt = phi3_engine.prompt_ids("a b c d e f")
    params = SamplingParams(max_tokens=6, temperature=1.7, top_k=5, seed=3, logprobs=3)
    handed: list = []
    events: list[str] = []
    handle = phi3_engine.submit(
        prompt,
        params,
        on_text=lambda text: events.append("text"),
        on_logprobs=lambda entries: (handed.extend(entries), events.append("lp")),
    )
    out = handle.result(timeout=60)
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) == 6
    assert handed == out.logprobs and events[0] == "lp"
    for i, entry in enumerate(out.logprobs):
        lp = phi3_engine.score(prompt + out.token_ids[:i])[-1].log_softmax(-1)
        assert entry.token_id == out.token_ids[i]
        assert entry.logprob == pytest.approx(float(lp[entry.token_id]), abs=1e-4)
        top = lp.topk(3)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert [v for _, v in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)
    plain = phi3_engine.generate(prompt, replace(params, logprobs=None))
    assert plain.logprobs is None and plain.token_ids == out.token_ids  # same draws
    greedy = phi3_engine.generate(prompt, SamplingParams(max_tokens=4, temperature=0.0, logprobs=0))
    assert greedy.logprobs is not None and all(e.top == () for e in greedy.logprobs)


def test_oom_frees_the_request_and_engine_stays_usable(
    phi3_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = phi3_engine.runner
    real_forward = runner.forward
    calls = {"n": 0}

    def flaky(batch, **kw):  # noqa: ANN001, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(batch, **kw)

    monkeypatch.setattr(runner, "forward", flaky)
    free_before = phi3_engine.blocks.num_free
    with pytest.raises(VramOomError):
        phi3_engine.generate("Hello", SamplingParams(max_tokens=8, temperature=0.0))
    assert phi3_engine.blocks.num_free == free_before
    assert not phi3_engine.scheduler.has_work()
    out = phi3_engine.generate("Hello", SamplingParams(max_tokens=4, temperature=0.0))
    assert len(out.token_ids) >= 1


def test_abandoned_stream_does_not_block_the_next_request(phi3_engine: Engine) -> None:
    it = iter(phi3_engine.stream("Hello", SamplingParams(max_tokens=20, temperature=0.0)))
    next(it)
    out = phi3_engine.generate("Hello", SamplingParams(max_tokens=3, temperature=0.0))
    assert len(out.token_ids) == 3 or out.stop_reason is StopReason.EOS
    del it


def test_chat_prompt_with_system(phi3_engine: Engine) -> None:
    user = [{"role": "user", "content": "Hi"}]
    ids = phi3_engine.encode_prompt(messages=user, system="Be brief")
    tok = phi3_engine.tokenizer
    assert ids == tok.encode_chat([{"role": "system", "content": "Be brief"}, *user])
    assert tok.decode(ids).endswith("<|assistant|>")
    with pytest.raises(InvalidRequestError):
        phi3_engine.encode_prompt("Hi", system="Be brief")
    with pytest.raises(InvalidRequestError):
        phi3_engine.encode_prompt()


def test_info(phi3_engine: Engine) -> None:
    info = phi3_engine.info()
    assert info.architecture == "phi3" and info.device == "cpu" and info.dtype == "float32"
    assert info.context_length == 256 and info.vocab_size == 32064
    assert info.weight_bytes == sum(p.numel() * 4 for p in phi3_engine.model.parameters())
    assert info.kv_cache_bytes == 2 * 4 * 256 * 128 * 4
    assert info.quant_mix == {"F32": sum(info.quant_mix.values())}
    assert info.tokenizer_kind == "llama"


def test_context_full_stops_generation(
    phi3_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop's own guard: with the up-front check bypassed, generation stops at the end."""
    monkeypatch.setattr(phi3_engine, "check_fits", lambda n_prompt, max_tokens: None)
    prompt = list(range(1000, 1250))
    out = phi3_engine.generate(prompt, SamplingParams(max_tokens=20, temperature=1.0, seed=1))
    assert out.stop_reason is StopReason.CONTEXT_FULL
    assert len(prompt) + len(out.token_ids) == phi3_engine.context_length
    assert phi3_engine.blocks.num_free == phi3_engine.blocks.num_blocks


def test_request_and_forward_logging(phi3_engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="worker_orcd"):
        out = phi3_engine.generate("Hello", SamplingParams(max_tokens=3, temperature=0.0))
    n = len(out.prompt_ids)
    text = caplog.text
    assert f"forward prefill: {n} tokens, 1 seqs, 4 layers" in text
    assert "forward decode: 1 tokens, 1 seqs, 4 layers" in text
    assert f"request: {n} prompt tokens, prefill" in text
    assert "TTFT" in text and "decode" in text and f"stop {out.stop_reason.value}" in text


def test_cuda_graphs_default_off_on_cpu_and_forced_on_cpu_is_refused(
    phi3_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker_orcd.engine.engine import resolve_cuda_graphs
    from worker_orcd.errors import ModelLoadError
    from worker_orcd.kernels import triton as triton_kernels

    assert phi3_engine.runner.graphs is None
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_cuda_graphs(None, cpu) is False
    assert resolve_cuda_graphs(False, cuda) is False
    assert resolve_cuda_graphs(True, cuda) is True
    with pytest.raises(ModelLoadError, match="cuda_graphs=True needs a CUDA device"):
        resolve_cuda_graphs(True, cpu)
    with pytest.raises(ModelLoadError, match="cuda_graphs"):
        Engine.load(phi3_engine.path, max_context=64, cuda_graphs=True)
    monkeypatch.setattr(triton_kernels, "available", lambda device=None: True)
    assert resolve_cuda_graphs(None, cuda) is True  # on by default where Triton runs
    monkeypatch.setattr(triton_kernels, "available", lambda device=None: False)
    assert resolve_cuda_graphs(None, cuda) is False


def test_ignore_eos_runs_to_max_tokens(
    phi3_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    free = phi3_engine.generate("Once upon a time", GREEDY)
    assert len(free.token_ids) == 12
    # make the third greedy token an end-of-generation token of this tokenizer
    monkeypatch.setattr(phi3_engine.tokenizer, "_eog", frozenset({free.token_ids[2]}))
    stopped = phi3_engine.generate("Once upon a time", GREEDY)
    assert stopped.stop_reason is StopReason.EOS
    assert stopped.token_ids == free.token_ids[: len(stopped.token_ids)]
    assert len(stopped.token_ids) <= 3
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    kept = phi3_engine.generate("Once upon a time", params)
    assert kept.stop_reason is StopReason.MAX_TOKENS
    assert kept.token_ids == free.token_ids
    with pytest.raises(InvalidRequestError, match="ignore_eos must be true or false"):
        phi3_engine.generate("hi", SamplingParams(ignore_eos="yes"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("presence_penalty", 2.5, "presence_penalty must be in [-2, 2] (got 2.5)"),
        ("frequency_penalty", float("nan"), "frequency_penalty must be in [-2, 2] (got nan)"),
        ("logprobs", 21, "logprobs must be null or an integer in [0, 20] (got 21)"),
        ("logprobs", -1, "logprobs must be null or an integer in [0, 20] (got -1)"),
        ("logprobs", True, "logprobs must be null or an integer in [0, 20] (got True)"),
    ],
)
def test_sampling_params_name_what_is_out_of_range(field: str, value: object, words: str) -> None:
    with pytest.raises(InvalidRequestError, match=re.escape(words)):
        replace(SamplingParams(), **{field: value}).validate()
    SamplingParams(presence_penalty=-2, frequency_penalty=2.0, logprobs=20).validate()
