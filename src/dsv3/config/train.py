"""Typed configuration of a pretraining run (`dsv3 train --config FILE.yaml`).

One YAML file, one section per dataclass: `model` (ModelConfig), `data`, `train`, `optimizer`,
`lr_schedule`, `checkpoint`, `eval`, `logging`, `parallel`. Loading is strict (unknown keys are
errors). MindSpore-style files (the seed's) are translated by `dsv3.config.mindspore` into the same
dict first. This module does not import torch.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from dsv3.config.layout import ParallelDims
from dsv3.config.load import apply_overrides, from_dict, is_mindspore_yaml, read_yaml
from dsv3.config.schema import ModelConfig
from dsv3.errors import UserError


@dataclass
class SFTConfig:
    """Supervised fine-tuning data (`data.type: sft`; see docs/finetune.md and `dsv3.data.sft`)."""

    path: str = ""
    """A tokenised prefix from `dsv3 preprocess --dataset-type qa|chat` (PREFIX_input_ids/_loss_mask .bin/.idx),
    or an Alpaca / chat `.json` / `.jsonl` file encoded at start-up with data.tokenizer."""
    format: Literal["auto", "qa", "chat"] = "auto"
    """Record format of a .json/.jsonl path: qa (instruction/input/output), chat (messages), auto (per record)."""
    valid_path: Optional[str] = None
    """Held-out SFT data (same forms as `path`); None: `valid_fraction` of `path` is held out."""
    valid_fraction: float = 0.05
    """Fraction of `path`'s samples held out for evaluation when valid_path is None (0: no evaluation)."""
    packing: bool = True
    """Pack several samples per sequence (attention and MTP targets confined to each sample, positions
    restarting per sample); False: one sample per sequence, padded."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """Samples longer than seq_length + 1 ids: truncate (dropped if no reply token is left) or drop."""
    shuffle: bool = True
    """Shuffle the sample order (seed data.random_seed) before packing; False keeps the file order."""


@dataclass
class DataConfig:
    """Training data: Megatron-style indexed pretraining data (`dsv3 preprocess` output) or SFT data."""

    type: Literal["pretrain", "sft"] = "pretrain"
    """pretrain: the .bin/.idx token streams of `data_path`; sft: the instruction / chat data of `data.sft`."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """SFT data (used when type is sft)."""
    data_path: list[str] = field(default_factory=list)
    """Dataset prefixes (`PREFIX.bin`/`PREFIX.idx`), Megatron style: ["PREFIX"] or ["W1", "P1", "W2", "P2", ...]."""
    valid_data_path: list[str] = field(default_factory=list)
    """Optional separate validation prefixes (e.g. WikiText's valid file); empty: validation comes from `split`."""
    split: str = "969,30,1"
    """Train/valid/test proportions of `data_path` (Megatron `--split`); ignored for valid when `valid_data_path` is set."""
    seq_length: int = 4096
    """Tokens per training sample (each sample reads seq_length + 1 tokens: inputs and shifted labels)."""
    random_seed: int = 1234
    """Seed of the GPTDataset shuffle (Megatron default 1234)."""
    eod_mask_loss: bool = False
    """Exclude end-of-document tokens from the loss."""
    reset_position_ids: bool = False
    """Restart position ids after every end-of-document token."""
    tokenizer: Optional[str] = None
    """tokenizer.json (or .xz) used for EOD ids and by the quickstart's generation; None: the data's default."""


@dataclass
class TrainConfig:
    """Steps, batch, precision and the DeepSeek-V3 loss/balancing factors."""

    steps: int = 1000
    """Optimizer steps to run in total (a resumed run continues up to this number)."""
    batch_size: int = 1
    """Sequences per micro-batch (MindSpore `runner_config.batch_size`)."""
    seed: int = 0
    """Seed of the weight init and of every RNG the run uses."""
    device: str = "auto"
    """'auto' (cuda when available, else cpu), 'cpu', 'cuda' or 'cuda:N'."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """fp32, or bf16 autocast with fp32 master weights and optimizer states."""
    cpu_bf16: Literal["auto", "autocast"] = "auto"
    """precision bf16 on a CPU without bf16 instructions (no avx512_bf16 / amx_bf16; $DSV3_ISA set): auto computes
    in fp32 there (bf16 autocast runs 5-20x slower; one line says so, `dsv3.train.precision`); autocast keeps it."""
    mtp_loss_factor: float = 0.3
    """lambda of the MTP loss lambda/D * sum_k L_k (V3: 0.3 for the first 10T tokens, then 0.1)."""
    bias_update_rate: float = 0.001
    """gamma of the aux-loss-free bias update b += gamma * sign(mean - count) per optimizer step; 0 disables it."""
    fused_ce: bool = True
    """Fused, chunked head + cross-entropy (never materialises [tokens, vocab] logits); False: plain logits path."""
    fp8: bool = False
    """FP8 training as DeepSeek-V3 describes it (`dsv3.train.fp8`; tensor cores on a Hopper-class GPU, else
    emulated): the linear layers' and routed experts' GEMMs on e4m3 operands (1x128 activation/gradient
    tiles, 128x128 weight blocks), fp32 accumulation and master weights; embedding, head, router and
    attention stay in `precision`. Not with model_parallel > 1."""
    indexer_stage: Literal["sparse", "dense_warmup"] = "sparse"
    """DeepSeek-V3.2 sparse-attention models (model.index_topk > 0), the V3.2 report's two stages:
    dense_warmup: attention stays dense, only the lightning indexer trains (its KL loss to the attention
    distribution is the whole loss; every other weight and the routing bias stay fixed); sparse: top-k
    attention, every weight trains, the indexer (on detached inputs) by its KL loss over the selected keys."""
    threads: Optional[int] = None
    """torch CPU threads; None: the CLI's choice (`dsv3.threads`: the CPUs other work leaves free). --threads and
    $DSV3_NUM_THREADS win over it."""
    cpu_allocator: Literal["cache", "system"] = "cache"
    """CPU runs: cache keeps freed host memory in the process for the next step's tensors (glibc malloc serves
    large blocks from its heap and never trims it; `dsv3.train.host_memory`), system leaves the C library's
    defaults (memory is returned to the OS between steps, and faulted in again)."""
    recompute: Literal["none", "full", "selective"] = "none"
    """Activation recompute of decoder blocks: none; full (a block keeps only its input and runs its forward
    again in backward); selective (as full, but matrix-product and attention outputs are kept). Which blocks:
    all, or the first `parallel.recompute_layers[i]` of each pipeline stage. MindSpore: recompute_config.recompute."""
    init_from: Optional[str] = None
    """Start from these weights (fine-tuning): an HF safetensors directory (FP8 dequantised) or a `dsv3 train`
    checkpoint directory (weights only: fresh optimizer, step 0). Its architecture must equal `model`.
    MindSpore: `load_checkpoint`. None: random init from train.seed."""
    epochs: Optional[int] = None
    """When set, train.steps = epochs x (training sequences // global batch), counted once the data is read
    (MindSpore `runner_config.epochs` of a fine-tuning YAML)."""


@dataclass
class OptimizerConfig:
    """AdamW, as in the V3 report (no weight decay on norms, biases and other 1-D parameters)."""

    type: Literal["AdamW"] = "AdamW"
    """Optimizer (only AdamW)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam beta1, beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay of matrices (embeddings included); 1-D parameters get none."""
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 disables clipping (the norm is still logged)."""
    state_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the AdamW moments exp_avg / exp_avg_sq. bfloat16 (as DeepSeek-V3 trains) halves the
    optimizer's memory (4 instead of 8 bytes per parameter); the update itself is computed in fp32."""


@dataclass
class LRScheduleConfig:
    """Learning rate per optimizer step (linear warmup from 0, then the chosen shape)."""

    type: Literal["ConstantWarmUpLR", "cosine", "wsd"] = "ConstantWarmUpLR"
    """ConstantWarmUpLR (the seed's: warmup then constant), cosine (warmup, cosine to min_lr) or wsd (warmup, stable, linear decay)."""
    learning_rate: float = 2.2e-4
    """Peak learning rate."""
    warmup_steps: Optional[int] = None
    """Warmup steps; None: warmup_ratio x total steps."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of the total steps (used when warmup_steps is None)."""
    min_lr: float = 2.2e-5
    """Final learning rate of cosine / wsd."""
    decay_ratio: float = 0.2
    """wsd: fraction of the total steps spent in the final linear decay."""
    total_steps: Optional[int] = None
    """Steps the schedule spans; None: train.steps."""


@dataclass
class CheckpointConfig:
    """Training checkpoints under `output_dir/checkpoint/step-N` and the final HF export."""

    output_dir: str = "output"
    """Run directory: checkpoints, metrics.jsonl, plots, config.resolved.yaml, hf/."""
    save_steps: int = 0
    """Save every N optimizer steps (0: only at the end)."""
    keep_last: int = 3
    """Checkpoints kept (older ones are deleted after a newer one is complete)."""
    save_at_end: bool = True
    """Also save a checkpoint after the last step."""
    export_hf: bool = True
    """Write the final weights in HF format to `output_dir/hf`."""
    resume: bool = False
    """Continue from the latest checkpoint in `output_dir/checkpoint` (CLI: --resume)."""


@dataclass
class EvalConfig:
    """Validation loss / perplexity on the held-out split."""

    eval_steps: int = 0
    """Evaluate every N optimizer steps (0: never during training)."""
    eval_iters: int = 8
    """Validation micro-batches per evaluation (always the same ones)."""
    eval_at_end: bool = True
    """Evaluate once more after the last step (when validation data exists)."""


@dataclass
class LoggingConfig:
    """What a run reports."""

    log_interval: int = 1
    """Print and record metrics every N optimizer steps."""
    progress_bar: bool = True
    """Show a tqdm progress bar (on a terminal)."""
    tensorboard: bool = False
    """Also write TensorBoard events to `output_dir/tensorboard` (needs the tensorboard package)."""
    plots: bool = True
    """Write PNG plots to `output_dir/plots` at the end."""
    peak_tflops: Optional[float] = None
    """Peak dense TFLOP/s of the device for MFU; None: known GPUs are detected, CPU has no MFU."""


@dataclass
class ParallelConfig:
    """Parallel layout (MindSpore `parallel_config` names), the only description of a layout: `dsv3 train`
    under torchrun / `dsv3 launch` builds its strategy from it (docs/distributed.md). One process runs the
    trivial layout and keeps the global batch by accumulating data_parallel x micro_batch_num micro-batches."""

    data_parallel: int = 1
    """Data-parallel replicas."""
    model_parallel: int = 1
    """Tensor-parallel size."""
    pipeline_stage: int = 1
    """Pipeline stages."""
    expert_parallel: int = 1
    """Expert-parallel size."""
    micro_batch_num: int = 1
    """Micro-batches per optimizer step and data-parallel replica (gradient accumulation)."""
    use_seq_parallel: bool = False
    """Sequence parallelism alongside tensor parallelism (norms and residuals split along the sequence)."""
    dp_shard: Literal["fsdp", "ddp", "zero1"] = "fsdp"
    """How the dense weights are data-parallel: fsdp (FSDP2: weights, gradients and AdamW state sharded over
    data_parallel; MindSpore `parallel.enable_parallel_optimizer: True`), ddp (replicated, gradients all-reduced;
    `enable_parallel_optimizer: False`) or zero1 (replicated weights, AdamW state sharded; model_parallel 1 and
    expert_parallel 1 only)."""
    dp_replicate: int = 1
    """HSDP with dp_shard fsdp: the data_parallel ranks form dp_replicate groups of data_parallel /
    dp_replicate ranks; FSDP shards within a group and replicates across groups (gradients all-reduced
    between them), so intra-node sharding can pair with inter-node replication. 1: FSDP over all of
    data_parallel."""
    pipeline_schedule: Literal["GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble",
                               "ZBVZeroBubble", "DualPipeV"] = "1F1B"
    """torch.distributed.pipelining schedule with pipeline_stage > 1. Interleaved1F1B, LoopedBFS and
    InterleavedZeroBubble run stages_per_rank stages per rank (loop placement); ZBVZeroBubble and DualPipeV
    exactly 2 (V placement); GPipe and 1F1B one."""
    stages_per_rank: int = 0
    """Virtual pipeline stages per rank; 0: 1 for single-stage schedules, 2 for the multi-stage ones."""
    dualpipe_overlap: Optional[bool] = None
    """DualPipeV with expert_parallel > 1: run the paired forward and backward chunks together so one's
    all-to-all overlaps the other's computation (`dsv3.parallel.overlap`; losses bit-identical). None: on
    where the layout allows it (no tensor parallelism, FSDP-sharded experts, DDP or recompute, whose
    collectives would share the chunks); True: required (a layout that does not allow it is an error);
    False: off."""
    reduce_grads_every_microbatch: bool = False
    """With pipeline_stage > 1 and dp_shard fsdp (data_parallel > 1): reduce-scatter every micro-batch's
    gradients as its backward finishes (FSDP2 `set_requires_gradient_sync(True)` on each backward, as
    MindSpore / Megatron reduce under a pipeline), so a rank holds its gradient shards and one FSDP unit's
    unsharded gradient, not the stage's whole unsharded gradients until the step's last backward; the
    reduce-scatter traffic is micro_batch_num times larger. False: torch's schedules (no-sync, one final
    reduce-scatter). Schedules with a full backward only (GPipe, 1F1B, Interleaved1F1B, LoopedBFS)."""
    pp_layer_offset: Optional[list[int]] = None
    """Layers per pipeline stage as MindFormers' `model_config.offset`: one entry per stage, stage i holds
    num_hidden_layers // pipeline_stage + offset[i] layers; the counts add up to num_hidden_layers, or to it
    plus the MTP layers (then counted in the last stage, where they always sit). None: equal stages,
    remainder to the earlier ones."""
    recompute_layers: Optional[list[int]] = None
    """With train.recompute full/selective: how many layers of each pipeline stage (its first ones) are
    recomputed, one entry per stage (MindSpore `recompute_config.recompute` as a list). None: all layers."""

    def __post_init__(self) -> None:
        for name in ("data_parallel", "model_parallel", "pipeline_stage", "expert_parallel", "micro_batch_num", "dp_replicate"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.stages_per_rank < 0:
            raise ValueError(f"stages_per_rank must be >= 0, got {self.stages_per_rank}")


@dataclass
class RunConfig:
    """A whole pretraining run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Model architecture."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training / validation data."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop settings and loss factors."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW settings."""
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    """Learning-rate schedule."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing and export."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Validation."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics and plots."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""

    def layout(self) -> ParallelDims:
        """The run's parallel layout: the `parallel` section with `train.recompute` (validated against a
        world size and the model by `ParallelDims.validate`, where the processes are known)."""
        return ParallelDims.from_config(self.parallel, recompute=self.train.recompute)

    def validate(self) -> None:
        """Cross-section checks that a single process needs (raised as UserError)."""
        t, m = self.train, self.model
        if t.steps < 1:
            raise UserError(f"train.steps must be >= 1, got {t.steps}")
        if t.batch_size < 1:
            raise UserError(f"train.batch_size must be >= 1, got {t.batch_size}")
        if self.data.seq_length < 2:
            raise UserError(f"data.seq_length must be >= 2, got {self.data.seq_length}")
        if self.data.seq_length > m.max_position_embeddings:
            raise UserError(f"data.seq_length {self.data.seq_length} exceeds model.max_position_embeddings {m.max_position_embeddings}")
        if t.bias_update_rate > 0 and m.topk_method != "noaux_tc":
            raise UserError(f"train.bias_update_rate {t.bias_update_rate} needs model.topk_method 'noaux_tc' (the routing bias), got {m.topk_method!r}")
        if t.bias_update_rate < 0 or t.mtp_loss_factor < 0:
            raise UserError("train.bias_update_rate and train.mtp_loss_factor must be >= 0")
        if t.fp8 and max(self.parallel.model_parallel, 1) > 1:
            raise UserError(f"train.fp8 runs without tensor parallelism for now (model_parallel {self.parallel.model_parallel}): "
                            "its weight blocks would be quantised per shard")
        if t.indexer_stage == "dense_warmup" and not m.sparse_attention:
            raise UserError("train.indexer_stage 'dense_warmup' trains a sparse-attention indexer: model.index_topk must be > 0")
        if t.epochs is not None and t.epochs < 1:
            raise UserError(f"train.epochs must be >= 1, got {t.epochs}")
        if self.data.type == "sft":
            if not self.data.sft.path:
                raise UserError("data.sft.path is empty: give an Alpaca/chat .json/.jsonl file or a prefix written by "
                                "`dsv3 preprocess --dataset-type qa|chat`")
            if not 0 <= self.data.sft.valid_fraction < 1:
                raise UserError(f"data.sft.valid_fraction must be in [0, 1), got {self.data.sft.valid_fraction}")
        elif not self.data.data_path:
            raise UserError("data.data_path is empty: give the prefix of the .bin/.idx files written by `dsv3 preprocess`")
        if len(self.data.data_path) > 1 and len(self.data.data_path) % 2:
            raise UserError(f"data.data_path {self.data.data_path}: expected one prefix or weight/prefix pairs")
        s = self.lr_schedule
        if s.learning_rate <= 0 or not 0 <= s.warmup_ratio <= 1 or not 0 <= s.decay_ratio <= 1:
            raise UserError("lr_schedule: learning_rate must be > 0, warmup_ratio and decay_ratio in [0, 1]")
        if self.checkpoint.keep_last < 1:
            raise UserError(f"checkpoint.keep_last must be >= 1, got {self.checkpoint.keep_last}")
        self.layout().recompute_ids(m, n_stages=self.parallel.pipeline_stage)  # a bad offset / recompute list: one line now
        if self.logging.log_interval < 1:
            raise UserError(f"logging.log_interval must be >= 1, got {self.logging.log_interval}")

    def micro_batches_per_step(self, data_parallel_world: int = 1) -> int:
        """Micro-batches each process accumulates per optimizer step.

        The global batch is batch_size x data_parallel x micro_batch_num whatever the process count,
        so a run with fewer data-parallel processes than configured accumulates the difference.
        """
        dp = self.parallel.data_parallel
        if dp % data_parallel_world:
            raise UserError(f"parallel.data_parallel {dp} is not a multiple of the {data_parallel_world} data-parallel processes")
        return self.parallel.micro_batch_num * (dp // data_parallel_world)

    @property
    def output_dir(self) -> Path:
        return Path(self.checkpoint.output_dir)


def run_config_from_dict(data: dict, overrides: list[str] | None = None, source: str = "config",
                         notes: list[str] | None = None) -> RunConfig:
    """RunConfig from our dict (or a MindSpore dict, translated first), with `--set` overrides applied.
    What the MindSpore translation has to say (ignored keys, layouts read as MindFormers reads them)
    goes to `notes` for the caller to print; None: straight to stderr."""
    said: list[str] = []
    if is_mindspore_yaml(data):
        from dsv3.config.mindspore import translate

        data, said = translate(data, source)
    data = apply_overrides(data, overrides)
    if data.pop("_mindformers_layout", False):  # translated (here or by the caller): MindFormers' offset / recompute reading
        from dsv3.config.mindspore import mindformers_layout

        said += mindformers_layout(data, overrides, source)
    if notes is not None:
        notes += said
    else:
        for line in said:
            print(line, file=sys.stderr)
    try:
        cfg = from_dict(RunConfig, data, "")
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
    return cfg


def load_run_config(path: str | Path, overrides: list[str] | None = None, notes: list[str] | None = None) -> RunConfig:
    """Read a run YAML (ours or the seed's MindSpore style; a path or a shipped preset's name) and validate it
    (`notes`: as `run_config_from_dict`'s)."""
    from dsv3.config.presets import resolve_preset

    path = resolve_preset(path)
    cfg = run_config_from_dict(read_yaml(path), overrides, str(path), notes)
    cfg.validate()
    return cfg
