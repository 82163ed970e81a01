"""Read and write Hugging Face format checkpoints (config.json + sharded safetensors).

* `from_pretrained(path, dtype=, device=)` builds the model on the meta device, then streams the
  checkpoint shard by shard, turning each tensor (or each expert's slice) into its final
  dtype/device and assigning it in place: no second copy of the weights is ever held. FP8 weights
  are dequantised on the fly; the router bias always stays fp32.
* `save_pretrained(model, path, max_shard_size=)` writes the hub layout back (per-expert tensors,
  MTP as layer `num_hidden_layers + k` with copies of the tied embedding/head), into a temporary
  directory that is then renamed into place.

All names go through `dsv3.checkpoint.hf_map`. Every problem a user can cause (a missing directory,
a non-DeepSeek config.json, a missing/unexpected/wrongly shaped tensor, a truncated file) raises
`UserError` with one line naming it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from dsv3.checkpoint import hf_map
from dsv3.checkpoint.fp8 import is_fp8, weight_dequant
from dsv3.config.hf import load_hf_config, to_hf_dict
from dsv3.config.schema import ModelConfig
from dsv3.errors import UserError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
KEEP_FP32 = ("e_score_correction_bias",)
"""Tensors kept in fp32 whatever dtype the model is loaded in (routing must be exact)."""

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None, default: str = "bfloat16") -> torch.dtype:
    """'bf16' / 'bfloat16' / torch.bfloat16 / None (-> default) -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype if dtype is not None else default).replace("torch.", "")
    if key not in _DTYPES:
        raise UserError(f"dtype {dtype!r} is not supported (choose from {', '.join(sorted(_DTYPES))})")
    return _DTYPES[key]


def parse_size(size: int | str) -> int:
    """'5GB' (10^9), '5GiB' (2^30), '200MB', '50KB' or an int -> bytes (HF conventions)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(size).upper())
    if not m:
        raise UserError(f"max_shard_size {size!r}: expected a byte count like 5GB, 500MB or 2GiB")
    unit = m.group(2) or "B"
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base**power)


# ----------------------------------------------------------------------------------------- reading
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
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{index}: not a valid safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
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


def _few(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


def read_weight(reader: CheckpointReader, name: str) -> torch.Tensor:
    """An HF tensor, dequantised to fp32 if it is FP8 with a `_scale_inv` beside it."""
    t = reader.tensor(name)
    if is_fp8(t):
        sname = name + hf_map.SCALE_SUFFIX
        if sname not in reader.meta:
            raise UserError(f"{reader.path}: FP8 tensor {name} has no {sname}")
        t = weight_dequant(t, reader.tensor(sname), dtype=torch.float32)
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


def resolve_config(path: str | Path, reader: CheckpointReader, mtp: bool | None, **runtime) -> tuple[ModelConfig, int]:
    """The directory's config with the MTP depth to build, and how many MTP layers of the files to skip.

    mtp: None loads the MTP layers when the files have them, False skips them, True requires them.
    """
    cfg = load_dir_config(path)[0]
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
        return torch.float32 if name.endswith(KEEP_FP32) else dtype

    for hf_name in reader.names():
        shape = reader.shape(hf_name)
        if skip and hf_name.startswith(skip):
            continue
        tgt = hf_map.from_hf(hf_name, cfg)
        if tgt is not None and tgt.kind in ("scale", "tied"):
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
                _assign(model, tgt.name, read_weight(reader, hf_name).to(device=device, dtype=target_dtype(tgt.name)))
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
                building[tgt.name][tgt.expert].copy_(read_weight(reader, hf_name))
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


def check_checkpoint(path: str | Path, mtp: bool | None = None) -> tuple[ModelConfig, CheckpointReader]:
    """Validate an HF directory without reading tensor data: config, file headers, names, shapes.

    Returns the resolved config and the (open) reader; raises UserError naming the first problem.
    """
    from dsv3.model.transformer import Transformer

    path = Path(path)
    reader = CheckpointReader(path)
    cfg, skip = resolve_config(path, reader, mtp)
    with torch.device("meta"):
        model = Transformer(cfg)
    load_checkpoint_into(model, reader, torch.float32, "meta", skip_mtp_layers=skip, dry_run=True)
    return cfg, reader


def from_pretrained(path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
                    mtp: bool | None = None, **runtime):
    """Load an HF-format DeepSeek-V3 directory into a `Transformer` in eval mode.

    dtype: None uses config.json's dtype (FP8 checkpoints: bfloat16); the router bias stays fp32.
    mtp: None loads the MTP modules when the checkpoint has them; False skips them (less memory);
    True requires them. `runtime` sets runtime switches of ModelConfig (attn_impl, moe_impl, mtp_hidden).
    """
    from dsv3.model.transformer import Transformer

    bad = set(runtime) - {"attn_impl", "moe_impl", "mtp_hidden"}
    if bad:
        raise TypeError(f"from_pretrained got unexpected keyword arguments {sorted(bad)}")
    path = Path(path)
    reader = CheckpointReader(path)
    try:
        cfg, skip = resolve_config(path, reader, mtp, **runtime)
        torch_dtype = parse_dtype(dtype, default=cfg.torch_dtype if cfg.torch_dtype in _DTYPES else "bfloat16")
        with torch.device("meta"):
            model = Transformer(cfg)
        load_checkpoint_into(model, reader, torch_dtype, device, skip_mtp_layers=skip)
    finally:
        reader.close()
    model.init_non_persistent_buffers(device)
    model.config = dataclasses.replace(cfg, torch_dtype=str(torch_dtype).replace("torch.", ""))
    return model.eval()


# ----------------------------------------------------------------------------------------- writing
def hf_tensors(model: nn.Module, mtp_copies: bool = True) -> Iterator[tuple[str, torch.Tensor, int]]:
    """(HF name, tensor view, bytes) for every tensor of the hub layout, in state-dict order.

    Expert slices and tied copies are views; callers copy them only when writing their shard.
    """
    cfg: ModelConfig = model.config
    sd = model.state_dict()
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    for name, t in sd.items():
        for hf_name, e in hf_map.to_hf(name, cfg):
            v = t if e is None else t[e]
            yield hf_name, v, v.numel() * v.element_size()
    for hf_name, ours in hf_map.tied_copies(cfg) if mtp_copies else ():
        t = sd.get(ours, sd.get("model.embed_tokens.weight"))
        yield hf_name, t, t.numel() * t.element_size()
    for hf_name, shape in hf_map.hf_only_empty(cfg):
        t = torch.empty(shape, dtype=sd["model.embed_tokens.weight"].dtype)
        yield hf_name, t, 0


def _plan_shards(items: list[tuple[str, torch.Tensor, int]], max_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    shards, cur, size = [], [], 0
    for name, t, nbytes in items:
        if cur and size + nbytes > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, t))
        size += nbytes
    if cur:
        shards.append(cur)
    return shards


def _install(tmp: Path, dest: Path) -> None:
    """Move a fully written temporary directory into place (whole-dir rename when possible)."""
    if dest.exists() and not dest.is_dir():
        raise UserError(f"{dest} exists and is not a directory")
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)  # mkdtemp (and safetensors) make 0700/0600: give the user's usual modes
    for f in tmp.iterdir():
        os.chmod(f, 0o666 & ~mask)
    if not dest.exists() or not any(dest.iterdir()):
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
        return
    # Existing directory (may hold tokenizer files): replace our files, weights first, index/config last.
    new = {p.name for p in tmp.iterdir()}
    for old in dest.glob("model*.safetensors"):
        if old.name not in new:
            old.unlink()
    if INDEX_NAME not in new and (dest / INDEX_NAME).exists():
        (dest / INDEX_NAME).unlink()
    for name in sorted(new, key=lambda n: n in (INDEX_NAME, "config.json")):
        os.replace(tmp / name, dest / name)
    tmp.rmdir()


def save_pretrained(model: nn.Module, path: str | Path, max_shard_size: int | str = "5GB", mtp_copies: bool = True) -> Path:
    """Write `model` as an HF-format directory (config.json, safetensors shards, index).

    Tensors keep their dtypes (the router bias stays fp32). `mtp_copies` writes the MTP layer's
    copies of the embedding and head that the hub format carries. Returns the directory.
    """
    from safetensors.torch import save_file

    dest = Path(path)
    max_bytes = parse_size(max_shard_size)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shards = _plan_shards(list(hf_tensors(model, mtp_copies)), max_bytes)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, start=1):
            fname = SINGLE_NAME if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            # clone: expert slices and tied copies share storage, which safetensors refuses
            tensors = {n: t.detach().to("cpu", copy=True).contiguous() for n, t in shard}
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            for n, t in tensors.items():
                weight_map[n] = fname
                total += t.numel() * t.element_size()
            del tensors
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        cfg = model.config
        dtype = str(model.lm_head.weight.dtype).replace("torch.", "")
        hf = to_hf_dict(dataclasses.replace(cfg, torch_dtype=dtype))
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
        _install(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
