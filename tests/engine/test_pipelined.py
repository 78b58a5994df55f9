"""Pipelined greedy decode (generation._decode_pipelined) against the host-fed loop.

On CPU the device-fed graph is stood in for by EagerGreedySteps, which keeps the GreedySteps
contract (each launch runs on the previous launch's greedy id) on the eager path, so the loop's
bookkeeping is checked everywhere: tokens, text, stop reasons, usage, and the sequence's cached
count and blocks when it finishes. The GPU tests (-m gpu) run the real decode graph.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass

import pytest
import torch

from tests.support.hf_gguf import make_phi3, write_gguf
from worker_orcd.engine.block_manager import BlockManager
from worker_orcd.engine.engine import Engine
from worker_orcd.engine.sampler import sample
from worker_orcd.engine.scheduler import ScheduledBatch
from worker_orcd.engine.sequence import Sequence, SequenceStatus
from worker_orcd.engine.types import GenerationOutput, SamplingParams, StopReason
from worker_orcd.tokenizer import Tokenizer

GREEDY = SamplingParams(max_tokens=20, temperature=0.0)


class EagerGreedySteps:
    """GreedySteps on the eager path: a launch runs its step at once on the previous step's id
    (masked greedy, as the graph picks) and checks that the block table covers its position."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.next_input = -1
        self.position = -1
        self.unread: deque[int] = deque()
        self.launched: list[int] = []  # positions

    def start(self, token_id: int, position: int, block_table: SequenceOf[int]) -> None:
        self.next_input, self.position = token_id, position

    def launch(self, position: int, block_table: SequenceOf[int]) -> None:
        assert position == self.position
        assert len(block_table) * self.engine.blocks.block_size > position
        seq = Sequence(
            token_ids=[0] * position + [self.next_input],
            n_prompt=position + 1,
            block_table=list(block_table),
            n_cached=position,
        )
        logits = self.engine.runner.forward(ScheduledBatch([seq], [1], is_prefill=False))
        greedy = SamplingParams(temperature=0.0)
        self.next_input = int(sample(logits, [greedy], [None], None, self.engine.banned_ids)[0])
        self.unread.append(self.next_input)
        self.launched.append(position)
        self.position += 1

    def next_id(self) -> int:
        return self.unread.popleft()


@dataclass(slots=True)
class Run:
    out: GenerationOutput
    deltas: list[str]
    finished: tuple[int, int, list[int]]  # len(seq), n_cached, block table when it finished


def generate(
    engine: Engine,
    prompt: str | list[int],
    params: SamplingParams,
    *,
    pipelined: bool,
    cancel: threading.Event | None = None,
    cancel_after_deltas: int | None = None,
) -> Run:
    """One request, recording the sequence's state at the moment the scheduler finishes it."""
    seen: list[tuple[int, int, list[int]]] = []
    real_finish = engine.scheduler.finish

    def finish(seq: Sequence) -> None:
        if seq.status is not SequenceStatus.FINISHED:
            seen.append((len(seq), seq.n_cached, list(seq.block_table)))
        real_finish(seq)

    deltas: list[str] = []

    def on_text(delta: str) -> None:
        deltas.append(delta)
        if cancel is not None and len(deltas) == cancel_after_deltas:
            cancel.set()

    engine.scheduler.finish = finish  # type: ignore[method-assign]
    engine.pipelined_greedy = pipelined
    try:
        out = engine.generate(prompt, params, on_text=on_text, cancel=cancel)
    finally:
        del engine.scheduler.finish
        engine.pipelined_greedy = True
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert not engine.scheduler.has_work()
    (finished,) = seen
    return Run(out, deltas, finished)


def assert_same(fast: Run, slow: Run, *, finished: bool = True) -> None:
    a, b = fast.out, slow.out
    assert a.token_ids == b.token_ids
    assert a.text == b.text and fast.deltas == slow.deltas
    assert (a.stop_reason, a.stop_sequence) == (b.stop_reason, b.stop_sequence)
    assert a.timings.tokens_out == b.timings.tokens_out == len(a.token_ids)
    assert a.timings.prompt_tokens == b.timings.prompt_tokens
    if finished:
        assert fast.finished == slow.finished


class CancelAtLength(threading.Event):
    """Reads as set once the running sequence holds `n` tokens (prompt included)."""

    def __init__(self, engine: Engine, n: int) -> None:
        super().__init__()
        self.engine, self.n = engine, n

    def is_set(self) -> bool:
        running = self.engine.scheduler.running
        return bool(running) and len(running[0]) >= self.n


def scenarios(engine: Engine, monkeypatch: pytest.MonkeyPatch, pipelined: bool) -> list[Run]:
    """Pairs (fast, slow) of every way generation ends, flattened: max_tokens, stop string, EOS,
    cancel from on_text, cancel just after a step that needed a new block, context full."""
    prompt = "Once upon a time"
    runs: list[Run] = []

    def both(
        *args: object, cancel: Callable[[], threading.Event] | None = None, **kw: object
    ) -> None:
        for fast in (pipelined, False):
            event = cancel() if cancel is not None else None
            runs.append(generate(engine, *args, pipelined=fast, cancel=event, **kw))  # type: ignore[arg-type]

    both(prompt, GREEDY)
    ref = runs[-1].out
    assert ref.stop_reason is StopReason.MAX_TOKENS and len(ref.text) > 8
    both(prompt, SamplingParams(max_tokens=20, temperature=0.0, stop=(ref.text[4:7],)))
    with monkeypatch.context() as m:
        eos = ref.token_ids[5]
        m.setattr(Tokenizer, "eog_ids", property(lambda self: frozenset({eos})))
        both(prompt, GREEDY)
    both(prompt, GREEDY, cancel=threading.Event, cancel_after_deltas=3)
    # The last token sits at position 32, the first of block 2: its step, launched ahead, had
    # that block reserved, and it must go back.
    ids = list(range(500, 520))
    both(
        ids,
        SamplingParams(max_tokens=40, temperature=0.0),
        cancel=lambda: CancelAtLength(engine, 33),
    )
    with monkeypatch.context() as m:
        m.setattr(engine, "check_fits", lambda n_prompt, max_tokens: None)
        both(list(range(1000, 1250)), GREEDY)
    return runs


def check_scenarios(runs: list[Run]) -> None:
    reasons = [runs[i].out.stop_reason for i in range(0, len(runs), 2)]
    assert reasons == [
        StopReason.MAX_TOKENS,
        StopReason.STOP_SEQUENCE,
        StopReason.EOS,
        StopReason.CANCELLED,
        StopReason.CANCELLED,
        StopReason.CONTEXT_FULL,
    ]
    for fast, slow in zip(runs[::2], runs[1::2], strict=True):
        assert_same(fast, slow)
    boundary = runs[8]
    assert boundary.finished[:2] == (33, 32) and len(boundary.finished[2]) == 2


def test_pipelined_loop_matches_host_fed(
    phi3_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[EagerGreedySteps] = []

    def greedy_steps() -> EagerGreedySteps:
        made.append(EagerGreedySteps(phi3_engine))
        return made[-1]

    monkeypatch.setattr(phi3_engine.runner, "greedy_steps", greedy_steps)
    runs = scenarios(phi3_engine, monkeypatch, pipelined=True)
    check_scenarios(runs)
    assert len(made) == 6  # the fast runs took the pipelined loop
    # The cancel at a block boundary launched the step at position 32 and then dropped it.
    assert made[4].launched[-1] == 32
    # max_tokens: one step per token after the first, none launched past the limit.
    assert len(made[0].launched) == len(runs[0].out.token_ids) - 1


def test_only_plain_greedy_is_pipelined(
    phi3_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(phi3_engine.runner, "greedy_steps", lambda: calls.append(1))
    for params in (
        SamplingParams(max_tokens=3, temperature=0.7, seed=1),
        SamplingParams(max_tokens=3, temperature=0.0, repetition_penalty=1.3),
    ):
        phi3_engine.generate("Hello", params)
    assert calls == []
    assert phi3_engine.runner.greedy_steps() is None  # the CPU engine has no decode graph


def test_abandoned_pipelined_stream_frees_its_blocks(
    phi3_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(phi3_engine.runner, "greedy_steps", lambda: EagerGreedySteps(phi3_engine))
    it = iter(phi3_engine.stream("Hello", SamplingParams(max_tokens=30, temperature=0.0)))
    next(it)
    out = phi3_engine.generate("Hello", SamplingParams(max_tokens=3, temperature=0.0))
    assert len(out.token_ids) == 3 or out.stop_reason is StopReason.EOS
    assert phi3_engine.blocks.num_free == phi3_engine.blocks.num_blocks
    del it


def test_stop_held_back_until_the_end_is_reported(phi3_engine: Engine) -> None:
    """A stop string complete in the held-back tail (behind a longer candidate that never
    completes) cuts the text at the end and is reported as the stop."""
    for n in range(24, 4, -1):
        text = generate(
            phi3_engine,
            "Once upon a time",
            SamplingParams(max_tokens=n, temperature=0.0),
            pipelined=False,
        ).out.text
        if len(text) >= 2 and text[-1] not in text[:-1] and text[-1] not in "\n":
            break
    else:
        pytest.skip("no generated text ends in a character it has not used before")
    last = text[-1]
    stops = (text[-2:] + "\x07", last)
    params = SamplingParams(max_tokens=n, temperature=0.0, stop=stops)
    out = generate(phi3_engine, "Once upon a time", params, pipelined=False).out
    assert out.text == text[:-1]
    assert out.stop_reason is StopReason.STOP_SEQUENCE and out.stop_sequence == last


def test_block_manager_trim_gives_back_the_tail() -> None:
    bm = BlockManager(8, 4)
    seq = Sequence.from_prompt([1] * 9)
    bm.reserve(seq, 13)
    assert seq.block_table == [0, 1, 2, 3]
    bm.trim(seq, 9)
    assert seq.block_table == [0, 1, 2] and bm.num_free == 5
    bm.trim(seq, 9)
    assert seq.block_table == [0, 1, 2]
    other = Sequence.from_prompt([1])
    bm.reserve(other, 1)
    assert other.block_table == [3]


# -- on the GPU: the captured decode graph ----------------------------------------------------


@pytest.fixture(scope="module")
def cuda_engines(tmp_path_factory: pytest.TempPathFactory) -> tuple[Engine, Engine]:
    """The random Phi-3 of the CPU tests on CUDA: graphs (default) and eager; a peaked head, so
    bf16 rounding cannot flip a greedy pick."""
    from worker_orcd.kernels import triton as triton_kernels

    if not triton_kernels.available("cuda"):
        pytest.skip("CUDA graphs need Triton")
    path = write_gguf(make_phi3(), tmp_path_factory.mktemp("pipelined") / "phi3.gguf")
    graphs = Engine.load(path, device="cuda", max_context=256)
    eager = Engine.load(path, device="cuda", max_context=256, cuda_graphs=False)
    assert graphs.runner.graphs is not None and eager.runner.graphs is None
    for e in (graphs, eager):
        with torch.no_grad():
            e.model.lm_head.weight.mul_(8.0)
    return graphs, eager


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_pipelined_matches_host_fed_and_eager(
    cuda_engines: tuple[Engine, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    graphs, eager = cuda_engines
    made = []
    real = graphs.runner.greedy_steps

    def greedy_steps():  # noqa: ANN202
        made.append(real())
        return made[-1]

    monkeypatch.setattr(graphs.runner, "greedy_steps", greedy_steps)
    runs = scenarios(graphs, monkeypatch, pipelined=True)
    check_scenarios(runs)
    assert len(made) == 6 and all(s is not None for s in made)
    assert made[4].in_flight == 1  # the dropped step of the cancel at the block boundary
    # The eager engine (no graphs: host-fed loop) gives the same requests the same results.
    eager_runs = scenarios(eager, monkeypatch, pipelined=True)
    for fast, slow in zip(runs[::2], eager_runs[::2], strict=True):
        assert_same(fast, slow, finished=True)
    for run in runs[::2]:
        if len(run.out.token_ids) > 2:
            assert run.out.timings.decode_tok_s > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_greedy_never_picks_a_banned_id(cuda_engines: tuple[Engine, Engine]) -> None:
    """Unused ids made to dominate the head: the graph's pick skips them, as the sampler does."""
    graphs, eager = cuda_engines
    unused = list(graphs.tokenizer.unused_ids)
    banned = set(graphs.banned_ids.tolist())
    assert unused and set(unused) <= banned
    saved = [e.model.lm_head.weight[unused].clone() for e in (graphs, eager)]
    try:
        with torch.no_grad():
            for e in (graphs, eager):
                head = e.model.lm_head.weight
                head[unused] = head[unused].sign() * 50.0
        probe = eager.score([1, 450, 4799])
        assert int(probe[-1].argmax()) in banned  # the test can tell
        params = SamplingParams(max_tokens=24, temperature=0.0)
        fast = generate(graphs, "Hello there", params, pipelined=True)
        slow = generate(eager, "Hello there", params, pipelined=False)
        assert not set(fast.out.token_ids) & banned
        assert_same(fast, slow)
    finally:
        with torch.no_grad():
            for e, s in zip((graphs, eager), saved, strict=True):
                e.model.lm_head.weight[unused] = s
