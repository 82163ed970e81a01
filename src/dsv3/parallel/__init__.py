"""Distributed pretraining on torch.distributed: one set of meshes (dims.py), FSDP2 / DDP / ZeRO-1
data parallel (fsdp.py), DTensor tensor + sequence parallel (tp.py), all-to-all expert parallel
(ep.py), torch.distributed.pipelining stages and schedules (pp.py), DCP checkpoints (dcp.py), and the
msrun-style launcher (launch.py). The model code stays single-device; all of this is applied from outside."""

from dsv3.parallel.api import (DistributedModel, build_optimizer, lm_loss, parallelize, reduce_expert_counts, train_step,
                               update_expert_bias)
from dsv3.parallel.dims import Meshes, ParallelDims, build_meshes, init_distributed

__all__ = ["DistributedModel", "Meshes", "ParallelDims", "build_meshes", "build_optimizer", "init_distributed", "lm_loss",
           "parallelize", "reduce_expert_counts", "train_step", "update_expert_bias"]
