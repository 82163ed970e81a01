"""Layout-independent weight init: the same seed gives the same weights in one process and in
every parallel layout, while each rank generates only the shards it holds.

Rule (what `init_weights` computes for a parameter with fully-qualified name NAME, global shape
[d0, d1, ...], in the single-process model's names):
* matrices (Linear / Embedding weights, the router weight, stacked experts): N(0, std);
* RMSNorm and LayerNorm gains: ones, LayerNorm biases zeros; buffers: routing bias and expert counts zeros, RoPE frequencies recomputed.
The normal draws come in blocks of whole rows along dim 0 (`rows_per_block` = max(1, 2^20 //
(d1·d2·...)) rows, so about a million values), block b from its own generator seeded by
hash(seed, NAME, b). A rank holding a slice (FSDP / TP / EP shard: a DTensor) draws only the blocks
its dim-0 range touches and keeps its slice of them, so its transient memory is one block (about
4 MiB, or one row when a row is bigger: one stacked expert [I, D] of V3, 58.7 MiB fp32), never the
whole parameter. The CPU generator has no skip-ahead, hence blocks rather than one stream per
parameter.

The single-process trainer (`dsv3.train.trainer.build_model`) uses the same function, which is
why a parallel run and one process start from identical weights.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from dsv3.config.schema import ModelConfig
from dsv3.model.layers import RMSNorm
from dsv3.model.moe import MoE, Gate
from dsv3.model.rope import RotaryEmbedding

BLOCK = 1 << 20
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def canonical_name(name: str) -> str:
    """The single-process parameter name (activation-checkpoint / compile wrappers removed)."""
    for p in _WRAPPER_PREFIXES:
        name = name.replace(p, "")
    return name


def _seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{name}:{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def rows_per_block(shape: tuple[int, ...]) -> int:
    return max(1, BLOCK // max(1, math.prod(shape[1:])))


def local_box(p: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """(local tensor, its global offset, global shape) of a parameter, DTensor or plain."""
    if isinstance(p, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = p.to_local()
        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        if tuple(shape) != tuple(local.shape):
            raise RuntimeError(f"unexpected local shard shape {tuple(local.shape)} != {tuple(shape)}")
        return local, tuple(offset), tuple(p.shape)
    return p, (0,) * p.ndim, tuple(p.shape)


@torch.no_grad()
def normal_slice_(local: torch.Tensor, offset: tuple[int, ...], shape: tuple[int, ...], std: float, seed: int, name: str) -> None:
    """Fill `local` (the box at `offset` of a global `shape` tensor) with the blockwise N(0, std) draws."""
    if local.numel() == 0:
        return
    rows = rows_per_block(shape)
    r0, r1 = offset[0], offset[0] + local.shape[0]
    inner = tuple(slice(o, o + n) for o, n in zip(offset[1:], local.shape[1:]))
    for b in range(r0 // rows, (r1 - 1) // rows + 1):
        lo, hi = b * rows, min((b + 1) * rows, shape[0])
        g = torch.Generator().manual_seed(_seed(seed, name, b))
        block = torch.empty((hi - lo, *shape[1:]), dtype=torch.float32).normal_(0.0, std, generator=g)
        a, z = max(lo, r0), min(hi, r1)
        local[a - r0 : z - r0].copy_(block[(slice(a - lo, z - lo), *inner)])


@torch.no_grad()
def init_weights(module: nn.Module, cfg: ModelConfig, seed: int, std: float | None = None) -> None:
    """Initialise every parameter and buffer of `module` (a Transformer or a pipeline stage, any
    parallelism applied) in place, per the module docstring's rule."""
    std = cfg.initializer_range if std is None else std
    done: set[int] = set()
    for mod_name, mod in module.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in done:
                continue  # tied weights
            done.add(id(p))
            name = canonical_name(f"{mod_name}.{pname}" if mod_name else pname)
            local, offset, shape = local_box(p)
            if isinstance(mod, RMSNorm) or (isinstance(mod, nn.LayerNorm) and pname == "weight"):
                local.fill_(1.0)
            elif isinstance(mod, nn.LayerNorm):  # its bias (the DSA indexer's k_norm)
                local.zero_()
            elif p.ndim >= 2:
                normal_slice_(local, offset, shape, std, seed, name)
            else:
                raise RuntimeError(f"init_weights: no init rule for parameter {name} {tuple(shape)}")
    init_buffers(module, cfg)


@torch.no_grad()
def init_buffers(module: nn.Module, cfg: ModelConfig) -> None:
    """RoPE frequencies recomputed; routing bias and expert counts zeroed (a checkpoint load then
    overwrites the persistent ones)."""
    for mod_name, mod in module.named_modules():
        for bname, buf in mod.named_buffers(recurse=False):
            if buf is None:
                continue
            if isinstance(mod, RotaryEmbedding):
                mod.inv_freq = RotaryEmbedding(cfg).inv_freq.to(buf.device)
            elif isinstance(mod, (Gate, MoE)):  # e_score_correction_bias, tokens_per_expert
                buf.zero_()
            else:
                raise RuntimeError(f"init_buffers: no init rule for buffer {canonical_name(mod_name)}.{bname}")


def materialize(module: nn.Module, device: torch.device, cfg: ModelConfig, seed: int) -> nn.Module:
    """Meta-device module -> storage for this rank's shards only on `device`, initialised by `init_weights`."""
    module.to_empty(device=device)
    init_weights(module, cfg, seed)
    return module
