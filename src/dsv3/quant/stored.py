"""Quantised checkpoints on disk: loading them as stored, and writing them (`dsv3 convert`).

Formats (both keep the HF tensor names; `<weight>_scale_inv` is the float multiplier, w = q · s):
* DeepSeek FP8: float8_e4m3fn weights, fp32 scales per 128x128 block; config.json
  `quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
  "weight_block_size": [128, 128]}` (what the published DeepSeek-V3 checkpoints carry).
* dsv3 int8 (`dsv3 convert --quantize w8a8|int8`): int8 weights, fp32 scales [out, 1] per output
  channel; `quantization_config = {"quant_method": "dsv3", "scheme": "w8a8"|"int8", ...}`.

Loading keeps the stored format when it is the one asked for (or none was asked): the model is built
on the meta device, the quantised linears / experts are swapped for empty quantised modules, and the
streaming loader fills their `weight` / `weight_scale_inv` buffers as stored.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from dsv3.checkpoint import hf_map
from dsv3.checkpoint.fp8 import SCALE_FMTS, weight_quant
from dsv3.config.schema import ModelConfig
from dsv3.errors import UserError
from dsv3.model.moe import Experts
from dsv3.quant.apply import QuantConfig, _set
from dsv3.quant.modules import QuantExperts, QuantLinear
from dsv3.quant.native import use_dense_kernels
from dsv3.quant.schemes import Scheme, make_scheme

FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
STORED_DTYPES = {"F8_E4M3": "fp8", "I8": "int8"}


def stored_method(hf_config: dict) -> str | None:
    """The scheme a checkpoint's config.json declares: 'fp8', 'w8a8', 'int8' or None."""
    qc = hf_config.get("quantization_config") or {}
    if not qc:
        return None
    if qc.get("quant_method") == "fp8":
        if qc.get("weight_block_size", [128, 128]) != [128, 128] or qc.get("fmt", "e4m3") != "e4m3":
            raise UserError(f"quantization_config {qc}: only e4m3 FP8 with 128x128 blocks is supported")
        if qc.get("scale_fmt") not in SCALE_FMTS:  # V3.1: "ue8m0" (power-of-two scales, read as any fp32 scale)
            raise UserError(f"quantization_config scale_fmt {qc.get('scale_fmt')!r}: expected 'ue8m0' or none")
        return "fp8"
    if qc.get("quant_method") == "dsv3" and qc.get("scheme") in ("w8a8", "int8"):
        return qc["scheme"]
    raise UserError(f"config.json quantization_config {qc}: unsupported (fp8, or dsv3 w8a8/int8)")


def stored_config(method: str, qc: QuantConfig, scale_fmt: str | None = None) -> dict:
    """config.json `quantization_config` for a checkpoint written with `method` (FP8 block scales in
    `scale_fmt`: None, or "ue8m0" as DeepSeek-V3.1 writes it)."""
    if method == "fp8":
        return {**FP8_CONFIG, **({"scale_fmt": scale_fmt} if scale_fmt else {})}
    return {"quant_method": "dsv3", "scheme": method, "weight_dtype": "int8", "weight_quant_granularity": "per_channel",
            "activation_dtype": "int8" if method == "w8a8" else "none",
            "act_quant_granularity": "per_token" if method == "w8a8" else None,
            "modules_to_not_convert": list(qc.modules_to_not_convert)}


def prepare_stored(model: nn.Module, reader, cfg: ModelConfig, method: str) -> int:
    """Swap the modules whose weights the files hold quantised (with a `_scale_inv`) for empty
    quantised modules of `method`, on the meta device. Returns how many were swapped."""
    scheme = make_scheme(method)
    done: set[str] = set()
    for name in reader.names():
        if reader.meta[name][2] not in STORED_DTYPES or name + hf_map.SCALE_SUFFIX not in reader.meta:
            continue
        tgt = hf_map.from_hf(name, cfg)
        if tgt is None or tgt.kind not in ("tensor", "expert"):
            continue
        path = tgt.name.rpartition(".")[0]  # the Linear of `...weight`, or the Experts of `...experts.gate_proj`
        if path in done:
            continue
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue  # e.g. an MTP layer the model is built without: the loader skips its tensors
        _set(model, path, _empty_like(scheme, mod, name))
        done.add(path)
    use_dense_kernels(model)
    model.quantization = QuantConfig.preset(method)
    return len(done)


def _empty_like(scheme: Scheme, mod: nn.Module, name: str) -> nn.Module:
    if isinstance(mod, nn.Linear):
        return QuantLinear.empty(scheme, mod.in_features, mod.out_features)
    if isinstance(mod, Experts):
        E, inter, dim = mod.gate_proj.shape
        return QuantExperts.empty(scheme, E, dim, inter)
    raise UserError(f"quantised tensor {name} belongs to {type(mod).__name__}, which cannot be quantised")


# ------------------------------------------------------------------------------------ writing (convert)
_LINEAR_WEIGHT = re.compile(r"(^|\.)(" + "|".join(hf_map.QUANT_LINEARS) + r")\.weight$")


def convert_target(hf_name: str, cfg: ModelConfig, qc: QuantConfig) -> str | None:
    """The scheme a tensor of an HF checkpoint gets when writing with `qc` (None: stays dense)."""
    if not _LINEAR_WEIGHT.search(hf_name):
        return None
    tgt = hf_map.from_hf(hf_name, cfg)
    if tgt is None or tgt.kind not in ("tensor", "expert"):
        return None
    if tgt.kind == "expert":
        module, _, leaf = tgt.name.rpartition(".")
        return qc.method_for(module, leaf)
    return qc.method_for(tgt.name.rpartition(".")[0])


def quantize_tensor(method: str, w: torch.Tensor, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One weight [out, in] -> (stored weight, fp32 `_scale_inv`) in the on-disk format of `method`
    (`scale_fmt` "ue8m0": FP8 block scales rounded up to powers of two)."""
    if method == "int4":
        raise UserError("int4 is not a checkpoint format (its packing is the CPU kernel's); quantise at load instead")
    if scale_fmt is not None:
        if method != "fp8":
            raise UserError(f"scale_fmt {scale_fmt!r} applies to fp8 only, not {method}")
        q, s = weight_quant(w.float(), scale_fmt=scale_fmt)
        return q, s.float()
    q, s = make_scheme(method).quantize(w.float())
    return q, s.float()


def plan_load(model: nn.Module, reader, cfg: ModelConfig, hf_config: dict, quantization) -> QuantConfig | None:
    """Decide how a checkpoint is loaded for the `quantization` asked (see `dsv3.from_pretrained`):
    keeps a stored format by swapping in empty quantised modules (returns None), or returns the
    QuantConfig to apply after a dense load (the stored weights are then dequantised while reading)."""
    from dsv3.quant.apply import resolve

    stored = stored_method(hf_config)
    if quantization in (None, "auto"):
        if stored is not None:
            prepare_stored(model, reader, cfg, stored)
        return None
    qc = resolve(quantization)
    if qc is not None and stored == qc.method and qc == QuantConfig.preset(stored):
        prepare_stored(model, reader, cfg, stored)
        return None
    return qc
