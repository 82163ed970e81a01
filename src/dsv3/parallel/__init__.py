"""Distributed pretraining on torch.distributed: one set of meshes (dims.py), FSDP2 / DDP / ZeRO-1
data parallel (fsdp.py), DTensor tensor + sequence parallel (tp.py), all-to-all expert parallel
(ep.py), torch.distributed.pipelining stages and schedules (pp.py), DCP checkpoints (dcp.py), and the
msrun-style launcher (launch.py). The model code stays single-device; all of this is applied from
outside, by the training step's strategy (`dsv3.train.strategy`), which this package never imports."""

from __future__ import annotations

from typing import Any

# Exports are lazy (as in dsv3.infer): `dsv3 launch` and `dsv3 --help` import this package without torch.
_EXPORTS = {**{n: "dsv3.parallel.api" for n in ("DistributedModel", "parallelize")},
            "ParallelDims": "dsv3.config.layout",
            **{n: "dsv3.parallel.dims" for n in ("Meshes", "build_meshes", "init_distributed")}}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dsv3.parallel' has no attribute {name!r}")
