"""Read Hugging Face format checkpoint directories (config.json + sharded safetensors).

`CheckpointReader` opens every shard's header (names, shapes, dtypes) and reads tensor data only on
demand; `read_weight` dequantises FP8 / int8 tensors with their `_scale_inv`; `load_dir_config`
reads the directory's config.json (or a training checkpoint's config.resolved.yaml).

Every problem a user can cause (a missing directory, a bad index, a truncated file) raises
`UserError` with one line naming it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from dsv3.checkpoint import hf_map
from dsv3.checkpoint.fp8 import is_fp8, weight_dequant
from dsv3.config.hf import load_hf_config, to_hf_dict
from dsv3.config.schema import ModelConfig
from dsv3.errors import UserError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointReader:
    """Lazy view of an HF-format directory: tensor names, shapes and dtypes from the file headers.

    Opening validates every file (safetensors checks that the header covers the file, so a
    truncated shard is caught here); tensor data is read only by `tensor()`.
    """

    def __init__(self, path: str | Path):
        from safetensors import SafetensorError, safe_open

        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"checkpoint directory {self.path} does not exist")
        if not self.path.is_dir():
            raise UserError(f"{self.path} is not a directory (expected an HF checkpoint directory with config.json)")
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{index}: not a valid safetensors index ({e})") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise UserError(f"{index}: weight_map must map tensor names to shard file names")
            files = sorted(set(weight_map.values()))
            for fname in files:
                _check_shard_name(index, fname)
        elif (self.path / SINGLE_NAME).is_file():
            files, weight_map = [SINGLE_NAME], None
        else:
            files, weight_map = sorted(p.name for p in self.path.glob("*.safetensors")), None
            if not files:
                raise UserError(f"{self.path}: no *.safetensors files (and no {INDEX_NAME})")
        self.files = files
        self._handles = {}
        self.meta: dict[str, tuple[str, tuple[int, ...], str]] = {}  # name -> (file, shape, dtype)
        for fname in files:
            fpath = self.path / fname
            if not fpath.is_file():
                raise UserError(f"{INDEX_NAME} names {fname}, which is missing from {self.path}")
            try:
                h = safe_open(str(fpath), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise UserError(f"{fpath}: unreadable safetensors file, truncated or corrupt ({e})") from None
            self._handles[fname] = h
            for name in h.keys():
                sl = h.get_slice(name)
                self.meta[name] = (fname, tuple(sl.get_shape()), sl.get_dtype())
        if weight_map is not None:
            absent = sorted(set(weight_map) - set(self.meta))
            if absent:
                raise UserError(f"{INDEX_NAME} lists tensors absent from their shards: {_few(absent)}")

    def names(self) -> list[str]:
        """Tensor names in file order (so reading streams shard by shard)."""
        order = {f: i for i, f in enumerate(self.files)}
        return sorted(self.meta, key=lambda n: (order[self.meta[n][0]], n))

    def shape(self, name: str) -> tuple[int, ...]:
        return self.meta[name][1]

    def tensor(self, name: str) -> torch.Tensor:
        return self._handles[self.meta[name][0]].get_tensor(name)

    def close(self) -> None:
        self._handles.clear()


def _check_shard_name(index: Path, fname: str) -> None:
    """A shard named by the index must be a relative path inside the checkpoint directory: no
    absolute paths, no `..`, so a hostile index cannot make us open files elsewhere."""
    p = Path(fname)
    if not fname or "\0" in fname or p.is_absolute() or ".." in p.parts or "\\" in fname or not p.name.endswith(".safetensors"):
        raise UserError(f"{index}: shard {fname!r} is not a .safetensors file inside the checkpoint directory")


def check_layer_count(reader: CheckpointReader, cfg: ModelConfig, source: str | Path) -> None:
    """The config's layer count against the layers the tensors hold, before anything is built:
    main layers 0..num_hidden_layers-1 must all be there, and no more than the MTP layers on top."""
    layers = {int(m.group(1)) for n in reader.meta if (m := re.match(r"model\.layers\.(\d+)\.", n))}
    n = cfg.num_hidden_layers
    main = sum(1 for i in layers if i < n)
    if main < n:
        have = f"{len(layers)} layer(s) (0..{max(layers)})" if layers else "no decoder layers"
        raise UserError(f"{source}: num_hidden_layers is {n} but the checkpoint's tensors hold {have}")
    if layers and max(layers) >= n + cfg.num_nextn_predict_layers:
        raise UserError(f"{source}: the checkpoint holds layers up to {max(layers)} but num_hidden_layers {n} + "
                        f"num_nextn_predict_layers {cfg.num_nextn_predict_layers} allows {n + cfg.num_nextn_predict_layers}")


def _few(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


def read_weight(reader: CheckpointReader, name: str, raw: bool = False) -> torch.Tensor:
    """An HF tensor, dequantised to fp32 if it is FP8 (128x128 block scales) or int8 (per-row scales,
    `dsv3 convert --quantize`) with a `_scale_inv` beside it; `raw` returns the stored tensor as is."""
    t = reader.tensor(name)
    if not raw and (is_fp8(t) or t.dtype == torch.int8):
        sname = name + hf_map.SCALE_SUFFIX
        if sname not in reader.meta:
            raise UserError(f"{reader.path}: quantised tensor {name} ({t.dtype}) has no {sname}")
        s = reader.tensor(sname)
        t = t.float() * s.float() if t.dtype == torch.int8 else weight_dequant(t, s, dtype=torch.float32)
    return t


TRAIN_CONFIG = "config.resolved.yaml"
"""The resolved run config a `dsv3 train` checkpoint directory carries instead of config.json."""


def load_dir_config(path: str | Path) -> tuple[ModelConfig, dict]:
    """(ModelConfig, HF config dict) of a checkpoint directory: its config.json, or for a training
    checkpoint (`dsv3 train` writes model.safetensors in our layout) the `model:` section of
    config.resolved.yaml."""
    path = Path(path)
    if (path / "config.json").is_file() or not (path / TRAIN_CONFIG).is_file():
        cfg = load_hf_config(path)
        return cfg, json.loads((path / "config.json").read_text(encoding="utf-8"))
    from dsv3.config.presets import load_model_config

    cfg = load_model_config(path / TRAIN_CONFIG)
    return cfg, to_hf_dict(cfg)


def count_mtp_layers(reader: CheckpointReader, cfg: ModelConfig) -> int:
    """Number of MTP layers in the checkpoint: HF layers >= num_hidden_layers, or our `model.mtp.{k}`."""
    hf_layers, ours = set(), set()
    for n in reader.meta:
        if m := re.match(r"model\.layers\.(\d+)\.", n):
            if int(m.group(1)) >= cfg.num_hidden_layers:
                hf_layers.add(m.group(1))
        elif m := re.match(r"model\.mtp\.(\d+)\.", n):
            ours.add(m.group(1))
    return len(hf_layers) + len(ours)
