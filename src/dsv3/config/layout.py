"""The one parallel layout type, without torch: `ParallelDims`, built once from a run's config
(`RunConfig.layout()`: the `parallel` section, its stage offsets and recompute counts, and
`train.recompute`), with its validation; which decoder layers each pipeline stage holds
(`parallel.pp_layer_offset`, MindSpore `model_config.offset`) and which layers are recomputed
(`train.recompute`, `parallel.recompute_layers`, MindSpore `recompute_config.recompute`); and the
model sizes a split must divide (`indivisible`, training's and inference's size checks).

Rank layout (tensor parallel fastest, as in Megatron and torchtitan):
    rank = (p · dp + d) · tp + t          p pipeline stage, d data-parallel rank, t tensor-parallel rank

Expert parallelism "borrows" data- and tensor-parallel ranks (torchtitan, MindSpore): ep must
divide dp·tp; it does not multiply the world size. With the seed's dp2 mp2 pp2 ep2 on 8 devices,
the ep group is the tp group and edp is the dp group. The device meshes over these ranks are
`dsv3.parallel.dims`'.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from dsv3.errors import UserError

MODES = ("none", "full", "selective")


def split_layers(n_layers: int, n_stages: int) -> list[list[int]]:
    """Contiguous decoder-layer ids per stage, remainder to the earlier stages."""
    base, rem = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        n = base + (1 if s < rem else 0)
        out.append(list(range(start, start + n)))
        start += n
    return out


def stage_layers(model_cfg, n_stages: int, offset: list[int] | None = None) -> list[list[int]]:
    """Decoder-layer ids of every pipeline stage (the MTP layers always sit at the end of the last stage).

    Without `offset`: contiguous, remainder to the earlier stages. With `offset` (MindFormers'
    `model_config.offset`, one entry per stage; its `set_layer_stage_recompute` rule): stage i holds
    num_hidden_layers // n_stages + offset[i] layers. The counts add up either to num_hidden_layers
    or to num_hidden_layers + the MTP layers, the last stage's count then including them. The 671B
    YAML: 61 // 16 = 3, offset [1 x 15, -1] -> [4 x 15, 2] = 62 = 61 + 1 MTP: stages 0-14 hold 4
    decoder layers each (60), stage 15 holds layer 60 and the MTP layer. A 4-layer model with
    offset [1, -1] on 2 stages: [3, 1].
    """
    n_layers = model_cfg.num_hidden_layers
    if offset is None:
        return split_layers(n_layers, n_stages)
    mtp = model_cfg.num_nextn_predict_layers
    if len(offset) != n_stages:
        raise UserError(f"parallel.pp_layer_offset (MindSpore model_config.offset) has {len(offset)} entries for "
                        f"{n_stages} pipeline stages; give one per stage")
    base = n_layers // n_stages
    counts = [base + o for o in offset]
    if sum(counts) == n_layers + mtp and mtp:
        counts[-1] -= mtp  # the last stage's share counted its MTP layers
    elif sum(counts) != n_layers:
        want = f"{n_layers}" + (f" or {n_layers + mtp} (with the {mtp} MTP layer{'s' * (mtp > 1)})" if mtp else "")
        raise UserError(f"parallel.pp_layer_offset {list(offset)}: stages get {base} + offset = {counts} layers, "
                        f"{sum(counts)} in all; the model's {n_layers} layers need a total of {want}")
    for i, c in enumerate(counts):
        if c < 1:
            raise UserError(f"parallel.pp_layer_offset {list(offset)} leaves pipeline stage {i} without a decoder layer")
    out, start = [], 0
    for c in counts:
        out.append(list(range(start, start + c)))
        start += c
    return out


def recompute_layer_ids(model_cfg, mode: str, per_stage: list[list[int]], counts: list[int] | None) -> set[int]:
    """Layer ids (decoder layers 0..L-1, MTP blocks L..L+D-1) to recompute, given each stage's decoder
    layers `per_stage` (MTP blocks belong to the last stage) and the optional per-stage counts."""
    if mode not in MODES:
        raise UserError(f"train.recompute = {mode!r}: expected one of {', '.join(MODES)}")
    L, D = model_cfg.num_hidden_layers, model_cfg.num_nextn_predict_layers
    if mode == "none":
        if counts is not None and any(counts):
            raise UserError(f"parallel.recompute_layers {counts} is set but train.recompute is 'none'; set train.recompute: full or selective")
        return set()
    stages = [list(ids) for ids in per_stage]
    stages[-1] += list(range(L, L + D))
    if counts is None:
        return {i for ids in stages for i in ids}
    if len(counts) != len(stages):
        raise UserError(f"parallel.recompute_layers (MindSpore recompute_config.recompute) has {len(counts)} entries for "
                        f"{len(stages)} pipeline stages; give one per stage")
    out: set[int] = set()
    for s, (c, ids) in enumerate(zip(counts, stages)):
        if not 0 <= c <= len(ids):
            raise UserError(f"parallel.recompute_layers[{s}] = {c}: pipeline stage {s} holds {len(ids)} layers "
                            f"(decoder{' + MTP' if s == len(stages) - 1 and D else ''}); use 0..{len(ids)}")
        out.update(ids[:c])
    return out


SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")
MULTI_STAGE = ("Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")
V_SCHEDULES = ("ZBVZeroBubble", "DualPipeV")
FULL_BACKWARD = ("GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS")
"""Schedules whose backward is one action per micro-batch (the others split input and weight gradients)."""


KEYS = {"dp": "data_parallel", "tp": "model_parallel", "pp": "pipeline_stage", "ep": "expert_parallel",
        "micro_batch_num": "micro_batch_num", "seq_parallel": "use_seq_parallel", "dp_shard": "dp_shard",
        "dp_replicate": "dp_replicate", "schedule": "pipeline_schedule", "stages_per_rank": "stages_per_rank",
        "dualpipe_overlap": "dualpipe_overlap", "reduce_every_microbatch": "reduce_grads_every_microbatch", "offset": "pp_layer_offset", "recompute_layers": "recompute_layers"}
"""`ParallelDims` field -> `parallel` section key (the seed's `parallel_config` names, plus ours)."""


@dataclass
class ParallelDims:
    """The parallel layout of one run: the `parallel` section (`dsv3.config.train.ParallelConfig`, where
    each key is documented; `KEYS` maps our short names to its, the seed's `parallel_config` names) with
    `train.recompute`. Defaults are the trivial one-process layout."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    micro_batch_num: int = 1
    seq_parallel: bool = True
    dp_shard: str = "fsdp"
    dp_replicate: int = 1
    schedule: str = "1F1B"
    stages_per_rank: int = 0
    dualpipe_overlap: bool | None = None
    reduce_every_microbatch: bool = False
    """reduce_grads_every_microbatch: FSDP reduce-scatters every micro-batch's gradients under PP."""
    offset: list[int] | None = None
    recompute: str = "none"
    recompute_layers: list[int] | None = None

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
        return self.fsdp and self.edp > 1

    @property
    def fsdp(self) -> bool:
        """Dense weights FSDP-sharded over dp (dp_shard fsdp with more than one data-parallel rank)."""
        return self.dp_shard == "fsdp" and self.dp > 1

    @property
    def fsdp_no_sync(self) -> bool:
        """FSDP under a pipeline keeping gradients unsharded until the step's final reduce-scatter."""
        return self.fsdp and self.pp > 1 and not self.reduce_every_microbatch

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

    def stage_layers(self, model_cfg, n_stages: int | None = None) -> list[list[int]]:
        """Decoder-layer ids of each of the `n_stages` (default: this layout's) pipeline stages."""
        return stage_layers(model_cfg, self.n_stages if n_stages is None else n_stages, self.offset)

    def recompute_ids(self, model_cfg, n_stages: int | None = None) -> set[int]:
        """Layer ids to recompute (decoder layers 0..L-1, MTP blocks L..) over `n_stages` stages."""
        return recompute_layer_ids(model_cfg, self.recompute, self.stage_layers(model_cfg, n_stages), self.recompute_layers)

    def overlap_blocker(self) -> str | None:
        """Why this layout's degrees rule out DualPipeV's compute / all-to-all overlap, or None (the
        built stages add one more reason, recompute: `dsv3.parallel.overlap.overlap_blocker`)."""
        if self.schedule != "DualPipeV" or self.ep == 1:
            return "only DualPipeV with expert_parallel > 1 has all-to-alls to overlap"
        if self.tp > 1:
            return "tensor parallelism runs its own collectives inside the chunks (model_parallel > 1)"
        if self.shard_experts:
            return "FSDP-sharded experts all-gather inside the chunks (expert data parallel > 1 with dp_shard fsdp)"
        if self.dp > 1 and self.dp_shard == "ddp":
            return "DDP reduces gradients inside the last backward (dp_shard ddp)"
        return None

    @classmethod
    def from_config(cls, cfg, recompute: str = "none") -> "ParallelDims":
        """From any object with the seed's parallel_config attribute names (missing ones keep defaults)
        and the run's `train.recompute` mode (`RunConfig.layout()` passes it)."""
        get = (lambda key: cfg[key]) if isinstance(cfg, dict) else (lambda key: getattr(cfg, key))
        cast = {f.name: {"int": int, "bool": bool, "str": str}.get(f.type, lambda v: v) for f in fields(cls)}
        given = {f: cast[f](get(key)) for f, key in KEYS.items() if (key in cfg if isinstance(cfg, dict) else hasattr(cfg, key))}
        return cls(**given, recompute=recompute)

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
            if not (self.pp > 1 and self.fsdp):
                raise UserError("parallel.reduce_grads_every_microbatch = true needs pipeline_stage > 1 with dp_shard 'fsdp' "
                                f"and data_parallel > 1 (got pipeline_stage {self.pp}, dp_shard {self.dp_shard!r}, data_parallel "
                                f"{self.dp}); without a pipeline every backward already reduce-scatters")
            if self.schedule not in FULL_BACKWARD:
                raise UserError(f"parallel.reduce_grads_every_microbatch = true needs a schedule with a full backward "
                                f"({', '.join(FULL_BACKWARD)}); {self.schedule} splits it into input and weight parts")
        if self.dualpipe_overlap:
            if blocker := self.overlap_blocker():  # recompute is checked when the stages are built
                raise UserError(f"parallel.dualpipe_overlap = true: {blocker}; set it to false or null")
        if model_cfg is not None:
            tp = {name: ("model_parallel", self.tp) for name in ("num_attention_heads", "intermediate_size", "moe_intermediate_size", "vocab_size")}
            if bad := indivisible(model_cfg, {"n_routed_experts": ("expert_parallel", self.ep), **tp}):
                (key, parts), name, value = bad
                hint = "; pick a divisor of the expert count" if name == "n_routed_experts" else ""
                raise UserError(f"parallel.{key} = {parts} does not divide {name} = {value}{hint}")
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


SPLIT_SIZES = {"num_attention_heads": lambda c: c.num_attention_heads, "intermediate_size": lambda c: c.intermediate_size,
               "moe_intermediate_size": lambda c: c.moe_intermediate_size, "vocab_size": lambda c: c.vocab_size,
               "n_routed_experts": lambda c: c.n_routed_experts,
               "shared_width": lambda c: c.moe_intermediate_size * c.n_shared_experts}
"""The model sizes a parallel layout splits (`shared_width`: the shared experts' summed width)."""


def indivisible(model_cfg, splits: dict[str, tuple]) -> tuple[tuple, str, int] | None:
    """The first split a model size does not allow: `splits` maps a `SPLIT_SIZES` name to (label, parts);
    returns ((label, parts), name, size) for the first size `parts` > 1 does not divide, else None.
    Training (`ParallelDims.validate`) and inference (`dsv3.infer.parallel.ParallelContext.validate`)
    check their sizes through it and word the error in their own flags."""
    for name, (label, parts) in splits.items():
        size = SPLIT_SIZES[name](model_cfg)
        if parts > 1 and size % parts:
            return (label, parts), name, size
    return None
