"""New weights for a running engine: staged and checked in full, then applied in place.

`stage_dir(path, ...)` and `stage_tensors(mapping, ...)` turn a checkpoint directory (HF hub layout,
dsv3's own layout or a `dsv3 train` checkpoint: whatever `dsv3.from_pretrained` reads) or a mapping
of dsv3 parameter names (the trainer's `model.state_dict()` names) into `Staged`: every new tensor in
the engine's dtype and device, and for the modules the engine runs quantised (`dsv3.quant`) the new
storage already quantised with the module's own scheme. Nothing of the engine is touched until then,
so a wrong name, shape, dtype or architecture refuses the whole update with one `UserError` line and
the old weights keep serving. `apply(model, staged)` then writes the tensors in place (dense
parameters by `copy_`, which keeps tied weights tied; quantised storage replaced, so the native
kernels' packed forms, keyed by storage, are rebuilt once on their next call).

Staging holds one extra dense copy of the tensors being replaced (the whole model for a directory)
until it is applied; the engine recomputes what it derives from the weights afterwards
(`LLMEngine.update_weights`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from dsv3.checkpoint.load import KEEP_FP32
from dsv3.config.schema import ModelConfig
from dsv3.errors import UserError

MAX_TENSORS = 1 << 16
"""Most tensors one mapping may name (a DeepSeek-V3 state dict holds about 1,900 with stacked experts)."""


@dataclass
class Staged:
    """New tensors ready to apply: dense ones by parameter name; quantised storage by module name
    (buffer name -> tensor: the weight and its scale)."""

    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    quantised: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def names(self) -> int:
        return len(self.dense) + sum(len(b) // 2 for b in self.quantised.values())


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Dense parameter name -> shape of a model of `cfg` (built on the meta device: no memory)."""
    from dsv3.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    return {n: tuple(t.shape) for n, t in model.state_dict(keep_vars=True).items()}


def check_architecture(path: Path, cfg: ModelConfig, new: ModelConfig) -> None:
    """Refuse a checkpoint whose config.json describes another architecture than the engine serves."""
    from dsv3.config.hf import RUNTIME_FIELDS

    skip = set(RUNTIME_FIELDS) | {"torch_dtype", "num_nextn_predict_layers"}
    diff = [f.name for f in dataclasses.fields(ModelConfig)
            if f.name not in skip and getattr(cfg, f.name) != getattr(new, f.name)]
    if diff:
        shown = ", ".join(f"{n} {getattr(new, n)!r:.40} (serving {getattr(cfg, n)!r:.40})" for n in diff[:4])
        raise UserError(f"{path}: config.json describes another model than the one being served: {shown}")


@torch.no_grad()
def stage_dir(path: str | Path, model: nn.Module, dtype: torch.dtype, device: torch.device) -> Staged:
    """Every tensor of checkpoint directory `path`, checked against the served model (names, shapes,
    config.json's architecture) from the file headers before any tensor is read."""
    from dsv3.checkpoint.load import load_checkpoint_into, resolve_config
    from dsv3.checkpoint.reader import CheckpointReader
    from dsv3.model.transformer import Transformer

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: not a checkpoint directory")
    cfg: ModelConfig = model.config
    reader = CheckpointReader(path)
    try:
        new_cfg, skip = resolve_config(path, reader, cfg.num_nextn_predict_layers > 0)
        check_architecture(path, cfg, new_cfg)
        with torch.device("meta"):
            fresh = Transformer(cfg)
        load_checkpoint_into(fresh, reader, dtype, "meta", skip_mtp_layers=skip, dry_run=True)
        load_checkpoint_into(fresh, reader, dtype, device, skip_mtp_layers=skip)
    finally:
        reader.close()
    tensors = dict(fresh.state_dict())
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    return quantise_staged(model, tensors, dtype)


def check_tensors(tensors: Mapping[str, torch.Tensor], cfg: ModelConfig, source: str = "update") -> dict[str, torch.Tensor]:
    """Check a mapping of dsv3 parameter names to tensors (all of the model's or a subset) in full: every
    name known, every value a floating tensor of the parameter's shape (meta tensors check a description
    before any data exists). MTP tensors of a model served without MTP are skipped, as loading skips
    them, and so is a tied head's `lm_head.weight`. -> the entries to apply (DTensors gathered)."""
    if not isinstance(tensors, Mapping):
        raise UserError(f"{source}: expected a mapping of parameter names to tensors, got {type(tensors).__name__}")
    if not tensors:
        raise UserError(f"{source}: no tensors given")
    if len(tensors) > MAX_TENSORS:
        raise UserError(f"{source}: {len(tensors)} tensors exceed the cap of {MAX_TENSORS}")
    shapes = expected_shapes(cfg)
    unknown, bad, out = [], [], {}
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise UserError(f"{source}: parameter names must be strings, got {type(name).__name__}")
        if (cfg.num_nextn_predict_layers == 0 and name.startswith("model.mtp.")) or \
                (cfg.tie_word_embeddings and name == "lm_head.weight"):
            continue
        if name not in shapes:
            unknown.append(name[:120])
            continue
        if hasattr(t, "full_tensor"):  # a DTensor (an FSDP / tensor-parallel trainer): gather it
            t = t.full_tensor()
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            what = f"a {t.dtype} tensor" if isinstance(t, torch.Tensor) else type(t).__name__
            bad.append(f"{name} is {what} (expected a floating tensor)")
            continue
        if tuple(t.shape) != shapes[name]:
            bad.append(f"{name} {list(t.shape)} (expected {list(shapes[name])})")
            continue
        out[name] = t
    if unknown:
        raise UserError(f"{source}: {len(unknown)} name(s) not in the served model: {', '.join(sorted(unknown)[:4])}")
    if bad:
        raise UserError(f"{source}: wrong tensor(s): {'; '.join(bad[:4])}")
    if not out:
        raise UserError(f"{source}: none of the {len(tensors)} tensors belongs to the served model")
    return out


def stage_tensors(tensors: Mapping[str, torch.Tensor], model: nn.Module, dtype: torch.dtype, device: torch.device,
                  source: str = "update") -> Staged:
    """`check_tensors`, then each tensor copied in the engine's dtype and device (the caller may go on
    changing its own tensors, e.g. the next optimizer step)."""
    out = {name: t.detach().to(device=device, dtype=torch.float32 if name.endswith(KEEP_FP32) else dtype, copy=True)
           for name, t in check_tensors(tensors, model.config, source).items()}
    return quantise_staged(model, out, dtype)


def quantise_staged(model: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> Staged:
    """Split new dense tensors into those applied as they are and those whose module runs quantised
    (quantised here with that module's scheme: a linear's matrix, or each routed expert's). A tied
    head kept as its own quantised copy is requantised from the new embedding."""
    staged = Staged()
    for name, t in tensors.items():
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        scheme = getattr(mod, "scheme", None)
        if scheme is None:
            staged.dense[name] = t
            continue
        staged.quantised.setdefault(mod_name, {}).update(_quantise(scheme, attr, t, dtype))
    tie = getattr(model.config, "tie_word_embeddings", False)
    head_scheme = getattr(model.lm_head, "scheme", None)
    if tie and head_scheme is not None and "model.embed_tokens.weight" in tensors:
        staged.quantised["lm_head"] = _quantise(head_scheme, "weight", tensors["model.embed_tokens.weight"], dtype)
    return staged


def _quantise(scheme, attr: str, w: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`attr` (a linear's weight [N, K], or stacked experts [E, N, K]) -> {attr: q, attr_scale_inv: s},
    as `QuantLinear.from_linear` / `QuantExperts.from_experts` store them."""
    pairs = [scheme.quantize(w)] if w.dim() == 2 else [scheme.quantize(w[e]) for e in range(w.shape[0])]
    q = pairs[0][0] if w.dim() == 2 else torch.stack([q for q, _ in pairs])
    s = pairs[0][1] if w.dim() == 2 else torch.stack([s for _, s in pairs])
    return {attr: q, attr + "_scale_inv": s if scheme.keep_scale_fp32 else s.to(dtype)}


@torch.no_grad()
def apply(model: nn.Module, staged: Staged) -> None:
    """Write staged tensors into `model` in place (cannot fail on a staged, checked update)."""
    with torch.inference_mode():
        for name, t in staged.dense.items():
            mod_name, _, attr = name.rpartition(".")
            mod = model.get_submodule(mod_name)
            live = mod._parameters[attr] if attr in mod._parameters else mod._buffers[attr]
            live.copy_(t)
    for mod_name, buffers in staged.quantised.items():
        mod = model.get_submodule(mod_name)
        for attr, t in buffers.items():
            mod._buffers[attr] = t
        mod.__dict__.pop("_native_pack", None)  # the native kernels' packed form of the old storage
