"""Token sampling on [B, V] logits, on CPU or CUDA, without host syncs.

Order, per row: banned ids -> -inf; repetition penalty (divide positive logits, multiply negative
ones, once per distinct id seen); presence and frequency penalties (subtract presence_penalty from
each id generated so far and frequency_penalty times its count, as vLLM does); then greedy
(argmax) when temperature is 0, otherwise temperature -> top-k -> top-p -> min-p -> a draw. Each
filter matches transformers' logits warpers (ties at the top-k boundary are kept; top-p keeps the
smallest set whose mass exceeds p, at least one token; min-p drops tokens below min_p * the
largest probability).

The draw is an exponential race, argmax(p / q) with q ~ Exp(1) from the request's generator: it
samples from p exactly, like torch.multinomial, but never waits for the device. Per-row settings
that are the same in every row (always so at batch size 1) stay Python scalars; only mixed batches
copy a small parameter tensor to the device.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from worker_orcd.engine.types import SamplingParams, TokenLogprob

logger = logging.getLogger(__name__)

PrevTokens = Sequence[Tensor] | Tensor | None


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator for one request: the same seed gives the same draws on the same device."""
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(seed)
    return g


def sample(
    logits: Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    prev_tokens: PrevTokens = None,
    banned_ids: Tensor | None = None,
    output_tokens: PrevTokens = None,
) -> Tensor:
    """Next token per row: [B, V] float logits -> [B] int64 ids (on the logits' device).

    prev_tokens: ids seen so far per row (prompt and output), for the repetition penalty: a list of
      1-D tensors, or a [B, L] tensor padded with negative ids. banned_ids: 1-D ids never drawn.
    output_tokens: the ids generated so far per row, as prev_tokens, for the presence and
      frequency penalties. generators: per row; None draws from torch's default generator.
    """
    _check(logits, params, generators)
    filtered = filter_logits(logits, params, prev_tokens, banned_ids, output_tokens)
    greedy = [p.temperature == 0 for p in params]
    if all(greedy):
        return filtered.argmax(dim=-1)
    # unnormalised probabilities: the race's argmax does not need the sum (and a one-row
    # softmax over a large vocab is slow on CUDA)
    probs = (filtered - filtered.amax(dim=-1, keepdim=True)).exp_()
    race = torch.empty_like(probs)
    if all(g is None for g in generators):
        race.exponential_()
    else:
        for row, g in enumerate(generators):
            race[row].exponential_(generator=g)
    # q can be 0 in float32; clamping keeps p == 0 (filtered) ids at score 0, never nan.
    drawn = (probs / race.clamp_min_(torch.finfo(torch.float32).tiny)).argmax(dim=-1)
    if not any(greedy):
        return drawn
    mask = _per_row([float(x) for x in greedy], logits.device, always_tensor=True)
    return torch.where(mask.squeeze(1).bool(), filtered.argmax(dim=-1), drawn)


def token_logprobs(logits: Tensor, ids: Tensor, top: Sequence[int]) -> list[TokenLogprob]:
    """Each row's chosen id's log-probability under log_softmax(logits) (the raw model
    distribution) and its `top[row]` most likely ids with theirs, on the host (one copy)."""
    lp = logits.float().log_softmax(dim=-1)
    chosen = lp.gather(1, ids.to(lp.device, torch.long).reshape(-1, 1)).squeeze(1)
    k = max(top, default=0)
    if k:
        top_lp, top_ids = lp.topk(k, dim=-1)
        top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
    out = []
    for row, (tid, value) in enumerate(zip(ids.tolist(), chosen.tolist(), strict=True)):
        n = top[row]
        alts = tuple(zip(top_ids[row][:n], top_lp[row][:n], strict=True)) if n else ()
        out.append(TokenLogprob(int(tid), float(value), alts))
    return out


def filter_logits(
    logits: Tensor,
    params: Sequence[SamplingParams],
    prev_tokens: PrevTokens = None,
    banned_ids: Tensor | None = None,
    output_tokens: PrevTokens = None,
) -> Tensor:
    """The distribution `sample` draws from, as float32 logits with -inf for excluded ids.

    Greedy rows (temperature 0) get the banned-id mask and the penalties only.
    """
    if logits.ndim != 2 or logits.shape[0] != len(params):
        raise ValueError(f"logits must be [B, V] with B = {len(params)}, got {tuple(logits.shape)}")
    x = logits.float().clone()  # [B, V]
    if banned_ids is not None and banned_ids.numel():
        x.index_fill_(1, banned_ids.to(x.device), float("-inf"))
    if prev_tokens is not None and any(p.repetition_penalty != 1.0 for p in params):
        x = _repetition_penalty(x, [p.repetition_penalty for p in params], prev_tokens)
    if output_tokens is not None and any(p.counts_outputs for p in params):
        x = _count_penalties(x, params, output_tokens)
    sampled = [p.temperature > 0 for p in params]
    if not any(sampled):
        return x
    base = x  # greedy rows of a mixed batch end with this; the steps below do not write into it

    dev, vocab = x.device, x.shape[1]
    rows = list(zip(params, sampled, strict=True))
    temps = [p.temperature if s else 1.0 for p, s in rows]
    top_k = [p.top_k if s and 0 < p.top_k < vocab else 0 for p, s in rows]
    top_p = [p.top_p if s else 1.0 for p, s in rows]
    min_p = [p.min_p if s else 0.0 for p, s in rows]
    if any(t != 1.0 for t in temps):
        # Always a tensor on CUDA: a CPU scalar divisor is applied there as a multiplication by
        # its reciprocal, which would make a request's draws differ alone and in a mixed batch.
        x = x / _per_row(temps, dev, always_tensor=dev.type == "cuda")
    if any(top_k) or any(p < 1.0 for p in top_p):
        sorted_x, order = x.sort(dim=-1)  # ascending, as transformers' TopPLogitsWarper
        if any(top_k):
            # column of the k-th largest value; top-k off takes column 0, which removes nothing
            cols = [vocab - k if k else 0 for k in top_k]
            if len(set(cols)) == 1:
                kth = sorted_x[:, cols[0] : cols[0] + 1]
            else:
                kth = sorted_x.gather(1, _per_row(cols, dev, torch.long, always_tensor=True))
            sorted_x = sorted_x.masked_fill(sorted_x < kth, float("-inf"))  # ties with kth stay
        if any(p < 1.0 for p in top_p):
            # ascending order: the last column holds the maximum
            cum = (sorted_x - sorted_x[:, -1:]).exp_().cumsum_(dim=-1)
            cum = cum / cum[:, -1:]
            # top-p off gets a limit that no cumulative mass is below
            drop = cum <= _per_row([1.0 - p if p < 1.0 else -1.0 for p in top_p], dev)
            drop[:, -1] = False  # keep at least the most likely token
            sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        x = torch.empty_like(x).scatter_(1, order, sorted_x)
    if any(m > 0.0 for m in min_p):
        # p < min_p * p_max  <=>  x < x_max + log(min_p); min_p 0 gives -inf, which drops nothing
        log_min_p = [math.log(m) if m > 0.0 else float("-inf") for m in min_p]
        floor = x.amax(dim=-1, keepdim=True) + _per_row(log_min_p, dev)
        x = x.masked_fill(x < floor, float("-inf"))
    if not all(sampled):
        greedy = _per_row([0.0 if s else 1.0 for s in sampled], dev, always_tensor=True).bool()
        x = torch.where(greedy, base, x)
    return x


def _padded_ids(x: Tensor, tokens: PrevTokens, what: str) -> Tensor:
    """[B, L] ids on x's device, padding (negative ids) mapped to V: a scratch column past the
    vocabulary, which the callers drop."""
    batch, vocab = x.shape
    if isinstance(tokens, Tensor):
        ids = tokens.to(x.device, torch.long).reshape(batch, -1)
    else:
        if len(tokens) != batch:
            raise ValueError(f"{what} has {len(tokens)} rows for a batch of {batch}")
        rows = [t.to(x.device, torch.long).reshape(-1) for t in tokens]
        ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=-1)
    return torch.where(ids < 0, vocab, ids)


def _repetition_penalty(x: Tensor, penalties: list[float], prev_tokens: PrevTokens) -> Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor, per row, over a padded id matrix."""
    batch, vocab = x.shape
    ids = _padded_ids(x, prev_tokens, "prev_tokens")
    if ids.shape[1] == 0:
        return x
    ext = torch.cat([x, x.new_zeros(batch, 1)], dim=1)
    seen = ext.gather(1, ids)
    penalty = _per_row(penalties, x.device)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return ext.scatter_(1, ids, seen)[:, :vocab]


def _count_penalties(
    x: Tensor, params: Sequence[SamplingParams], output_tokens: PrevTokens
) -> Tensor:
    """x less presence_penalty where an id was generated and frequency_penalty times its count."""
    batch, vocab = x.shape
    ids = _padded_ids(x, output_tokens, "output_tokens")
    if ids.shape[1] == 0:
        return x
    counts = x.new_zeros(batch, vocab + 1).scatter_add_(1, ids, x.new_ones(ids.shape))[:, :vocab]
    freq = _per_row([p.frequency_penalty for p in params], x.device)
    presence = _per_row([p.presence_penalty for p in params], x.device)
    return x - counts * freq - (counts > 0).to(x.dtype) * presence


def _per_row(
    values: list[float] | list[int],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    *,
    always_tensor: bool = False,
) -> Tensor | float:
    """Per-row values: a Python scalar when all rows agree, else [B, 1] copied without blocking."""
    if not always_tensor and len(set(values)) == 1:
        return values[0]
    t = torch.tensor(values, dtype=dtype).reshape(-1, 1)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _check(
    logits: Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> None:
    if len(generators) != len(params):
        raise ValueError(f"{len(generators)} generators for {len(params)} rows")
    for row, g in enumerate(generators):
        if g is not None and g.device.type != logits.device.type:
            raise ValueError(f"generator of row {row} is on {g.device}, logits on {logits.device}")
