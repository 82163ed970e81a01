"""Load Hugging Face format checkpoints into a `Transformer`.

`Transformer.from_pretrained(path, dtype=, device=)` builds the model on the meta device, then
`load_checkpoint_into` streams the checkpoint shard by shard, turning each tensor (or each expert's slice) into its final dtype/device
and assigning it in place: no second copy of the weights is ever held. FP8 weights are dequantised
on the fly; the router bias always stays fp32.

All names go through `dsv3.checkpoint.hf_map`. Every problem a user can cause (a non-DeepSeek
config.json, a missing/unexpected/wrongly shaped tensor) raises `UserError` with one line naming it.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch
from torch import nn

from dsv3.checkpoint import hf_map
from dsv3.checkpoint.reader import CheckpointReader, _few, check_layer_count, count_mtp_layers, load_dir_config, read_weight
from dsv3.config.schema import ModelConfig
from dsv3.devices import DTYPES, parse_dtype  # noqa: F401 (the loader's dtype rule; re-exported)
from dsv3.errors import UserError

KEEP_FP32 = ("e_score_correction_bias",)
"""Tensors kept in fp32 whatever dtype the model is loaded in (routing must be exact)."""

_DTYPES = DTYPES


def resolve_config(path: str | Path, reader: CheckpointReader, mtp: bool | None, **runtime) -> tuple[ModelConfig, int]:
    """The directory's config with the MTP depth to build, and how many MTP layers of the files to skip.

    mtp: None loads the MTP layers when the files have them, False skips them, True requires them.
    """
    cfg = load_dir_config(path)[0]
    check_layer_count(reader, cfg, path)
    declared, have = cfg.num_nextn_predict_layers, count_mtp_layers(reader, cfg)
    if mtp is True and (declared == 0 or have < declared):
        raise UserError(f"{path}: mtp=True but the checkpoint has {have} of {declared} MTP layer(s)")
    if mtp is False:
        depth = 0
    elif mtp is None and have == 0 and declared > 0:
        # transformers' own save_pretrained writes num_nextn_predict_layers=1 without MTP weights.
        warnings.warn(f"{path}: config declares {declared} MTP layer(s) but the checkpoint has no MTP "
                      "weights; loading without MTP", stacklevel=3)
        depth = 0
    else:
        depth = declared
    return dataclasses.replace(cfg, num_nextn_predict_layers=depth, **runtime), declared - depth


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(tensor, requires_grad=mod._parameters[attr].requires_grad)
    else:
        mod._buffers[attr] = tensor


def load_checkpoint_into(model: nn.Module, reader: CheckpointReader, dtype: torch.dtype, device: torch.device | str,
                         skip_mtp_layers: int = 0, dry_run: bool = False) -> None:
    """Stream every tensor of `reader` into `model` (built on meta), checking names and shapes.

    `skip_mtp_layers`: MTP layers the files hold but the model was built without (ignored).
    `dry_run`: check names and shapes from the file headers only; read and assign nothing."""
    cfg: ModelConfig = model.config
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    building: dict[str, torch.Tensor] = {}  # stacked expert tensors being filled
    seen: dict[str, set[int]] = {}
    done: set[str] = set()
    unexpected, bad_shape = [], []
    n = cfg.num_hidden_layers
    skip = tuple(f"model.layers.{n + k}." for k in range(skip_mtp_layers)) + tuple(f"model.mtp.{k}." for k in range(skip_mtp_layers))

    def target_dtype(name: str) -> torch.dtype:
        if stored_quant(name):  # a dsv3.quant module's storage or scale: keep its dtype
            return expected[name].dtype
        return torch.float32 if name.endswith(KEEP_FP32) else dtype

    def stored_quant(name: str) -> bool:
        return getattr(model.get_submodule(_parent(name)), "scheme", None) is not None

    for hf_name in reader.names():
        shape = reader.shape(hf_name)
        if skip and hf_name.startswith(skip):
            continue
        tgt = hf_map.from_hf(hf_name, cfg)
        if tgt is not None and tgt.kind == "scale":
            tgt = _stored_scale_target(tgt, cfg, expected)  # the scale buffer of a module kept quantised
        if tgt is None and hf_name.endswith(hf_map.SCALE_SUFFIX):
            continue  # consumed while dequantising its weight
        if tgt is not None and tgt.kind == "tied":
            continue
        if tgt is None:
            unexpected.append(hf_name)
            continue
        if tgt.name not in expected:
            if 0 in shape:
                continue  # e.g. transformers' zero-width shared_experts when n_shared_experts == 0
            unexpected.append(hf_name)
            continue
        if dry_run and reader.meta[hf_name][2].startswith("F8") and hf_name + hf_map.SCALE_SUFFIX not in reader.meta:
            raise UserError(f"{reader.path}: FP8 tensor {hf_name} has no {hf_name + hf_map.SCALE_SUFFIX}")
        want = tuple(expected[tgt.name].shape)
        if tgt.kind == "tensor":
            if shape != want:
                bad_shape.append(f"{hf_name} {list(shape)} (expected {list(want)})")
                continue
            if not dry_run:
                t = read_weight(reader, hf_name, raw=stored_quant(tgt.name))
                _assign(model, tgt.name, t.to(device=device, dtype=target_dtype(tgt.name)))
            done.add(tgt.name)
        elif tgt.kind == "expert":
            if shape != want[1:] or tgt.expert >= want[0]:
                bad_shape.append(f"{hf_name} {list(shape)} (expected {list(want[1:])} for expert < {want[0]})")
                continue
            if tgt.name not in seen:
                seen[tgt.name] = set()
                if not dry_run:
                    building[tgt.name] = torch.empty(want, dtype=target_dtype(tgt.name), device=device)
            if not dry_run:
                building[tgt.name][tgt.expert].copy_(read_weight(reader, hf_name, raw=stored_quant(tgt.name)))
            seen[tgt.name].add(tgt.expert)
            if len(seen[tgt.name]) == want[0]:
                if not dry_run:
                    _assign(model, tgt.name, building.pop(tgt.name))
                done.add(tgt.name)
        elif tgt.kind == "gate_up":  # transformers v5 fused [E, 2I, D]: gate rows, then up rows
            up_name = tgt.name.replace("gate_proj", "up_proj")
            if shape != (want[0], 2 * want[1], want[2]):
                bad_shape.append(f"{hf_name} {list(shape)} (expected {[want[0], 2 * want[1], want[2]]})")
                continue
            if not dry_run:
                gate, up = read_weight(reader, hf_name).chunk(2, dim=1)
                _assign(model, tgt.name, gate.to(device=device, dtype=dtype).contiguous())
                _assign(model, up_name, up.to(device=device, dtype=dtype).contiguous())
            done.update((tgt.name, up_name))
    problems = []
    if bad_shape:
        problems.append(f"wrong shape: {_few(bad_shape, 4)}")
    missing = sorted(n for n in expected if n not in done)
    if missing:
        partial = [f"{n} (experts {sorted(set(range(expected[n].shape[0])) - seen[n])[:8]} missing)" for n in missing if n in seen]
        problems.append(f"missing tensors: {_few(partial + [n for n in missing if n not in seen])}")
    if unexpected:
        problems.append(f"unexpected tensors: {_few(sorted(unexpected))}")
    if problems:
        raise UserError(f"{reader.path}: checkpoint does not match config.json; " + "; ".join(problems))
    if cfg.tie_word_embeddings and not dry_run:
        model.lm_head.weight = model.model.embed_tokens.weight


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _stored_scale_target(tgt: hf_map.Target, cfg: ModelConfig, expected: dict) -> hf_map.Target | None:
    """HF `<weight>_scale_inv` -> our scale buffer of a module kept quantised (None: the scale is
    consumed by dequantising its weight)."""
    w = hf_map.from_hf(tgt.name, cfg)
    if w is None or w.kind not in ("tensor", "expert"):
        return None
    ours = hf_map.Target(w.name + hf_map.SCALE_SUFFIX, w.kind, w.expert)
    return ours if ours.name in expected else None
