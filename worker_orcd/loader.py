"""GGUF tensors -> model parameters.

One table per architecture maps llama.cpp tensor names onto the model's (fused) parameters and
shards. Names are matched exactly on whole dotted segments: `blk.N.<rest>` looks `<rest>` up in the
per-block table and anything else is looked up whole, so `attn_q` can never match `attn_qkv`. Every
tensor of the file must map to a parameter, every parameter must be filled exactly once (whole, or
by each of its shards once), and every shape is checked before any data is read.

weights="dequantized": every tensor is dequantized into the compute dtype on the target device.
weights="quantized": tensors of a type the quantized kernels support (Q4_0, Q5_0, Q8_0, Q4_K,
Q5_K, Q6_K) keep their GGUF blocks; a fused projection collects its shards (of any mix of types)
into one packed weight. On CUDA the blocks are split into planes and copied to the GPU
(kernels/quant, PackedWeight); on the CPU they stay where they are, views of the file's memory
map read by the CPU kernels (kernels/cpu, CpuPackedWeight), so loading copies no quantized bytes.
Other tensors (F32, F16, BF16, ...) are dequantized (copied) as before.

Tensor parallel: a model built with a `Parallel` of several ranks has parameters that carry a
`partition` (worker_orcd/parallel.py); the plan checks the file's whole shapes, and each rank reads
only its rows or columns of those tensors straight from the file's blocks. Rows are always whole
blocks; a column cut that is not (Qwen2.5-0.5B's FFN of 4864 over 2 ranks is 2432 columns, not whole
256-element K-quant super-blocks) dequantizes that part to the compute dtype instead.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from torch import nn

from worker_orcd.config import ModelConfig
from worker_orcd.errors import ModelLoadError
from worker_orcd.gguf import DEQUANTIZERS, GGUFFile, dequantize
from worker_orcd.kernels.cpu import layer as cpu_layer
from worker_orcd.kernels.cpu import ops as cpu_ops
from worker_orcd.kernels.cpu.weights import CpuPackedWeight, CpuQuantizedWeight
from worker_orcd.kernels.quant.formats import SUPPORTED
from worker_orcd.kernels.quant.weights import PackedWeight, QuantizedWeight, Shard
from worker_orcd.layers.linear import ShardId, shard_shape
from worker_orcd.model import CausalLM
from worker_orcd.parallel import SINGLE, Parallel, check_divisible

logger = logging.getLogger(__name__)

Target = tuple[str, ShardId]  # (parameter name, shard id or None for the whole parameter)

_GLOBAL: dict[str, Target] = {
    "token_embd.weight": ("model.embed_tokens.weight", None),
    "output_norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", None),
    "rope_factors_short.weight": ("model.rotary_emb.short_factors", None),
    "rope_factors_long.weight": ("model.rotary_emb.long_factors", None),
}
# Per-block tables: `blk.N.<key>` -> `model.layers.N.<param>`.
_BLOCK_COMMON: dict[str, Target] = {
    "attn_norm.weight": ("input_layernorm.weight", None),
    "attn_output.weight": ("self_attn.o_proj.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
    "ffn_down.weight": ("mlp.down_proj.weight", None),
}
_SPLIT_QKV: dict[str, Target] = {
    f"attn_{s}.{kind}": (f"self_attn.qkv_proj.{kind}", s)
    for s in ("q", "k", "v")
    for kind in ("weight", "bias")
}
_FUSED_QKV: dict[str, Target] = {
    "attn_qkv.weight": ("self_attn.qkv_proj.weight", None),
    "attn_qkv.bias": ("self_attn.qkv_proj.bias", None),
}
_SPLIT_GATE_UP: dict[str, Target] = {
    "ffn_gate.weight": ("mlp.gate_up_proj.weight", 0),
    "ffn_up.weight": ("mlp.gate_up_proj.weight", 1),
}
# Phi-3: ffn_up holds the gate rows, then the up rows.
_FUSED_GATE_UP: dict[str, Target] = {"ffn_up.weight": ("mlp.gate_up_proj.weight", None)}


@dataclass(frozen=True, slots=True)
class TensorTable:
    globals: dict[str, Target]
    block: dict[str, Target]

    def target(self, name: str, n_layers: int) -> Target | None:
        parts = name.split(".")
        if len(parts) >= 3 and parts[0] == "blk" and parts[1].isdigit():
            layer = int(parts[1])
            entry = self.block.get(".".join(parts[2:]))
            if entry is None or layer >= n_layers:
                return None
            return f"model.layers.{layer}.{entry[0]}", entry[1]
        return self.globals.get(name)

    def sources(self, param: str, shard: ShardId) -> list[str]:
        """GGUF names that would fill (param, shard): for error messages."""
        found = [n for n, t in self.globals.items() if t == (param, shard)]
        parts = param.split(".")
        if parts[:2] == ["model", "layers"] and len(parts) > 3:
            rest = ".".join(parts[3:])
            found += [f"blk.{parts[2]}.{k}" for k, t in self.block.items() if t == (rest, shard)]
        return found


_SPLIT = TensorTable(_GLOBAL, _BLOCK_COMMON | _SPLIT_QKV | _SPLIT_GATE_UP)
TABLES: dict[str, TensorTable] = {
    "llama": _SPLIT,
    "qwen2": _SPLIT,
    "phi3": TensorTable(_GLOBAL, _BLOCK_COMMON | _FUSED_QKV | _FUSED_GATE_UP),
}


WEIGHT_MODES = ("quantized", "dequantized")


@dataclass(frozen=True, slots=True)
class LoadReport:
    seconds: float
    weight_bytes: int  # on the device: dense parameters plus quantized blocks
    n_tensors: int
    weight_mix: dict[str, int]  # storage type ("Q4_K", "bfloat16", ...) -> bytes on the device


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(
    config: ModelConfig,
    *,
    device: torch.device,
    dtype: torch.dtype,
    max_positions: int,
    quantized: bool = False,
    parallel: Parallel = SINGLE,
) -> CausalLM:
    """The model with uninitialised parameters allocated on `device` in `dtype` (with `quantized`,
    the projections, embedding and head are meta-device placeholders until loaded); `parallel`:
    this rank's part of it."""
    with _default_dtype(dtype), torch.device(device):
        return CausalLM(config, max_positions=max_positions, quantized=quantized, parallel=parallel)


def plan_load(f: GGUFFile, config: ModelConfig, model: CausalLM) -> list[tuple[str, str, ShardId]]:
    """(tensor, parameter, shard) for every tensor; raises ModelLoadError unless the file fills
    every parameter exactly once with tensors of the right shapes."""
    table = TABLES.get(config.architecture)
    if table is None:
        raise ModelLoadError(f"{f.path}: no tensor table for architecture '{config.architecture}'")
    params = dict(model.named_parameters())
    filled: dict[str, list[ShardId]] = {name: [] for name in params}
    plan: list[tuple[str, str, ShardId]] = []
    for info in f.tensors.values():
        target = table.target(info.name, config.n_layers)
        if target is None or target[0] not in params:
            raise ModelLoadError(
                f"{f.path}: unexpected tensor '{info.name}' for a {config.architecture} model "
                f"with {config.n_layers} layers"
            )
        pname, shard = target
        expected = _source_shape(params[pname], shard)
        if info.shape != expected:
            raise ModelLoadError(
                f"{f.path}: tensor '{info.name}' has shape {info.shape} but {pname}"
                f"{'' if shard is None else f'[{shard}]'} expects {expected}"
            )
        if shard in filled[pname] or (filled[pname] and (shard is None or None in filled[pname])):
            raise ModelLoadError(f"{f.path}: tensor '{info.name}' loads {pname} a second time")
        filled[pname].append(shard)
        plan.append((info.name, pname, shard))
    for pname, shards in filled.items():
        needed = list(getattr(params[pname], "shard_slices", {None: None}))
        if shards == [None]:
            continue
        for shard in needed:
            if shard not in shards:
                names = table.sources(pname, shard) or table.sources(pname, None)
                raise ModelLoadError(
                    f"{f.path}: missing tensor {' or '.join(repr(n) for n in names) or '?'} "
                    f"for parameter {pname}"
                )
    return plan


def load_model(
    f: GGUFFile,
    config: ModelConfig,
    *,
    device: torch.device,
    dtype: torch.dtype,
    max_positions: int,
    weights: str = "dequantized",
    parallel: Parallel = SINGLE,
) -> tuple[CausalLM, LoadReport]:
    """Build the model and fill it from `f`: every tensor dequantized into `dtype` on `device`, or
    with weights="quantized" the supported quant types kept in their blocks (module docstring).
    `parallel`: build and read only this rank's part of the model."""
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_MODES)}, got {weights!r}")
    if parallel.size > 1:
        check_divisible(config, parallel.size, f.path)
    start = time.perf_counter()
    model = build_model(
        config,
        device=device,
        dtype=dtype,
        max_positions=max_positions,
        quantized=weights == "quantized",
        parallel=parallel,
    )
    plan = plan_load(f, config, model)
    params = dict(model.named_parameters())
    if device.type == "cpu":
        cpu_layer.register_all()  # the compiled norm, rope and decode attention, as on CUDA
        if weights == "quantized":
            cpu_ops.warn_if_unavailable()
    shards: dict[str, dict[ShardId, AnyShard]] = {}  # placeholder parameter -> its loaded shards
    total = sum(f.tensors[name].n_bytes for name, _, _ in plan)
    done = 0
    next_report = 0.1
    for name, pname, shard in plan:
        param = params[pname]
        cut = _cut(param, shard)
        if param.is_meta:
            shards.setdefault(pname, {})[shard] = _load_shard(f, name, device, dtype, cut)
        elif cut is None:
            param.weight_loader(param, f.load(name, device=device, dtype=param.dtype), shard)
        else:
            tensor = _read_part(f, name, cut, device, param.dtype, keep_blocks=False)
            param.weight_loader(param, tensor, shard)
            del tensor
        done += f.tensors[name].n_bytes
        if done / total >= next_report:
            logger.info(
                "loading weights: %3.0f%% (%.2fs)", 100 * done / total, time.perf_counter() - start
            )
            next_report = (math.floor(10 * done / total) + 1) / 10  # one line per tenth crossed
    for pname, loaded in shards.items():
        _place(model, params[pname], loaded, device)
    model.finish_loading()
    model.eval()
    mix = weight_mix(model)
    report = LoadReport(time.perf_counter() - start, sum(mix.values()), len(plan), mix)
    return model, report


AnyShard = Shard | CpuQuantizedWeight


def _load_shard(
    f: GGUFFile, name: str, device: torch.device, dtype: torch.dtype, cut: Cut | None
) -> AnyShard:
    """A tensor (or this rank's `cut` of it) kept in its GGUF blocks if the quantized kernels take
    its type, else dense. On the CPU the blocks of a whole tensor are a view of the memory map (the
    CPU kernels); a rank's cut there is a copy of its blocks, multiplied by the torch reference."""
    if cut is not None:
        return _read_part(f, name, cut, device, dtype, keep_blocks=True)
    info = f.tensors[name]
    if device.type == "cpu" and info.qtype in cpu_ops.SUPPORTED and len(info.shape) == 2:
        return CpuQuantizedWeight.from_gguf(f.view(name), info.qtype, info.shape)
    if info.qtype in SUPPORTED and len(info.shape) == 2:
        raw = torch.from_numpy(f.raw(name).copy())  # the map is read-only; torch wants writable
        return QuantizedWeight.from_gguf(raw, info.qtype, info.shape, device)
    return f.load(name, device=device, dtype=dtype)


Cut = tuple[int, list[range]]  # (dim, the indices along it) of the file's tensor one rank reads


def _source_shape(param: nn.Parameter, shard: ShardId) -> tuple[int, ...]:
    """Shape of the file's tensor filling (param, shard): whole, where this rank holds a part."""
    local = shard_shape(param, shard)
    partition = getattr(param, "partition", None)
    return local if partition is None else partition.source_shape(shard, local)


def _cut(param: nn.Parameter, shard: ShardId) -> Cut | None:
    """What of the file's tensor filling (param, shard) this rank reads; None: all of it."""
    partition = getattr(param, "partition", None)
    return None if partition is None else (partition.dim, partition.ranges(shard))


def _read_part(
    f: GGUFFile,
    name: str,
    cut: Cut,
    device: torch.device,
    dtype: torch.dtype,
    *,
    keep_blocks: bool,
) -> Shard:
    """Rows (dim 0) or columns (dim 1) `cut` of tensor `name`, read from the file's blocks alone.

    With keep_blocks a QuantizedWeight where the quantized kernels take its type; else, or where
    a column cut splits blocks, dense in `dtype` (such a cut dequantizes whole rows first). A
    vector is one row: its cut is along its columns.
    """
    dim, ranges = cut
    info = f.tensors[name]
    if info.qtype not in DEQUANTIZERS:
        raise ModelLoadError(
            f"{f.path}: tensor '{name}' has unsupported quant type {info.qtype.name}"
        )
    vector = len(info.shape) == 1
    rows, cols = (1, info.shape[0]) if vector else info.shape
    dim = 1 if vector else dim
    block, type_size = GGML_QUANT_SIZES[info.qtype]
    raw = f.raw(name).reshape(rows, cols // block * type_size)
    n = sum(len(r) for r in ranges)
    if dim == 0:
        data = np.concatenate([raw[r.start : r.stop] for r in ranges])
        shape = (n, cols)
    elif all(r.start % block == 0 and r.stop % block == 0 for r in ranges):
        per_block = [(r.start // block * type_size, r.stop // block * type_size) for r in ranges]
        data = np.concatenate([raw[:, lo:hi] for lo, hi in per_block], axis=1)
        shape = (rows, n)
    else:
        if keep_blocks and info.qtype in SUPPORTED:
            logger.info(
                "%s: columns %s of %d are not whole %s blocks of %d; this rank's part is "
                "dequantized to %s",
                name,
                ", ".join(f"{r.start}..{r.stop}" for r in ranges),
                cols,
                info.qtype.name,
                block,
                str(dtype).removeprefix("torch."),
            )
        full = f.load(name, device=device, dtype=dtype).reshape(rows, cols)
        part = torch.cat([full[:, r.start : r.stop] for r in ranges], dim=1)
        return part.reshape(n) if vector else part
    raw_part = torch.from_numpy(data)
    if keep_blocks and info.qtype in SUPPORTED and not vector:
        return QuantizedWeight.from_gguf(raw_part, info.qtype, shape, device)
    out = dequantize(raw_part.to(device), info.qtype, shape).to(dtype)
    return out.reshape(n) if vector else out


def _owners(model: nn.Module, param: nn.Parameter) -> list[nn.Module]:
    """Modules holding `param` as their weight (an embedding and the head tied to it)."""
    return [m for m in model.modules() if m._parameters.get("weight") is param]


def _place(
    model: nn.Module, param: nn.Parameter, loaded: dict[ShardId, AnyShard], device: torch.device
) -> None:
    """Give the modules owning the placeholder `param` its shards: a packed weight when any shard
    is quantized (CpuPackedWeight on the CPU, PackedWeight on CUDA), else a real dense parameter
    filled as in the dequantized path."""
    order = list(getattr(param, "shard_slices", {None: None}))
    parts = [loaded[s] for s in order if s in loaded] if None not in loaded else [loaded[None]]
    if any(isinstance(p, CpuQuantizedWeight) for p in parts):
        cpu_packed = CpuPackedWeight.pack(parts)
        for m in _owners(model, param):
            m.quantized = cpu_packed
        return
    if any(isinstance(p, QuantizedWeight) for p in parts):
        packed = PackedWeight.pack(parts)
        for m in _owners(model, param):
            m.quantized = packed
        return
    dense = nn.Parameter(
        torch.empty(param.shape, dtype=param.dtype, device=device), requires_grad=False
    )
    dense.__dict__.update(param.__dict__)  # weight_loader, shard_slices
    for shard, tensor in loaded.items():
        dense.weight_loader(dense, tensor, shard)
    for m in _owners(model, param):
        m.weight = dense


def weight_mix(model: nn.Module) -> dict[str, int]:
    """Bytes on the device per storage type: dense parameters by dtype, quantized blocks by type
    (each shared weight once)."""
    mix: dict[str, int] = {}
    for p in model.parameters():
        if not p.is_meta:
            key = str(p.dtype).removeprefix("torch.")
            mix[key] = mix.get(key, 0) + p.numel() * p.element_size()
    packed = {id(w): w for m in model.modules() if (w := getattr(m, "quantized", None)) is not None}
    for w in packed.values():
        for key, n in w.quant_mix().items():
            mix[key] = mix.get(key, 0) + n
    return mix
