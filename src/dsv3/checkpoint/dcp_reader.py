"""Read a distributed (DCP) training checkpoint as `dsv3 convert` reads safetensors directories.

Every `dsv3 launch` run writes `OUTPUT/checkpoint/step-N/` as a DCP directory: `.metadata` (a pickle),
`__R_0.distcp` shards, trainer_state.pt and config.resolved.yaml. `DcpReader` offers the interface of
`reader.CheckpointReader` (names, shapes and dtypes up front, tensor data on demand) over the model
tensors of such a directory, whatever layout wrote it: keys are the single-process names of our layout
(stacked experts, `model.mtp.k.*`), and DCP assembles each tensor from the shards of every rank.
Optimizer moments (`optim.*`) are skipped.

The metadata goes through `dsv3.parallel.dcp.read_metadata` (an allow-list unpickler: nothing else is
unpickled), and every shard it names must be present before anything is read: a missing or empty shard
is one line naming it, not a traceback halfway through a conversion.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from dsv3.errors import UserError

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
"""torch dtype -> the safetensors dtype name `CheckpointReader.meta` reports."""


def is_dcp_dir(path: str | Path) -> bool:
    """Whether `path` is a DCP checkpoint directory (has `.metadata` and no safetensors)."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file() and not any(path.glob("*.safetensors"))


class DcpReader:
    """Lazy view of a DCP checkpoint's model tensors (see the module docstring)."""

    def __init__(self, path: str | Path):
        from dsv3.parallel.dcp import _CheckedReader

        self.path = Path(path)
        self._storage = _CheckedReader(self.path)  # reads .metadata through the allow-list
        md = self._storage.read_metadata()
        self.files = sorted({info.relative_path for info in md.storage_data.values()})
        for fname in self.files:
            f = self.path / fname
            if not f.is_file() or f.stat().st_size == 0:
                raise UserError(f"{self.path}: DCP shard {fname} is {'empty' if f.is_file() else 'missing'} "
                                f"(.metadata lists {len(self.files)} shard files: {', '.join(self.files)})")
        self._entries = {k: e for k, e in md.state_dict_metadata.items() if not k.startswith("optim.")}
        self.meta: dict[str, tuple[str, tuple[int, ...], str]] = {}  # name -> (".metadata", shape, dtype), as CheckpointReader
        for name, e in self._entries.items():
            dtype = e.properties.dtype
            if dtype not in _ST_DTYPES:
                raise UserError(f"{self.path}: tensor {name[:100]} has dtype {dtype}, which no DeepSeek-V3 checkpoint holds")
            self.meta[name] = (".metadata", tuple(e.size), _ST_DTYPES[dtype])
        if not self.meta:
            raise UserError(f"{self.path}: the DCP checkpoint holds no model tensors")

    def names(self) -> list[str]:
        return sorted(self.meta)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.meta[name][1]

    def tensor(self, name: str) -> torch.Tensor:
        import torch.distributed.checkpoint as dcp

        e = self._entries[name]
        out = torch.empty(tuple(e.size), dtype=e.properties.dtype)
        state = {name: out}
        try:
            with warnings.catch_warnings():  # one process is intended here, not a fallback
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(state, storage_reader=self._storage, no_dist=True)
        except Exception as exc:  # a shard cut short or damaged surfaces inside DCP's reader
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{self.path}: cannot read {name} from the DCP shards ({first})") from None
        return state[name]

    def close(self) -> None:
        self._entries.clear()
