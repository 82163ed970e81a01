"""Bytes per weight and the memory-bandwidth bound of batch-1 decoding (`dsv3 info --model DIR`).

Batch-1 decode reads every weight a token activates once per token: all attention and dense-MLP
matrices, the shared experts, K of the E routed experts per MoE layer, and the output head (the
embedding is a one-row lookup, so it is not counted). The bound is
    tokens/s <= memory bandwidth / bytes activated per token
(the KV cache and activations add a little on top). Bytes come from the checkpoint's file headers
(as stored: FP8 = 1 byte + its block scales), or, with `--quantization`, from the storage the
chosen scheme would give each selected matrix (`dsv3.quant`; the rest at `--dtype`).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch

from dsv3.checkpoint import hf_map
from dsv3.config.schema import ModelConfig

_SIZES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "I32": 4, "I64": 8}


@dataclass
class WeightBytes:
    weights: int  # main-model weights (MTP excluded)
    bytes: int  # their resident bytes, scales included
    activated_bytes: float  # bytes read per decoded token (routed experts at K/E, no embedding)

    @property
    def per_weight(self) -> float:
        return self.bytes / max(self.weights, 1)


def _share(name: str, cfg: ModelConfig) -> float | None:
    """Fraction of a main-model tensor read per token (None: MTP, not counted)."""
    if hf_map.is_mtp_hf_name(name, cfg) or name.startswith("model.mtp."):
        return None
    if name.startswith("model.embed_tokens."):
        return 0.0
    if re.search(r"\.mlp\.experts\.", name):
        return cfg.num_experts_per_tok / cfg.n_routed_experts
    return 1.0


def stored_bytes(reader, cfg: ModelConfig) -> WeightBytes:
    """From the file headers: each tensor's dtype size; `_scale_inv` tensors count as bytes of their weight."""
    w = b = 0
    act = 0.0
    for name, (_, shape, dtype) in reader.meta.items():
        base = name[: -len(hf_map.SCALE_SUFFIX)] if name.endswith(hf_map.SCALE_SUFFIX) else name
        share = _share(base, cfg)
        if share is None:
            continue
        n = 1
        for d in shape:
            n *= d
        nbytes = n * _SIZES.get(dtype, 4)
        if base == name:
            w += n
        b += nbytes
        act += nbytes * share
    return WeightBytes(w, b, act)


def planned_bytes(cfg: ModelConfig, quantization, dtype: torch.dtype) -> WeightBytes:
    """Bytes if loaded at `dtype` and quantised with `quantization` (computed on the meta device)."""
    from dsv3.model.moe import Experts
    from dsv3.model.transformer import Transformer
    from dsv3.quant import make_scheme, resolve

    qc = resolve(quantization)
    with torch.device("meta"):
        model = Transformer(cfg)
    size = torch.empty(0, dtype=dtype).element_size()
    w = b = 0
    act = 0.0
    quantised: set[str] = set()
    for name, mod in model.named_modules():
        share = _share(name + ".", cfg)
        if share is None or not isinstance(mod, (torch.nn.Linear, Experts)):
            continue
        method = qc.method_for(name) if qc is not None else None
        if method is None:
            continue
        scheme = make_scheme(method, qc.group_size)
        if isinstance(mod, torch.nn.Linear):
            mats = [(mod.out_features, mod.in_features)]
        else:
            mats = [tuple(t.shape[1:]) for t in (mod.gate_proj, mod.up_proj, mod.down_proj)]
        count = 1 if isinstance(mod, torch.nn.Linear) else mod.gate_proj.shape[0]
        if not all(scheme.supports(*m) for m in mats):
            continue
        nb = count * sum(sum(t.numel() * t.element_size() for t in scheme.empty(n, k, "meta", dtype)) for n, k in mats)
        w += count * sum(n * k for n, k in mats)
        b += nb
        act += nb * share
        quantised.add(name)
    for name, p in model.named_parameters():
        mod = name.rpartition(".")[0]
        share = _share(name, cfg)
        if share is None or mod in quantised:
            continue
        keep32 = name.endswith("e_score_correction_bias")
        nb = p.numel() * (4 if keep32 else size)
        w += p.numel()
        b += nb
        act += nb * share
    return WeightBytes(w, b, act)


def measure_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Memory bandwidth in bytes/s: best of `repeats` copies of an `nbytes` buffer (read + write)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def process_memory() -> dict:
    """This process's resident memory now and at its peak, in MB (Linux /proc; peak from getrusage)."""
    import os
    import resource

    out = {"rss_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    try:
        with open("/proc/self/statm") as f:
            out["rss_mb"] = round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except OSError:
        pass
    return out
