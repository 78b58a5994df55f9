"""Per-kernel timings at decode and prefill shapes of Phi-3-mini and Qwen2.5-0.5B.

Prefill attention: Triton (paged cache) against torch sdpa on contiguous q/k/v; decode attention
(flash-decoding) at long contexts as GB/s of K/V read; the small per-layer kernels of a decode step
(microseconds inside a CUDA graph); GEMV block shapes with longer K steps; the few-row kernel
(a batch of decodes, `gemv_rows`) against cuBLAS over a sweep of its tile shapes.

    PYTHONPATH=. python benchmarks/kernels.py [prefill] [decode] [sweep] [batch] [stages] [small]
        [rows]

`rows` sweeps the decode weight shapes at 4, 8 and 16 rows; SWEEP_SHAPES ("NxK,...") and
SWEEP_ROWS ("8,16") narrow it.
"""

from __future__ import annotations

import logging
import os
import sys

import torch
import torch.nn.functional as F

from benchmarks.ceilings import graph_time_us
from worker_orcd.benchtools import cuda_time_ms
from worker_orcd.kernels.attention import AttentionMetadata
from worker_orcd.kernels.triton import activation, attention, gemv, gemv_rows, norm, rope

logger = logging.getLogger("benchmarks.kernels")
DEV = torch.device("cuda")
BF16 = torch.bfloat16
MODELS = {"phi3": (32, 32, 96, 3072, 8192), "qwen": (14, 2, 64, 896, 4864)}


def _meta(n_ctx: int, q_len: int, page: int = 16) -> AttentionMetadata:
    n_blocks = -(-n_ctx // page)
    return AttentionMetadata(
        slot_mapping=torch.arange(n_ctx - q_len, n_ctx, device=DEV),
        query_start=[0, q_len],
        context_lens=[n_ctx],
        kv_slots=[slice(0, n_ctx)],
        query_start_t=torch.tensor([0, q_len], dtype=torch.int32, device=DEV),
        context_lens_t=torch.tensor([n_ctx], dtype=torch.int32, device=DEV),
        block_tables=torch.arange(n_blocks, dtype=torch.int32, device=DEV)[None],
        block_size=page,
        max_query_len=q_len,
        max_context_len=n_ctx,
    )


def prefill_attention() -> list[str]:
    """The Triton prefill kernel over a sweep of tile shapes against torch sdpa (flash)."""
    lines = []
    for name, (h, hk, d, _, _) in MODELS.items():
        for n in (512, 2048):
            q = torch.randn(n, h, d, device=DEV, dtype=BF16)
            kc = torch.randn(n, hk, d, device=DEV, dtype=BF16)
            vc = torch.randn(n, hk, d, device=DEV, dtype=BF16)
            meta = _meta(n, n)
            flops = 4 * n * n / 2 * d * h
            res = []
            for bm, bn, warps, stages in [
                (64, 64, 4, 2),
                (64, 64, 4, 3),
                (128, 64, 8, 2),
                (128, 64, 8, 3),
                (128, 32, 4, 2),
                (64, 32, 4, 3),
            ]:
                kw = dict(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)
                ms = cuda_time_ms(
                    lambda q=q, kc=kc, vc=vc, m=meta, kw=kw: attention.prefill_attention(
                        q, kc, vc, m, 0.1, **kw
                    )
                )
                res.append((ms, f"m{bm}/n{bn}/w{warps}/s{stages}"))
            res.sort()
            qt, kt, vt = q.transpose(0, 1)[None], kc.transpose(0, 1)[None], vc.transpose(0, 1)[None]
            t_sdpa = cuda_time_ms(
                lambda qt=qt, kt=kt, vt=vt: F.scaled_dot_product_attention(
                    qt, kt, vt, is_causal=True, enable_gqa=True
                )
            )
            best = ", ".join(f"{c} {ms * 1e3:.0f}us" for ms, c in res[:3])
            lines.append(
                f"prefill attn {name} {n:5d}: sdpa {t_sdpa * 1e3:6.1f} us; triton "
                f"({flops / res[0][0] / 1e9:.0f} TFLOP/s best) {best}"
            )
    return lines


def decode_attention() -> list[str]:
    """Flash-decoding at several contexts: one program per KV head against the split kernels."""
    lines = []
    for name, (h, hk, d, _, _) in MODELS.items():
        for ctx in (100, 256, 512, 4000, 16000):
            layers = max(2, -(-256 * 2**20 // (2 * ctx * hk * d * 2)))
            caches = [
                (
                    torch.randn(ctx, hk, d, device=DEV, dtype=BF16),
                    torch.randn(ctx, hk, d, device=DEV, dtype=BF16),
                )
                for _ in range(layers)
            ]
            q = torch.randn(1, h, d, device=DEV, dtype=BF16)
            meta = _meta(ctx, 1)
            nbytes = 2 * ctx * hk * d * 2
            res = []
            for splits in (1, attention.num_splits(1, hk)):
                us = graph_time_us(
                    [
                        lambda q=q, kc=kc, vc=vc, m=meta, s=splits: attention.decode_attention(
                            q, kc, vc, m, 0.1, splits=s
                        )
                        for kc, vc in caches
                    ]
                )
                res.append(f"{splits} splits {us:6.1f} us {nbytes / us / 1e3:5.0f} GB/s")
            lines.append(f"decode attn {name} ctx {ctx:5d}: " + "; ".join(res))
    return lines


def decode_attention_sweep() -> list[str]:
    """Split count, key block and pipelining depth of flash-decoding at long contexts."""
    lines = []
    for name, (h, hk, d, _, _) in MODELS.items():
        for ctx in (4000,):
            layers = max(2, -(-256 * 2**20 // (2 * ctx * hk * d * 2)))
            caches = [
                (
                    torch.randn(ctx, hk, d, device=DEV, dtype=BF16),
                    torch.randn(ctx, hk, d, device=DEV, dtype=BF16),
                )
                for _ in range(layers)
            ]
            q = torch.randn(1, h, d, device=DEV, dtype=BF16)
            meta = _meta(ctx, 1)
            nbytes = 2 * ctx * hk * d * 2
            res = []
            for splits in (8, 16, 32, 64, 128):
                if splits * hk > 8192:
                    continue
                for block_n, warps, stages in ((64, 4, 2), (32, 4, 2), (64, 4, 3), (128, 8, 2)):
                    kw = dict(splits=splits, block_n=block_n, num_warps=warps, num_stages=stages)
                    us = graph_time_us(
                        [
                            lambda q=q, kc=kc, vc=vc, m=meta, kw=kw: attention.decode_attention(
                                q, kc, vc, m, 0.1, **kw
                            )
                            for kc, vc in caches
                        ]
                    )
                    res.append((us, f"s{splits}/n{block_n}/w{warps}/st{stages}"))
            res.sort()
            best = ", ".join(f"{cfg} {us:.1f}us {nbytes / us / 1e3:.0f}GB/s" for us, cfg in res[:4])
            lines.append(f"decode sweep {name} ctx {ctx}: {best}")
    return lines


def _batch_meta(ctxs: list[int], n_blocks: int, page: int = 16) -> AttentionMetadata:
    """Decode metadata of len(ctxs) sequences whose blocks are scattered over a pool of n_blocks."""
    perm = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(0))
    width = -(-max(ctxs) // page)
    tables, used = torch.full((len(ctxs), width), -1, dtype=torch.int32), 0
    for b, n in enumerate(ctxs):
        need = -(-n // page)
        tables[b, :need] = perm[used : used + need]
        used += need
    b_n = len(ctxs)
    return AttentionMetadata(
        slot_mapping=torch.zeros(b_n, dtype=torch.int64, device=DEV),
        query_start=list(range(b_n + 1)),
        context_lens=ctxs,
        kv_slots=[],
        query_start_t=torch.arange(b_n + 1, dtype=torch.int32, device=DEV),
        context_lens_t=torch.tensor(ctxs, dtype=torch.int32, device=DEV),
        block_tables=tables.to(DEV),
        block_size=page,
        max_query_len=1,
        max_context_len=max(ctxs),
    )


def _batch_inputs(
    ctxs: list[int], h: int, hk: int, d: int, min_layers: int
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, AttentionMetadata, int]:
    """A decode step of len(ctxs) sequences on scattered pages: (per-layer K/V caches, enough
    layers (at least min_layers) that their graph overflows L2, q, metadata, K/V bytes read)."""
    n_blocks = sum(-(-n // 16) for n in ctxs) + 8
    layers = max(min_layers, -(-256 * 2**20 // (n_blocks * 16 * hk * d * 4)))
    caches = [
        tuple(torch.randn(n_blocks * 16, hk, d, device=DEV, dtype=BF16) for _ in "kv")
        for _ in range(layers)
    ]
    q = torch.randn(len(ctxs), h, d, device=DEV, dtype=BF16)
    return caches, q, _batch_meta(ctxs, n_blocks), 2 * sum(ctxs) * hk * d * 2


def decode_batch_sweep() -> list[str]:
    """Flash-decoding of a batch of decodes at the streams workload's contexts (129-256 keys,
    scattered pages): split count, key block, warps, stages. us per layer, graph-timed.
    SWEEP_BATCHES ("1,8") and SWEEP_SPLITS ("4,16,64") replace the default 8, 32 and 1, 2, 4."""
    lines = []
    gen = torch.Generator().manual_seed(1)
    batches = [int(b) for b in os.environ.get("SWEEP_BATCHES", "8,32").split(",")]
    split_counts = [int(s) for s in os.environ.get("SWEEP_SPLITS", "1,2,4").split(",")]
    for name, (h, hk, d, _, _) in MODELS.items():
        for b_n in batches:
            ctxs = torch.randint(129, 257, (b_n,), generator=gen).tolist()
            caches, q, meta, nbytes = _batch_inputs(ctxs, h, hk, d, min_layers=4)
            ref = attention.decode_attention(q, *caches[0], meta, 0.1).float()
            res = []
            for splits in split_counts:
                for block_n, warps, stages in (
                    (64, 4, 3), (64, 4, 1), (32, 4, 1), (32, 2, 2), (128, 8, 1), (16, 4, 1),
                    (16, 2, 1), (32, 2, 1),
                ):  # fmt: skip
                    kw = dict(splits=splits, block_n=block_n, num_warps=warps, num_stages=stages)
                    try:
                        out = attention.decode_attention(q, *caches[0], meta, 0.1, **kw)
                        err = (out.float() - ref).abs().max().item()
                        us = graph_time_us(
                            [
                                lambda kc=kc, vc=vc, kw=kw, q=q, m=meta: attention.decode_attention(
                                    q, kc, vc, m, 0.1, **kw
                                )
                                for kc, vc in caches
                            ]
                        )
                    except Exception as exc:  # noqa: BLE001 - a config that does not compile
                        logger.info("%s B=%d %s: %s", name, b_n, kw, exc)
                        continue
                    cfg = f"s{splits}/n{block_n}/w{warps}/st{stages}"
                    res.append((us, cfg, err))
            default = graph_time_us(
                [lambda kc=kc, vc=vc, q=q, m=meta: attention.decode_attention(q, kc, vc, m, 0.1)
                 for kc, vc in caches]
            )  # fmt: skip
            res.sort()
            best = ", ".join(
                f"{cfg} {us:.1f}us {nbytes / us / 1e3:.0f}GB/s err {err:.1e}"
                for us, cfg, err in res[:6]
            )
            lines.append(
                f"decode batch {name} B={b_n} keys {sum(ctxs)}: default {default:.1f}us "
                f"{nbytes / default / 1e3:.0f}GB/s; best {best}"
            )
            logger.info(lines[-1])
    return lines


def decode_stages() -> list[str]:
    """The decode attention's default launch (splits from the batch shape, 64-key blocks, 4 warps)
    at 1, 2 and 3 pipeline stages, for 1, 8 and 32 sequences at the streams workload's contexts
    (129-256 keys) and at 4,000 keys: us per layer, graph-timed, scattered pages."""
    lines = []
    gen = torch.Generator().manual_seed(2)
    for name, (h, hk, d, _, _) in MODELS.items():
        for b_n in (1, 8, 32):
            for long in (False, True):
                if long and b_n == 32:
                    continue
                lo, hi = (3900, 4100) if long else (129, 257)
                ctxs = torch.randint(lo, hi, (b_n,), generator=gen).tolist()
                caches, q, meta, nbytes = _batch_inputs(ctxs, h, hk, d, min_layers=2)
                meta.max_context_len = 4096  # as the decode graph for any context is captured
                res = []
                for stages in (3, 2, 1):
                    us = graph_time_us(
                        [
                            lambda kc=kc, vc=vc, st=stages, q=q, m=meta: attention.decode_attention(
                                q, kc, vc, m, 0.1, num_stages=st
                            )
                            for kc, vc in caches
                        ]
                    )
                    res.append(f"st{stages} {us:6.1f}us {nbytes / us / 1e3:5.0f}GB/s")
                lines.append(
                    f"decode stages {name} B={b_n} keys {sum(ctxs)} splits "
                    f"{attention.num_splits(b_n, hk)}: " + ", ".join(res)
                )
                logger.info(lines[-1])
                del caches
    return lines


def small_kernels() -> list[str]:
    return [line for name, dims in MODELS.items() for line in _small_kernels(name, *dims)]


def _small_kernels(name: str, h: int, hk: int, d: int, hidden: int, inter: int) -> list[str]:
    lines = []
    x = torch.randn(1, hidden, device=DEV, dtype=BF16)
    r = torch.randn(1, hidden, device=DEV, dtype=BF16)
    w = torch.randn(hidden, device=DEV, dtype=BF16)
    qkv = torch.randn(1, (h + 2 * hk) * d, device=DEV, dtype=BF16)
    q = qkv[:, : h * d].view(1, h, d)
    k = qkv[:, h * d : (h + hk) * d].view(1, hk, d)
    v = qkv[:, (h + hk) * d :].view(1, hk, d)
    cs = torch.randn(4096, d, device=DEV)
    pos = torch.tensor([100], device=DEV)
    kc = torch.randn(4096, hk, d, device=DEV, dtype=BF16)
    vc = torch.randn(4096, hk, d, device=DEV, dtype=BF16)
    gu = torch.randn(1, 2 * inter, device=DEV, dtype=BF16)
    calls = {
        "add_rms_norm": lambda: norm.add_rms_norm(x, r, w, 1e-6),
        "apply_rope": lambda: rope.apply_rope(q, k, pos, cs),
        "store_kv": lambda: rope.store_kv(k, v, kc, vc, pos),
        "rope_store_kv": lambda: rope.rope_store_kv(q, k, v, pos, cs, kc, vc, pos),
        "silu_and_mul": lambda: activation.silu_and_mul(gu),
        "embedding": lambda: F.embedding(pos, kc.view(4096, -1)),
        "argmax": lambda: torch.argmax(gu.float(), dim=-1),
    }
    for kname, fn in calls.items():
        lines.append(f"small {name} {kname:14}: {graph_time_us([fn] * 64):5.2f} us")
    return lines


def gemv_blocks() -> list[str]:
    lines = []
    for shape in [
        (9216, 3072),
        (3072, 3072),
        (16384, 3072),
        (3072, 8192),
        (32064, 3072),
        (9728, 896),
        (896, 4864),
    ]:
        n, k = shape
        copies = max(2, -(-512 * 2**20 // (n * k * 2)))
        ws = [torch.randn(n, k, device=DEV, dtype=BF16) for _ in range(copies)]
        x = torch.randn(1, k, device=DEV, dtype=BF16)
        out = torch.empty(1, n, device=DEV, dtype=BF16)
        res = []
        for cfg in [(2, 1024, 4), (2, 2048, 4), (1, 2048, 4), (2, 2048, 8), (4, 2048, 8)]:
            us = graph_time_us(
                [lambda x=x, w=w, o=out, c=cfg: gemv.gemv(x, w, config=c, out=o) for w in ws]
            )
            res.append(f"{cfg}={us:5.1f}({n * k * 2 / us / 1e3:4.0f})")
        lines.append(f"gemv {n}x{k}: " + " ".join(res))
    return lines


ROWS_CONFIGS = [
    (bn, bk, 4, st, 1)
    for bn in (16, 32, 64)
    for bk in (64, 128, 256)
    for st in (3, 4)
    if bn * bk <= 8192
] + [
    (bn, bk, 4, 4, sp)
    for bn in (16, 32, 64)
    for bk in (128, 256)
    for sp in (2, 3, 4)
    if bn * bk <= 8192
]


def rows_sweep() -> list[str]:
    """x [B, K] @ W^T for B = 4, 8, 16 at every decode weight shape: cuBLAS, the few-row kernel's
    default tile and the best of ROWS_CONFIGS (us per call in a graph over weights that overflow
    L2; GB/s of weight read)."""
    lines = []
    shapes = [(9216, 3072), (3072, 3072), (16384, 3072), (3072, 8192), (32064, 3072),
              (1152, 896), (896, 896), (9728, 896), (896, 4864)]  # fmt: skip
    only = os.environ.get("SWEEP_SHAPES")  # e.g. "3072x3072,3072x8192"
    if only:
        shapes = [tuple(int(v) for v in s.split("x")) for s in only.split(",")]
    for n, k in shapes:
        copies = max(2, -(-512 * 2**20 // (n * k * 2)))
        ws = [torch.randn(n, k, device=DEV, dtype=BF16) * 0.05 for _ in range(copies)]
        gb = n * k * 2 / 1e3
        for rows in [int(r) for r in os.environ.get("SWEEP_ROWS", "4,8,16").split(",")]:
            x = torch.randn(rows, k, device=DEV, dtype=BF16)
            out = torch.empty(rows, n, device=DEV, dtype=BF16)
            cublas = graph_time_us([lambda x=x, w=w: F.linear(x, w) for w in ws])
            default = gemv_rows.pick_config(n, k, rows)
            times = {}
            for cfg in [default, *ROWS_CONFIGS]:
                if cfg in times:
                    continue
                times[cfg] = graph_time_us(
                    [
                        lambda x=x, w=w, c=cfg, o=out: gemv_rows.launch(x, w, config=c, out=o)
                        for w in ws
                    ]  # fmt: skip
                )
            best = min(times, key=times.get)
            lines.append(
                f"rows {n}x{k} B={rows}: cublas {cublas:6.1f} us ({gb / cublas:4.0f} GB/s)  "
                f"default {default} {times[default]:6.1f} ({gb / times[default]:4.0f})  "
                f"best {best} {times[best]:6.1f} ({gb / times[best]:4.0f})"
            )
            logger.info(lines[-1])
    return lines


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    parts = sys.argv[1:] or ["prefill", "decode", "sweep", "small"]
    table = {
        "prefill": prefill_attention,
        "decode": decode_attention,
        "sweep": decode_attention_sweep,
        "batch": decode_batch_sweep,
        "stages": decode_stages,
        "small": small_kernels,
        "rows": rows_sweep,
    }
    lines = [line for part in parts for line in table[part]()]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
