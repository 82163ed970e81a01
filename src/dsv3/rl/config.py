"""Typed configuration of a GRPO run: `dsv3 train --config FILE.yaml` where FILE has a `grpo:` section.

The sections a GRPO run shares with pretraining keep their meaning (`model`, `train`, `optimizer`,
`lr_schedule`, `checkpoint`, `logging`; `dsv3.config.train`); there is no `data`, `eval` or `parallel`
section: prompts are drawn on the fly and the recipe runs in one process. Loading is strict. This
module does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dsv3.config.load import apply_overrides, from_dict, read_yaml
from dsv3.config.layout import ParallelDims
from dsv3.config.schema import ModelConfig
from dsv3.config.train import (CheckpointConfig, LoggingConfig, LRScheduleConfig, OptimizerConfig, ParallelConfig,
                               TrainConfig)
from dsv3.errors import UserError


@dataclass
class GRPOConfig:
    """Rollouts, reward and the policy update (DeepSeekMath's GRPO, one update per batch of rollouts)."""

    task: Literal["addition"] = "addition"
    """The verifiable task: addition ("a+b=" with a, b drawn uniformly from 0..max_operand; reward 1 when the
    completion is exactly the sum's digits then end-of-sequence, else 0)."""
    max_operand: int = 4
    """Largest operand of the addition prompts."""
    prompts_per_step: int = 16
    """Prompts drawn per step."""
    group_size: int = 8
    """Completions sampled per prompt (G); advantages are the rewards standardised within each group."""
    max_new_tokens: int = 4
    """Most tokens per completion (sampled at temperature 1, so the sampler's logprobs are the policy's)."""
    clip_eps: float = 0.2
    """PPO clip of the ratio policy / sampler to [1 - clip_eps, 1 + clip_eps]."""
    kl_coef: float = 0.0
    """beta of the KL penalty to the frozen reference (the policy when GRPO starts; k3 estimator); 0: no reference."""
    warmup_steps: int = 0
    """Supervised steps before GRPO on "a+b=c" with c drawn at random: they teach the answer format, not the sums,
    so the reward starts near chance (counted in train.steps; the reference is the policy after them)."""
    max_num_seqs: int = 128
    """Sequences the rollout engine decodes together."""
    batch_invariant: bool = True
    """The engine's batch-invariant mode and the trainer's exact scoring (`dsv3.infer.exact`,
    `dsv3.train.score`): the sampler's logprobs equal the trainer's bit for bit, the ratio is exactly 1 on
    fresh rollouts. False: the engine's batched kernels and the trainer's plain forward (they differ by rounding)."""
    routing_replay: bool = False
    """Route the trainer's forward through the experts the engine chose for each sampled token (R3,
    `dsv3.train.replay`; `return_routed_experts`) and record per MoE layer the share of those tokens the
    trainer's own router agreed on (metric routing_agreement). Not with batch_invariant yet (the engine's
    expert capture counts one router call per layer and step, the batch-invariant runner makes one per token;
    there the exact scorer routes as the engine did anyway). False: the trainer routes itself."""
    exact_backward: bool = False
    """With batch_invariant: backpropagate through the per-token exact path too (about 4x its scoring cost). False:
    the loss takes the exact scorer's values and the batched forward's gradient (the same function rounded in
    another order; `dsv3.rl.grpo.policy_logprobs`), so a step costs about what the exact scoring does."""


@dataclass
class GRPORunConfig:
    """A whole GRPO run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Policy architecture (its vocabulary must hold the task's symbols and the bos / eos ids)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Steps (warm-up included), seed, device, precision, threads, init_from, bias_update_rate."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW settings."""
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    """Learning-rate schedule over train.steps."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints (the trainer's format: `dsv3 train --resume` continues exactly) and the HF export."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics line interval, plots."""
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    """Rollouts, reward and the update."""

    @property
    def parallel(self) -> ParallelConfig:
        """The trivial parallel section (one process)."""
        return ParallelConfig()

    def layout(self) -> ParallelDims:
        """The trivial layout, no recompute (what `dsv3.train.strategy.build_model` reads)."""
        return ParallelDims.from_config(self.parallel, recompute=self.train.recompute)

    @property
    def output_dir(self) -> Path:
        return Path(self.checkpoint.output_dir)

    def validate(self) -> None:
        g, t, m = self.grpo, self.train, self.model
        for name in ("max_operand", "prompts_per_step", "group_size", "max_new_tokens", "max_num_seqs"):
            if getattr(g, name) < 1:
                raise UserError(f"grpo.{name} must be >= 1, got {getattr(g, name)}")
        if g.group_size < 2:
            raise UserError(f"grpo.group_size must be >= 2 (advantages compare a group's completions), got {g.group_size}")
        if not 0 < g.clip_eps < 1 or g.kl_coef < 0:
            raise UserError(f"grpo.clip_eps must be in (0, 1) and grpo.kl_coef >= 0, got {g.clip_eps} and {g.kl_coef}")
        if not 0 <= g.warmup_steps < t.steps:
            raise UserError(f"grpo.warmup_steps must be in [0, train.steps {t.steps}), got {g.warmup_steps}")
        if g.routing_replay and g.batch_invariant:
            raise UserError("grpo.routing_replay needs grpo.batch_invariant false: the engine's return_routed_experts "
                            "does not capture the batch-invariant runner's per-token router calls yet")
        if t.fp8 or t.recompute != "none" or t.precision != "fp32":
            raise UserError("a GRPO run trains in fp32 without fp8 or recompute (the sampler's weights are the policy's): "
                            f"got train.precision {t.precision!r}, fp8 {t.fp8}, recompute {t.recompute!r}")
        if self.lr_schedule.learning_rate <= 0:
            raise UserError(f"lr_schedule.learning_rate must be > 0, got {self.lr_schedule.learning_rate}")
        if self.checkpoint.keep_last < 1 or self.logging.log_interval < 1:
            raise UserError("checkpoint.keep_last and logging.log_interval must be >= 1")
        from dsv3.rl.task import AdditionTask

        AdditionTask.check_model(m, g)


def is_grpo_yaml(data: dict) -> bool:
    """Whether a parsed run YAML is a GRPO run (it has a `grpo:` section)."""
    return isinstance(data, dict) and "grpo" in data


def load_grpo_config(path: str | Path, overrides: list[str] | None = None) -> GRPORunConfig:
    data = apply_overrides(read_yaml(path), overrides)
    try:
        cfg = from_dict(GRPORunConfig, data, "")
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    cfg.validate()
    return cfg
