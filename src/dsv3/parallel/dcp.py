"""Distributed checkpoints with `torch.distributed.checkpoint` (DCP): save under one layout, load
under another (or in one process), export to HF safetensors.

Keys are the single-process state-dict names (stages keep the Transformer's names, experts are
DTensors with their global [E,I,D] shape, FSDP/TP parameters are DTensors), so DCP reshards by
itself. A stage holding the MTP copy of the embedding saves the same key as stage 0; both hold the
same values, and DCP writes one of them.

Optimizer state (AdamW) is saved per parameter under `optim.<name>.{step,exp_avg,exp_avg_sq}`
with the parameter's own layout, so it reshards the same way.

A checkpoint's `.metadata` is a pickle, and torch's reader unpickles it with `pickle.load`: any
file there could run code. Every read here goes through `read_metadata`, which admits only the
classes DCP writes for tensors (`_ALLOWED`) and refuses a non-tensor entry (DCP would `torch.load`
its bytes with `weights_only=False`) or a storage path outside the checkpoint directory.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from dsv3.errors import UserError

ADAM_KEYS = ("exp_avg", "exp_avg_sq")
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    (_DCP_METADATA, "Metadata"), (_DCP_METADATA, "TensorStorageMetadata"), (_DCP_METADATA, "ChunkStorageMetadata"),
    (_DCP_METADATA, "TensorProperties"), (_DCP_METADATA, "MetadataIndex"), (_DCP_METADATA, "StorageMeta"),
    (_DCP_METADATA, "_MEM_FORMAT_ENCODING"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
}
"""(module, name) of every global a tensor-only DCP `.metadata` refers to; torch dtypes are admitted by type."""


class _MetadataUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that resolves only the globals of `_ALLOWED` (and `torch.<dtype>`)."""

    def find_class(self, module: str, name: str):
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which a DCP checkpoint's metadata never holds")


def read_metadata(path: str | Path) -> Metadata:
    """The `.metadata` of DCP checkpoint `path`, unpickled with the allow-list and checked: tensor
    entries only, storage files inside `path`. UserError (one line) otherwise."""
    f = Path(path, ".metadata")
    try:
        with open(f, "rb") as fh:
            md = _MetadataUnpickler(fh).load()
    except Exception as e:  # refused globals, truncated or damaged pickles surface as many exception types
        raise UserError(f"{f}: unreadable DCP metadata ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict) or not isinstance(md.storage_data, dict):
        raise UserError(f"{f}: not DCP metadata (holds a {type(md).__name__})")
    for key, entry in md.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            raise UserError(f"{f}: entry {str(key)[:100]!r} is a {type(entry).__name__}, not a tensor")
    for info in md.storage_data.values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(info, _StorageInfo) or not isinstance(rel, str) or Path(rel).name != rel or rel in ("", ".", ".."):
            raise UserError(f"{f}: storage entry {str(rel)[:100]!r} is not a file name inside the checkpoint")
    return md


class _CheckedReader(FileSystemReader):
    """torch's FileSystemReader over metadata already read by `read_metadata` (no `.metadata`
    unpickling of its own, and no fallback to per-rank metadata files)."""

    def __init__(self, path: str | Path):
        super().__init__(str(path))
        self._metadata = read_metadata(path)

    def read_metadata(self) -> Metadata:
        md = self._metadata
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


def _named_params(parts: list[nn.Module]) -> dict[str, nn.Parameter]:
    """Parameters by single-process name (recompute wrappers removed, as state_dict() does)."""
    from dsv3.parallel.init import canonical_name

    out: dict[str, nn.Parameter] = {}
    for part in parts:
        for name, p in part.named_parameters():
            out.setdefault(canonical_name(name), p)
    return out


def model_state(parts: list[nn.Module]) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of this rank's parts, by single-process name."""
    sd: dict[str, torch.Tensor] = {}
    for part in parts:
        for k, v in part.state_dict().items():
            sd.setdefault(k, v)
    return sd


def optimizer_state(parts: list[nn.Module], optimizer: torch.optim.Optimizer, init: bool = False) -> dict[str, torch.Tensor]:
    """AdamW moments of every parameter by name (views into the optimizer's state, so loading
    into them restores it). `init` creates zero state first (a fresh optimizer before loading), in
    the optimizer's `state_dtype` (BF16 moments) when it has one. Under ZeRO-1 a rank holds (and
    saves, and loads) the state of the parameters it owns only."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer = optimizer.optim  # this rank's partition
    owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
    dtype = getattr(type(optimizer), "state_dtype", None)
    out = {}
    for name, p in _named_params(parts).items():
        if id(p) not in owned:
            continue
        st = optimizer.state[p]
        if init and not st:
            fused = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")  # their step lives on the device
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu")
            for k in ADAM_KEYS:
                st[k] = torch.zeros_like(p, dtype=dtype)
        if st:
            out[f"optim.{name}.step"] = st["step"]
            for k in ADAM_KEYS:
                out[f"optim.{name}.{k}"] = st[k]
    return out


def save(path: str | Path, parts: list[nn.Module], optimizer: torch.optim.Optimizer | None = None) -> None:
    """Collective: every rank writes its shards of the model (and optimizer) to the directory `path`."""
    state = model_state(parts)
    if optimizer is not None:
        state.update(optimizer_state(parts, optimizer))
    dcp.save(state, checkpoint_id=str(path))


def load(path: str | Path, parts: list[nn.Module], optimizer: torch.optim.Optimizer | None = None,
         single_process: bool | None = None) -> None:
    """Collective (or single process): fill this rank's parts (and optimizer) from `path`, whatever
    the layout it was saved under. `single_process` (default: no process group) reads without
    collectives, e.g. on one rank of a running job."""
    if single_process is None:
        single_process = not dist.is_initialized()
    if not Path(path, ".metadata").is_file():
        raise UserError(f"{path}: not a DCP checkpoint (no .metadata file)")
    reader = _CheckedReader(path)
    state = model_state(parts)
    if optimizer is not None:
        state.update(optimizer_state(parts, optimizer, init=True))
    try:
        with warnings.catch_warnings():  # single process is intended here, not a fallback
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=reader, no_dist=single_process)
    except Exception as e:  # DCP reports missing keys / shape mismatches in a CheckpointException
        raise UserError(f"{path}: cannot load into this model: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    for part in parts:
        # state_dict() tensors alias the parameters for plain / DTensor params; load anything else back.
        own = part.state_dict()
        part.load_state_dict({k: state[k] for k in own}, strict=True)


def export_hf(path: str | Path, model_cfg, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Single process: read the DCP checkpoint `path` into a plain Transformer and write it as an HF
    directory (`dsv3.checkpoint.save.save_pretrained`). Run after training, or on rank 0 after a barrier."""
    from dsv3.checkpoint.save import save_pretrained
    from dsv3.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(model_cfg)
    model = model.to_empty(device="cpu")
    model.rotary.inv_freq.copy_(type(model.rotary)(model_cfg).inv_freq)
    load(path, [model], single_process=True)
    if dtype is not None:
        model = model.to(dtype)
    return save_pretrained(model, out)


def save_and_export(path: str | Path, parts: list[nn.Module], optimizer, model_cfg, hf_out: str | Path | None = None) -> None:
    """Collective save, then rank 0 exports HF safetensors (when `hf_out` is given)."""
    save(path, parts, optimizer)
    if hf_out is not None:
        if not dist.is_initialized() or dist.get_rank() == 0:
            export_hf(path, model_cfg, hf_out)
        if dist.is_initialized():
            dist.barrier()
