"""Parallel layout: degrees from the config, validation, and the device meshes.

Rank layout (tensor parallel fastest, as in Megatron and torchtitan):
    rank = (p · dp + d) · tp + t          p pipeline stage, d data-parallel rank, t tensor-parallel rank

Three meshes over the same ranks:
    dense  [pp, dp, tp]        attention, dense MLP, embeddings, head: FSDP/DDP over dp, DTensor TP over tp
    sparse [pp, edp, ep]       routed experts: split over ep, and over edp = dp·tp / ep (FSDP) or replicated
    tokens [pp, dptp]          every rank of one stage that routes different tokens (balancing counts)

Expert parallelism "borrows" data- and tensor-parallel ranks (torchtitan, MindSpore): ep must
divide dp·tp; it does not multiply the world size. With the seed's dp2 mp2 pp2 ep2 on 8 devices,
the ep group is the tp group and edp is the dp group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from dsv3.errors import UserError

SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")
MULTI_STAGE = ("Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")
V_SCHEDULES = ("ZBVZeroBubble", "DualPipeV")
FULL_BACKWARD = ("GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS")
"""Schedules whose backward is one action per micro-batch (the others split input and weight gradients)."""


@dataclass
class ParallelDims:
    """Parallel degrees of one run (the seed's `parallel_config` keys, plus ours)."""

    dp: int = 1
    """data_parallel: replicas of the dense weights that see different batches."""
    tp: int = 1
    """model_parallel: tensor-parallel degree (heads and MLP width split)."""
    pp: int = 1
    """pipeline_stage: pipeline ranks (each holds 1, or 2 with multi-stage schedules, stages)."""
    ep: int = 1
    """expert_parallel: routed experts split over this many ranks, carved out of dp·tp."""
    micro_batch_num: int = 1
    """Micro-batches per step (pipeline parallel); must be >= the number of pipeline stages."""
    seq_parallel: bool = True
    """use_seq_parallel: keep norms / residuals sharded along the sequence between TP regions."""
    dp_shard: str = "fsdp"
    """How dense weights are data-parallel: 'fsdp' (FSDP2 fully_shard), 'zero1' (replicated weights,
    optimizer state sharded), 'ddp' (replicated weights and optimizer state)."""
    dp_replicate: int = 1
    """HSDP: FSDP shards over dp / dp_replicate ranks and replicates over dp_replicate groups of them."""
    schedule: str = "1F1B"
    """Pipeline schedule name (torch.distributed.pipelining)."""
    stages_per_rank: int = 0
    """Virtual pipeline stages per rank; 0 = 1 for single-stage schedules, 2 for multi-stage ones."""
    dualpipe_overlap: bool | None = None
    """DualPipeV compute / all-to-all overlap: None where the layout allows it, True required, False off."""
    reduce_every_microbatch: bool = False
    """reduce_grads_every_microbatch: FSDP reduce-scatters every micro-batch's gradients under PP."""

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def edp(self) -> int:
        return self.dp * self.tp // self.ep

    @property
    def fsdp_size(self) -> int:
        """Ranks one dense FSDP shard group spans: dp, or dp / dp_replicate under HSDP."""
        return self.dp // self.dp_replicate

    @property
    def shard_experts(self) -> bool:
        """Routed experts FSDP-sharded over edp (dense FSDP and edp > 1), else replicated over edp."""
        return self.dp_shard == "fsdp" and self.dp > 1 and self.edp > 1

    @property
    def n_stages(self) -> int:
        return self.pp * self.v

    @property
    def v(self) -> int:
        if self.stages_per_rank:
            return self.stages_per_rank
        return 2 if self.pp > 1 and self.schedule in MULTI_STAGE else 1

    @property
    def last_stage_rank(self) -> int:
        """The pipeline rank holding the last stage (rank 0 under the V placement)."""
        return 0 if self.schedule in V_SCHEDULES and self.v == 2 else self.pp - 1

    @classmethod
    def from_config(cls, cfg) -> "ParallelDims":
        """From any object with the seed's parallel_config attribute names (missing ones keep defaults)."""
        get = lambda name, default: getattr(cfg, name, default) if not isinstance(cfg, dict) else cfg.get(name, default)
        return cls(
            dp=int(get("data_parallel", 1)), tp=int(get("model_parallel", 1)), pp=int(get("pipeline_stage", 1)),
            ep=int(get("expert_parallel", 1)), micro_batch_num=int(get("micro_batch_num", 1)),
            seq_parallel=bool(get("use_seq_parallel", True)), dp_shard=str(get("dp_shard", "fsdp")),
            schedule=str(get("pipeline_schedule", "1F1B")), stages_per_rank=int(get("stages_per_rank", 0)),
            dp_replicate=int(get("dp_replicate", 1)), dualpipe_overlap=get("dualpipe_overlap", None),
            reduce_every_microbatch=bool(get("reduce_grads_every_microbatch", False)),
        )

    @property
    def fsdp_no_sync(self) -> bool:
        """FSDP under a pipeline keeping gradients unsharded until the step's final reduce-scatter."""
        return self.dp_shard == "fsdp" and self.dp > 1 and self.pp > 1 and not self.reduce_every_microbatch

    def _world_fix(self, world_size: int) -> str:
        """What to change when the launcher started `world_size` processes for a layout of another size."""
        rest = self.tp * self.pp
        dp = f" (e.g. --set parallel.data_parallel={world_size // rest})" if world_size % rest == 0 else ""
        return f"make the product {world_size}{dp} or start {self.world_size} worker{'s' if self.world_size > 1 else ''}"

    def validate(self, world_size: int | None = None, model_cfg=None, seq_len: int | None = None, batch_size: int | None = None) -> None:
        """Raise UserError naming the field (`parallel.<key>` of our YAML; the same key of a MindSpore
        YAML's `parallel_config`) and the expected value."""
        for name, v in (("data_parallel", self.dp), ("model_parallel", self.tp), ("pipeline_stage", self.pp),
                        ("expert_parallel", self.ep), ("micro_batch_num", self.micro_batch_num)):
            if v < 1:
                raise UserError(f"parallel.{name} = {v}: must be >= 1")
        if world_size is not None and world_size != self.world_size:
            raise UserError(f"parallel (MindSpore: parallel_config): data_parallel {self.dp} x model_parallel {self.tp} x pipeline_stage {self.pp} "
                            f"= {self.world_size} processes, but the launcher started {world_size} (WORLD_SIZE); "
                            f"{self._world_fix(world_size)}")
        if (self.dp * self.tp) % self.ep:
            raise UserError(f"parallel.expert_parallel = {self.ep} must divide data_parallel x model_parallel = "
                            f"{self.dp * self.tp} (expert-parallel ranks are carved out of them)")
        if self.dp_shard not in ("fsdp", "zero1", "ddp"):
            raise UserError(f"parallel.dp_shard = {self.dp_shard!r}: expected fsdp, zero1 or ddp")
        if self.dp_replicate < 1 or self.dp % self.dp_replicate:
            raise UserError(f"parallel.dp_replicate = {self.dp_replicate} must divide data_parallel = {self.dp} "
                            f"(HSDP: replica groups of equal size)")
        if self.dp_replicate > 1 and self.dp_shard != "fsdp":
            raise UserError(f"parallel.dp_replicate = {self.dp_replicate} (HSDP) needs dp_shard 'fsdp', got {self.dp_shard!r}")
        if self.dp_shard == "zero1" and (self.tp > 1 or self.ep > 1):
            raise UserError("parallel.dp_shard = 'zero1' works with model_parallel 1 and expert_parallel 1 only; use 'fsdp'")
        if self.pp > 1:
            if self.schedule not in SCHEDULES:
                raise UserError(f"parallel.pipeline_schedule = {self.schedule!r}: expected one of {', '.join(SCHEDULES)}")
            if self.schedule in V_SCHEDULES and self.v != 2:
                raise UserError(f"pipeline schedule {self.schedule} needs exactly 2 stages per rank, got stages_per_rank {self.v}")
            if self.schedule not in MULTI_STAGE and self.v != 1:
                raise UserError(f"pipeline schedule {self.schedule} runs one stage per rank, got stages_per_rank {self.v}")
            if self.micro_batch_num < self.n_stages:
                raise UserError(f"parallel.micro_batch_num = {self.micro_batch_num} is fewer than the {self.n_stages} pipeline "
                                f"stages ({self.pp} ranks x {self.v} stages each); use micro_batch_num >= {self.n_stages}")
            if self.schedule == "DualPipeV" and self.micro_batch_num < 2 * self.pp:
                raise UserError(f"DualPipeV needs micro_batch_num >= 2 x pipeline_stage = {2 * self.pp}, got {self.micro_batch_num}")
        if self.reduce_every_microbatch:
            if not (self.pp > 1 and self.dp_shard == "fsdp" and self.dp > 1):
                raise UserError("parallel.reduce_grads_every_microbatch = true needs pipeline_stage > 1 with dp_shard 'fsdp' "
                                f"and data_parallel > 1 (got pipeline_stage {self.pp}, dp_shard {self.dp_shard!r}, data_parallel "
                                f"{self.dp}); without a pipeline every backward already reduce-scatters")
            if self.schedule not in FULL_BACKWARD:
                raise UserError(f"parallel.reduce_grads_every_microbatch = true needs a schedule with a full backward "
                                f"({', '.join(FULL_BACKWARD)}); {self.schedule} splits it into input and weight parts")
        if self.dualpipe_overlap:
            from dsv3.parallel.overlap import overlap_blocker

            if blocker := overlap_blocker(self, []):  # recompute is checked when the stages are built
                raise UserError(f"parallel.dualpipe_overlap = true: {blocker}; set it to false or null")
        if model_cfg is not None:
            if model_cfg.n_routed_experts % self.ep:
                raise UserError(f"parallel.expert_parallel = {self.ep} does not divide n_routed_experts = "
                                f"{model_cfg.n_routed_experts}; pick a divisor of the expert count")
            if model_cfg.num_attention_heads % self.tp:
                raise UserError(f"parallel.model_parallel = {self.tp} does not divide num_attention_heads = "
                                f"{model_cfg.num_attention_heads}")
            for name in ("intermediate_size", "moe_intermediate_size", "vocab_size"):
                if getattr(model_cfg, name) % self.tp:
                    raise UserError(f"parallel.model_parallel = {self.tp} does not divide {name} = {getattr(model_cfg, name)}")
            if self.n_stages > 1 and model_cfg.num_hidden_layers < self.n_stages:
                raise UserError(f"{model_cfg.num_hidden_layers} layers cannot fill {self.n_stages} pipeline stages "
                                f"(pipeline_stage {self.pp} x {self.v} stages per rank)")
            if self.pp > 1 and model_cfg.tie_word_embeddings:
                raise UserError("tie_word_embeddings with pipeline_stage > 1 is not supported")
        if seq_len is not None and self.tp > 1 and seq_len % self.tp:
            raise UserError(f"sequence length {seq_len} is not divisible by model_parallel {self.tp} (sequence parallel splits it)")
        if batch_size is not None:
            if batch_size % self.dp:
                raise UserError(f"global batch size {batch_size} is not divisible by data_parallel {self.dp}")
            if (batch_size // self.dp) % self.micro_batch_num:
                raise UserError(f"per-replica batch {batch_size // self.dp} is not divisible by micro_batch_num {self.micro_batch_num}")


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
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
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
