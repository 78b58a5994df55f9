"""StepLoop: the engine thread. Requests come in from any thread; each step runs one forward pass
over the flat batch the scheduler picks, samples every sequence that is due and hands the ids to
their Requests.

A step (nano-vllm's `LLMEngine.step`): take in new requests, end cancelled ones, `schedule()`,
`runner.forward(batch)` -> logits of the due sequences, `sample` them in one call (each row with its
own parameters and generator), `postprocess()` marks the tokens cached, then each Request appends
its id, streams text and checks stops; an ended sequence frees its blocks at once.

Greedy decode steps on the decode graph run one step ahead of the host (DeviceFedSteps): while the
host streams step i's text, step i + 1 already runs on step i's argmax. A step launched for a
sequence that then ends is dropped, and its block given back.

Nothing a step raises ends the loop: an out-of-memory error fails the requests of that batch with
VRAM_OOM (their blocks freed), any other error fails them as INTERNAL and is logged.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from worker_orcd.engine.request import Request
from worker_orcd.engine.sampler import sample, token_logprobs
from worker_orcd.engine.scheduler import ScheduledBatch, Scheduler
from worker_orcd.engine.sequence import Sequence, SequenceStatus
from worker_orcd.engine.types import StopReason, TokenLogprob
from worker_orcd.errors import VramOomError, WorkerError
from worker_orcd.model import ForwardAborted

if TYPE_CHECKING:
    from worker_orcd.engine.model_runner import ModelRunner

logger = logging.getLogger(__name__)


# Engine threads still running at interpreter exit are stopped first: a daemon thread ended by the
# interpreter while inside torch aborts the process.
_LOOPS: weakref.WeakSet[StepLoop] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for loop in list(_LOOPS):
        loop.close(timeout=10.0)


class EngineClosedError(WorkerError):
    code = "WORKER_SHUTDOWN"
    retriable = True


@dataclass(frozen=True, slots=True)
class EngineStats:
    running: int  # sequences in the running batch
    waiting: int  # submitted, not yet (or no longer, once preempted) running
    kv_blocks_used: int
    kv_blocks_total: int
    kv_block_size: int
    preemptions: int  # total since load
    steps: int  # forward passes since load
    step_seqs: int  # sum over steps of the sequences each carried
    step_tokens: int  # sum over steps of the tokens each carried
    max_num_seqs: int


StepObserver = Callable[[int, int], None]  # (sequences, tokens) of a forward pass


class DeviceFed(Protocol):
    """Greedy decode steps of a batch fed by their own argmax (cuda_graphs.DeviceFedSteps)."""

    def start(
        self,
        token_ids: list[int],
        positions: list[int],
        block_tables: list[list[int]],
    ) -> int: ...

    def chain(self, block_tables: list[list[int]]) -> int: ...

    def read(self, ticket: int) -> list[int]: ...


@dataclass(slots=True)
class _Ahead:
    """A device-fed decode step launched and not yet read."""

    ticket: int
    seqs: list[Sequence]


class StepLoop:
    def __init__(
        self,
        runner: ModelRunner,
        scheduler: Scheduler,
        banned_ids: torch.Tensor,
        device: torch.device,
    ) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.blocks = scheduler.blocks
        self.banned_ids = banned_ids
        self.device = device
        self.on_step: StepObserver | None = None
        # Greedy decode batches run device-fed where the runner has graphs for it.
        self.device_fed: DeviceFed | None = runner.device_fed_steps()
        self._ahead: _Ahead | None = None
        self.lock = threading.RLock()  # held for a whole step; score() takes it too
        self.stepped = threading.Condition(self.lock)  # notified after every step
        self._cond = threading.Condition()
        self._inbox: deque[Request] = deque()
        self._live: dict[int, Request] = {}  # seq_id -> request, scheduled or waiting
        self._thread: threading.Thread | None = None
        self._closed = False
        self._steps = 0
        self._step_seqs = 0
        self._step_tokens = 0
        _LOOPS.add(self)

    # -- from any thread ----------------------------------------------------------------------

    def add(self, request: Request) -> None:
        with self._cond:
            if self._closed:
                raise EngineClosedError("the engine is closed")
            self._inbox.append(request)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="engine-steps", daemon=True)
                self._thread.start()
            self._cond.notify()

    def stats(self) -> EngineStats:
        with self._cond:
            inbox = len(self._inbox)
        sched, blocks = self.scheduler, self.blocks
        return EngineStats(
            running=len(sched.running),
            waiting=len(sched.waiting) + inbox,
            kv_blocks_used=blocks.num_blocks - blocks.num_free,
            kv_blocks_total=blocks.num_blocks,
            kv_block_size=blocks.block_size,
            preemptions=sched.preemptions,
            steps=self._steps,
            step_seqs=self._step_seqs,
            step_tokens=self._step_tokens,
            max_num_seqs=sched.max_seqs,
        )

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread; requests still live end with CANCELLED."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # -- the engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._inbox and not self._live and not self._closed:
                        self._cond.wait()
                    closed = self._closed
                if closed:
                    self._end_all()
                    return
                try:
                    self.step()
                except Exception as exc:  # noqa: BLE001 - a bug: fail what runs, keep the loop
                    logger.exception("engine step failed")
                    self._recover(WorkerError(f"engine step failed: {type(exc).__name__}: {exc}"))

    def _recover(self, error: WorkerError) -> None:
        """After a step failed outside a forward pass: every live request fails with `error`
        (blocks freed) and the device-fed steps start afresh."""
        with self.lock:
            self._ahead = None
            if self.device_fed is not None:
                self.device_fed = self.runner.device_fed_steps()
            self._fail_batch(list(self._live.values()), error)

    def _end_all(self) -> None:
        with self.lock:
            self._take_inbox()
            for req in list(self._live.values()):
                self._finish(req, StopReason.CANCELLED)

    def _take_inbox(self) -> None:
        with self._cond:
            new = list(self._inbox)
            self._inbox.clear()
        for req in new:
            self._live[req.seq.seq_id] = req
            self.scheduler.add(req.seq)

    def on_engine_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def live(self) -> int:
        """Requests submitted and not yet ended."""
        with self._cond:
            return len(self._inbox) + len(self._live)

    def step(self) -> int:
        """One scheduling step and forward pass; returns the number of sequences it carried."""
        with self.lock:
            try:
                return self._step()
            finally:
                self.stepped.notify_all()

    def _step(self) -> int:
        self._take_inbox()
        for req in list(self._live.values()):
            if req.cancelled():
                self._finish(req, StopReason.CANCELLED)
        if self._ahead is not None:
            return self._advance_device_fed()
        if not self.scheduler.has_work():
            return 0
        batch = self.scheduler.schedule()
        if not batch.seqs:
            self.scheduler.unblock()
            return 0
        reqs = [self._live[s.seq_id] for s in batch.seqs]
        if self._device_fed_fits(batch, reqs):
            assert self.device_fed is not None
            seqs = batch.seqs
            try:
                ticket = self.device_fed.start(
                    [s.token_ids[s.n_cached] for s in seqs],
                    [s.n_cached for s in seqs],
                    [s.block_table for s in seqs],
                )
            except Exception as exc:  # noqa: BLE001 - the batch fails, the loop goes on
                self._device_fed_failed(list(seqs), exc)
                return 0
            self._ahead = _Ahead(ticket, list(seqs))
            self._count(len(seqs), len(seqs))
            return self._advance_device_fed()
        now = time.perf_counter()
        for req in reqs:
            if not req.scheduled_at:
                req.scheduled_at = now
        try:
            self._run_batch(batch, reqs)
        except ForwardAborted:
            return len(batch.seqs)  # every request of the batch was cancelled: reaped next
        except torch.OutOfMemoryError:
            self._fail_batch(
                reqs,
                VramOomError(
                    f"out of GPU memory in a forward pass of {batch.num_tokens} tokens of "
                    f"{len(batch.seqs)} sequences; their KV cache was freed"
                ),
            )
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        except WorkerError as exc:  # one of ours, with its code (a rank that failed, ...)
            logger.error("forward pass of %d sequences failed: %s", len(batch.seqs), exc)
            self._fail_batch(reqs, exc)
        except Exception as exc:  # noqa: BLE001 - the requests fail, the loop goes on
            logger.exception("forward pass of %d sequences failed", len(batch.seqs))
            self._fail_batch(reqs, WorkerError(f"{type(exc).__name__}: {exc}"))
        self._count(len(batch.seqs), batch.num_tokens)
        return len(batch.seqs)

    def _count(self, n_seqs: int, n_tokens: int) -> None:
        self._steps += 1
        self._step_seqs += n_seqs
        self._step_tokens += n_tokens
        if self.on_step is not None:
            self.on_step(n_seqs, n_tokens)

    # -- device-fed greedy decode ---------------------------------------------------------------

    def _device_fed_fits(self, batch: ScheduledBatch, reqs: list[Request]) -> bool:
        """A decode step every row of which picks the graph's own greedy id."""
        return (
            self.device_fed is not None
            and not batch.is_prefill
            and all(r.greedy_on_device for r in reqs)
        )

    def _advance_device_fed(self) -> int:
        """Launch the next step of the same batch if it stays the same, then read the step in
        flight and hand its ids over. Returns the sequences the launched step carried (0: none)."""
        ahead = self._ahead
        assert ahead is not None and self.device_fed is not None
        seqs = ahead.seqs
        launched = 0
        nxt: _Ahead | None = None
        try:
            if self._can_chain(seqs):
                for seq in seqs:  # the next step caches the token at len(seq)
                    self.blocks.reserve(seq, len(seq) + 1)
                nxt = _Ahead(self.device_fed.chain([s.block_table for s in seqs]), seqs)
                launched = len(seqs)
                self._count(launched, launched)
            ids = self.device_fed.read(ahead.ticket)
        except Exception as exc:  # noqa: BLE001 - the batch fails, the loop goes on
            self._device_fed_failed(seqs, exc)
            return 0
        self._ahead = nxt
        for seq, token in zip(seqs, ids, strict=True):
            if seq.status is SequenceStatus.FINISHED:
                continue  # ended after an earlier step: this step is dropped
            seq.n_cached += 1
            req = self._live[seq.seq_id]
            reason = req.push(token)
            if reason is not None:
                self._finish(req, reason)
        if nxt is not None and all(s.status is SequenceStatus.FINISHED for s in seqs):
            self.device_fed.read(nxt.ticket)  # every row of the step ahead ended: drop it
            self._ahead = None
        return launched

    def _device_fed_failed(self, seqs: list[Sequence], exc: Exception) -> None:
        """A device-fed launch or read raised: its batch fails (VRAM_OOM for an out-of-memory
        error), the steps still in flight are abandoned and the next batch starts afresh."""
        self._ahead = None
        self.device_fed = self.runner.device_fed_steps()
        reqs = [self._live[s.seq_id] for s in seqs if s.seq_id in self._live]
        if isinstance(exc, torch.OutOfMemoryError):
            error: WorkerError = VramOomError(
                f"out of GPU memory in a decode step of {len(seqs)} sequences; their KV cache "
                "was freed"
            )
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        elif isinstance(exc, WorkerError):
            error = exc
        else:
            logger.exception("device-fed decode step of %d sequences failed", len(seqs))
            error = WorkerError(f"{type(exc).__name__}: {exc}")
        self._fail_batch(reqs, error)

    def _can_chain(self, seqs: list[Sequence]) -> bool:
        """Whether the batch's next step can be launched before the host has read this one: the
        same sequences all go on (no cancel, count limits leave room), nothing new waits to be
        admitted, and a block is free for each one that needs a new one."""
        sched = self.scheduler
        if sched.waiting and len(sched.running) < sched.max_seqs:
            return False
        with self._cond:
            if self._inbox:
                return False
        need = 0
        for seq in seqs:
            req = self._live.get(seq.seq_id)
            if seq.status is not SequenceStatus.RUNNING or req is None or req.cancelled():
                return False
            if not req.room_for(1):
                return False
            need += self.blocks.blocks_for(len(seq) + 1) - len(seq.block_table)
        return need <= self.blocks.num_free

    def _run_batch(self, batch: ScheduledBatch, reqs: list[Request]) -> None:
        def aborted() -> bool:
            return all([r.cancelled() for r in reqs])  # each polled: all see a cancel now

        logits = self.runner.forward(batch, abort=aborted)  # [due, V]
        due = batch.due()
        ids, entries = self._sample(due, logits)
        self.scheduler.postprocess(batch)
        for seq, token, entry in zip(due, ids, entries, strict=True):
            req = self._live[seq.seq_id]
            reason = req.push(token, entry)
            if reason is not None:
                self._finish(req, reason)

    def _sample(
        self, due: list[Sequence], logits: torch.Tensor
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """Each due sequence's next id, and its log-probability entry where its request asks."""
        if not due:
            return [], []
        reqs = [self._live[s.seq_id] for s in due]
        params = [r.params for r in reqs]
        history = outputs = None
        if any(p.repetition_penalty != 1.0 for p in params):
            history = _rows([r.history() for r in reqs])
        if any(p.counts_outputs for p in params):
            outputs = _rows([r.outputs() for r in reqs])
        ids = sample(logits, params, [r.rng for r in reqs], history, self.banned_ids, outputs)
        entries: list[TokenLogprob | None] = [None] * len(due)
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if rows:
            top = [params[i].logprobs or 0 for i in rows]
            for i, entry in zip(rows, token_logprobs(logits[rows], ids[rows], top), strict=True):
                entries[i] = entry
        return ids.tolist(), entries

    def _finish(self, req: Request, reason: StopReason) -> None:
        self.scheduler.finish(req.seq)
        self._live.pop(req.seq.seq_id, None)
        req.finish(reason)

    def _fail_batch(self, reqs: list[Request], error: WorkerError) -> None:
        """Fail those of reqs still live (one may have ended earlier in the same step)."""
        for req in reqs:
            if self._live.pop(req.seq.seq_id, None) is None:
                continue
            self.scheduler.finish(req.seq)
            req.fail(error)


def _rows(rows: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """Per-request id rows for the sampler: an empty row where a request's penalty is off."""
    return [torch.empty(0, dtype=torch.int64) if r is None else r for r in rows]
