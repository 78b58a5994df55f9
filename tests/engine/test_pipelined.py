"""Device-fed greedy decode (steps.StepLoop with DeviceFedSteps) against the host-fed steps.

On CPU the device-fed graphs are stood in for by EagerDeviceFed, which keeps the DeviceFedSteps
contract (each chained launch runs on the previous launch's greedy ids) on the eager path, so the
step loop's bookkeeping is checked everywhere: tokens, text, stop reasons, usage, the sequence's
cached count when it finishes, and the blocks afterwards. The GPU tests (-m gpu) run the real
decode graphs.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
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


class EagerDeviceFed:
    """DeviceFedSteps on the eager path: a launch runs its step at once on the previous step's
    ids (masked greedy, as the graph picks) and checks that the block tables cover it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.inputs: list[int] = []
        self.positions: list[int] = []
        self.unread: deque[tuple[int, list[int]]] = deque()
        self.launched: list[list[int]] = []  # positions of each launch
        self.tickets = 0

    def start(self, token_ids: list[int], positions: list[int], tables: list[list[int]]) -> int:
        assert not self.unread, "read the steps in flight before starting anew"
        self.inputs, self.positions = list(token_ids), list(positions)
        return self._launch(tables)

    def chain(self, tables: list[list[int]]) -> int:
        assert len(self.unread) < 4
        return self._launch(tables)

    def _launch(self, tables: list[list[int]]) -> int:
        bs = self.engine.blocks.block_size
        seqs = []
        for tok, pos, table in zip(self.inputs, self.positions, tables, strict=True):
            assert len(table) * bs > pos, (len(table), pos)
            seqs.append(
                Sequence(
                    token_ids=[0] * pos + [tok],
                    n_prompt=pos + 1,
                    block_table=list(table),
                    n_cached=pos,
                )
            )
        batch = ScheduledBatch(seqs, [1] * len(seqs), is_prefill=False)
        logits = self.engine.runner.forward(batch)
        greedy = [SamplingParams(temperature=0.0)] * len(seqs)
        ids = sample(logits, greedy, [None] * len(seqs), None, self.engine.banned_ids).tolist()
        self.launched.append(list(self.positions))
        self.inputs = ids
        self.positions = [p + 1 for p in self.positions]
        ticket = self.tickets
        self.tickets += 1
        self.unread.append((ticket, ids))
        return ticket

    def read(self, ticket: int) -> list[int]:
        got, ids = self.unread.popleft()
        assert got == ticket
        return ids


def use_device_fed(engine: Engine, fed: EagerDeviceFed | None) -> None:
    engine.loop.device_fed = fed


@dataclass(slots=True)
class Run:
    out: GenerationOutput
    deltas: list[str]
    finished: tuple[int, int, list[int]]  # len(seq), n_cached, block table when it finished
    fed: EagerDeviceFed | None


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

    saved = engine.loop.device_fed
    fed = fed_for(engine) if pipelined else None
    engine.scheduler.finish = finish  # type: ignore[method-assign]
    use_device_fed(engine, fed)
    try:
        out = engine.generate(prompt, params, on_text=on_text, cancel=cancel)
    finally:
        del engine.scheduler.finish
        use_device_fed(engine, saved)
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert not engine.scheduler.has_work()
    (finished,) = seen
    return Run(out, deltas, finished, fed)


def fed_for(engine: Engine) -> EagerDeviceFed | None:
    """The device-fed steps a run uses: the engine's own graphs where it has them (GPU), else the
    eager stand-in."""
    real = engine.runner.device_fed_steps()
    return real if real is not None else EagerDeviceFed(engine)  # type: ignore[return-value]


def assert_same(fast: Run, slow: Run, *, finished: bool = True) -> None:
    a, b = fast.out, slow.out
    assert a.token_ids == b.token_ids
    assert a.text == b.text and fast.deltas == slow.deltas
    assert (a.stop_reason, a.stop_sequence) == (b.stop_reason, b.stop_sequence)
    assert a.timings.tokens_out == b.timings.tokens_out == len(a.token_ids)
    assert a.timings.prompt_tokens == b.timings.prompt_tokens
    if finished:
        # The same tokens cached; a step launched ahead for a token that then ended generation
        # may have reserved one block more, which finishing gave back with the rest.
        assert fast.finished[:2] == slow.finished[:2]


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
    boundary, host_fed = runs[8], runs[9]
    assert boundary.finished[:2] == (33, 32) and len(host_fed.finished[2]) == 2
    if boundary.fed is not None:  # the step launched ahead, then dropped, held block 2
        assert len(boundary.finished[2]) == 3


def test_pipelined_loop_matches_host_fed(
    phi3_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = scenarios(phi3_engine, monkeypatch, pipelined=True)
    check_scenarios(runs)
    made = [r.fed for r in runs[::2]]
    assert all(isinstance(f, EagerDeviceFed) for f in made)  # the fast runs were device-fed
    # The cancel at a block boundary launched the step at position 32 and then dropped it.
    assert made[4].launched[-1] == [32]
    # max_tokens: one step per token after the first, none launched past the limit.
    assert len(made[0].launched) == len(runs[0].out.token_ids) - 1


def test_batch_device_fed_matches_host_fed(phi3_engine: Engine) -> None:
    """Several greedy requests of different lengths decoded together, device-fed: each equals the
    host-fed batch and the request alone; the batch changes as requests end and start."""
    prompts = ["Once upon a time", "Hello", list(range(300, 340)), "The weather is", "A"]
    params = [SamplingParams(max_tokens=n, temperature=0.0) for n in (12, 5, 20, 3, 9)]
    alone = [phi3_engine.generate(p, q) for p, q in zip(prompts, params, strict=True)]
    saved = phi3_engine.loop.device_fed
    fed = EagerDeviceFed(phi3_engine)
    use_device_fed(phi3_engine, fed)
    try:
        batched = phi3_engine.generate_batch(prompts, params)
    finally:
        use_device_fed(phi3_engine, saved)
    host_fed = phi3_engine.generate_batch(prompts, params)
    for a, b, c in zip(batched, host_fed, alone, strict=True):
        assert a.token_ids == b.token_ids == c.token_ids
        assert a.text == b.text == c.text
        assert a.stop_reason == b.stop_reason == c.stop_reason
    assert max(len(p) for p in fed.launched) > 1  # steps carried several sequences
    assert phi3_engine.blocks.num_free == phi3_engine.blocks.num_blocks


def test_only_plain_greedy_is_pipelined(
    phi3_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    fed = EagerDeviceFed(phi3_engine)
    monkeypatch.setattr(phi3_engine.loop, "device_fed", fed)
    for params in (
        SamplingParams(max_tokens=3, temperature=0.7, seed=1),
        SamplingParams(max_tokens=3, temperature=0.0, repetition_penalty=1.3),
    ):
        phi3_engine.generate("Hello", params)
    assert fed.launched == []
    assert phi3_engine.runner.device_fed_steps() is None  # the CPU engine has no decode graph


def test_abandoned_pipelined_stream_frees_its_blocks(
    phi3_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(phi3_engine.loop, "device_fed", EagerDeviceFed(phi3_engine))
    it = iter(phi3_engine.stream("Hello", SamplingParams(max_tokens=30, temperature=0.0)))
    next(it)
    it.close()  # cancels the request and waits for it to end
    assert phi3_engine.blocks.num_free == phi3_engine.blocks.num_blocks
    out = phi3_engine.generate("Hello", SamplingParams(max_tokens=3, temperature=0.0))
    assert len(out.token_ids) == 3 or out.stop_reason is StopReason.EOS
    assert phi3_engine.blocks.num_free == phi3_engine.blocks.num_blocks


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
    runs = scenarios(graphs, monkeypatch, pipelined=True)
    check_scenarios(runs)
    assert all(r.fed is not None and r.fed.in_flight == 0 for r in runs[::2])
    # The eager engine (no graphs: host-fed steps) gives the same requests the same results.
    eager_runs = scenarios(eager, monkeypatch, pipelined=False)
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
