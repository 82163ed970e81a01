"""The device meshes of a parallel layout (`dsv3.config.layout.ParallelDims`: the degrees and their
validation, rank = (p · dp + d) · tp + t) and the process group they live in.

Three meshes over the same ranks:
    dense  [pp, dp, tp]        attention, dense MLP, embeddings, head: FSDP/DDP over dp, DTensor TP over tp
    sparse [pp, edp, ep]       routed experts: split over ep, and over edp = dp·tp / ep (FSDP) or replicated
    tokens [pp, dptp]          every rank of one stage that routes different tokens (balancing counts)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from dsv3.config.layout import ParallelDims
from dsv3.devices import resolve_device
from dsv3.errors import UserError

@dataclass
class Meshes:
    """The three meshes of `dims.py`'s docstring, plus this rank's coordinates."""

    dims: ParallelDims
    dense: DeviceMesh
    sparse: DeviceMesh
    tokens: DeviceMesh
    device: torch.device

    @property
    def dp_mesh(self) -> DeviceMesh:
        return self.dense["dp"]

    @property
    def fsdp_mesh(self) -> DeviceMesh:
        """The mesh dense FSDP units shard over: dp, or (dp_replicate, dp_shard) under HSDP."""
        return self.dense["dp_replicate", "dp_shard"] if self.dims.dp_replicate > 1 else self.dense["dp"]

    @property
    def tp_mesh(self) -> DeviceMesh:
        return self.dense["tp"]

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return self.dense.get_group("pp")

    @property
    def ep_mesh(self) -> DeviceMesh:
        return self.sparse["ep"]

    @property
    def edp_mesh(self) -> DeviceMesh:
        return self.sparse["edp"]

    @property
    def edp_group(self) -> dist.ProcessGroup:
        return self.sparse.get_group("edp")

    @property
    def tokens_group(self) -> dist.ProcessGroup:
        return self.tokens.get_group("dptp")

    @property
    def pp_rank(self) -> int:
        return self.dense.get_local_rank("pp")

    @property
    def dp_rank(self) -> int:
        return self.dense.get_local_rank("dp")

    @property
    def tp_rank(self) -> int:
        return self.dense.get_local_rank("tp")


def init_distributed(device_type: str | None = None) -> torch.device:
    """Initialise the default process group from torchrun's environment (gloo on CPU, nccl on CUDA)."""
    if device_type is None:
        device_type = resolve_device("auto").type
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise UserError("no distributed environment (RANK/WORLD_SIZE unset): start with torchrun or `dsv3 launch`")
        # DSV3_DIST_TIMEOUT: `dsv3 launch`'s CLUSTER_TIME_OUT (seconds to wait for every worker)
        timeout = timedelta(seconds=int(os.environ.get("DSV3_DIST_TIMEOUT", "1800")))
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timeout,
                                device_id=device if device_type == "cuda" else None)
    return device


def build_meshes(dims: ParallelDims, device_type: str = "cpu", model_cfg=None) -> Meshes:
    """Validate `dims` against the running world and build the meshes (collective: every rank calls it)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    dims.validate(world, model_cfg)
    if not dist.is_initialized():
        raise UserError("build_meshes needs an initialised process group (torchrun / dsv3 launch)")
    ranks = torch.arange(world)
    if dims.dp_replicate > 1:  # HSDP: dp split into (replicate, shard); "dp" is their flattening (same rank order)
        dense = DeviceMesh(device_type, ranks.view(dims.pp, dims.dp_replicate, dims.fsdp_size, dims.tp),
                           mesh_dim_names=("pp", "dp_replicate", "dp_shard", "tp"))
        dense["dp_replicate", "dp_shard"]._flatten("dp")
    else:
        dense = DeviceMesh(device_type, ranks.view(dims.pp, dims.dp, dims.tp), mesh_dim_names=("pp", "dp", "tp"))
    sparse = DeviceMesh(device_type, ranks.view(dims.pp, dims.edp, dims.ep), mesh_dim_names=("pp", "edp", "ep"))
    tokens = DeviceMesh(device_type, ranks.view(dims.pp, dims.dp * dims.tp), mesh_dim_names=("pp", "dptp"))
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    return Meshes(dims, dense, sparse, tokens, device)
