"""How one run is laid out over processes: the `Strategy` the trainer applies from outside.

Built from the run's layout (`RunConfig.layout()`, the `parallel` section) and the launcher's
WORLD_SIZE (`dsv3.train.distributed.make_strategy`):
* `LocalStrategy`, one process (no torchrun / `dsv3 launch`): the trivial layout. The whole model on
  this device, the global batch of data_parallel x micro_batch_num micro-batches accumulated here,
  the fused head + cross-entropy, single-file checkpoints (`dsv3.train.checkpoint`);
* `DistributedStrategy` (`dsv3.train.distributed`), WORLD_SIZE > 1: this rank's part of the layout
  (`dsv3.parallel.build`), its slice of every global batch, gradient reductions, global-norm
  clipping, and DCP checkpoints (`step-N/`: any layout, one process included, resumes any other).

The trainer asks the strategy for everything that depends on the layout (the model parts, one
step's forward/backward, evaluation sums, checkpoints, HF export, which rank writes what) through
the `Strategy` methods below, and holds no layout code itself.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from dsv3.config.layout import ParallelDims
from dsv3.config.train import RunConfig
from dsv3.model.mla import set_indexer_stage
from dsv3.train import checkpoint
from dsv3.train.loss import LinearCrossEntropy, attention_mask, compute_loss, masked_ce
from dsv3.train.optim import build_optimizer
from dsv3.train.replay import RoutingReplay, merge_agreement

LOSS_PARTS = ("lm", "mtp", "aux", "indexer")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(cfg: RunConfig, device: torch.device, log: Callable[[str], None] | None = None) -> nn.Module:
    """The whole model of the trivial layout: fp32 master weights read from train.init_from, or
    N(0, initializer_range) from train.seed, built on the meta device, then materialised and
    initialised by `dsv3.parallel.init` (the rule every layout uses, so all start from the same weights)."""
    from dsv3.kernels import apply_fast_paths
    from dsv3.model import Transformer
    from dsv3.parallel.init import materialize
    from dsv3.parallel.recompute import apply_recompute

    seed_everything(cfg.train.seed)
    if cfg.train.init_from:
        from dsv3.train.init_from import load_init_weights

        model = load_init_weights(cfg.model, cfg.train.init_from, device, log)
    else:
        with torch.device("meta"):
            model = Transformer(cfg.model)
        materialize(model, device, cfg.model, cfg.train.seed)
    if cfg.train.fp8:
        enable_fp8(model, log)
    apply_fast_paths(model)
    # the layers the configured pipeline stages would recompute (all of them without recompute_layers)
    layout = cfg.layout()
    apply_recompute(model, layout.recompute, layout.recompute_ids(cfg.model, n_stages=layout.pp))
    return model.train()


def enable_fp8(model: nn.Module, log: Callable[[str], None] | None) -> None:
    from dsv3.train.fp8 import enable_fp8_training

    n = enable_fp8_training(model)
    if log is not None:
        log(f"FP8 training (e4m3, 1x128 / 128x128 scaling): {n} linear layers and routed-expert groups; head, "
            "embedding, router, eh_proj and attention in the run's precision")


def model_step(model: nn.Module, batches: list[dict[str, torch.Tensor]], autocast, mtp_loss_factor: float,
               fused_ce: bool, main_weight: float) -> tuple[torch.Tensor, list[float | None] | None]:
    """Forward and backward of `batches` through one model (each loss / their number, `compute_loss`);
    the mean loss parts (`LOSS_PARTS`) as one fp32 vector, and the per-layer routing agreement of the
    batches that carry `routed_experts` [B,T,L,K] (routed through those experts, `dsv3.train.replay`)."""
    M = len(batches)
    device = next(model.parameters()).device
    sums = torch.zeros(len(LOSS_PARTS), device=device)
    replays: list[RoutingReplay] = []
    for b in batches:
        with RoutingReplay(model, b.get("routed_experts"), b["tokens"]) as replay:
            with autocast():
                loss, p = compute_loss(model, b, mtp_loss_factor, fused_ce, main_weight)
            (loss / M).backward()
        replays.append(replay)
        sums += torch.stack([torch.as_tensor(p[k], dtype=torch.float32, device=device).detach() for k in LOSS_PARTS])
    return sums / M, merge_agreement(replays)


@torch.no_grad()
def model_eval_sums(model: nn.Module, batches: list[dict[str, torch.Tensor]], autocast, fused_ce: bool) -> torch.Tensor:
    """(CE sum, token count) of the main head of one model over `batches`."""
    sums = torch.zeros(2, device=next(model.parameters()).device)
    for b in batches:
        with autocast():
            if fused_ce:
                _, post = model.hidden_states(b["tokens"], b.get("position_ids"), attention_mask(b))
                s = LinearCrossEntropy.apply(post.flatten(0, 1), model.lm_head.weight, b["labels"].flatten(),
                                             b["loss_mask"].flatten())
                sums += torch.stack([s.float(), b["loss_mask"].sum().float()])
            else:
                logits = model(b["tokens"], positions=b.get("position_ids"))
                sums += torch.stack(masked_ce(logits, b["labels"], b["loss_mask"]))
    return sums


class Strategy(ABC):
    """This process's place in the run's layout and every layout-dependent operation of a step: the
    protocol the trainer uses (build, forward_backward, finish_grads, eval_sums, save, restore,
    export_hf), plus the roles and the pieces every layout shares."""

    distributed = False
    world, rank = 1, 0
    dims: ParallelDims

    def __init__(self, cfg: RunConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.parts: list[nn.Module] = []
        # DSA's dense warm-up: only the indexers learn (their KL loss is the whole objective)
        self.indexer_warmup = cfg.model.sparse_attention and cfg.train.indexer_stage == "dense_warmup"
        self.main_loss_weight = 0.0 if self.indexer_warmup else 1.0
        self.routing_agreement: list[float | None] | None = None  # of the last step's replayed micro-batches

    # ---- roles
    @property
    def is_main(self) -> bool:
        """Rank 0 writes the metrics, the resolved config, plots and the HF export."""
        return self.rank == 0

    @property
    def logs(self) -> bool:
        """Rank 0 and the last rank print progress (the seed shows the loss in the last worker's log)."""
        return self.rank in (0, self.world - 1)

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    @property
    def dp_rank(self) -> int:
        return 0

    # ---- the protocol
    @abstractmethod
    def build(self, log: Callable[[str], None]) -> tuple[list[nn.Module], torch.optim.Optimizer]:
        """This rank's model parts and the optimizer over them (`dsv3.train.optim.build_optimizer`)."""

    @abstractmethod
    def forward_backward(self, batches: list[dict[str, torch.Tensor]], autocast) -> dict[str, float]:
        """Forward and backward of this rank's micro-batches (each loss / their number); gradients
        reduced and clipped afterwards by `finish_grads`. Returns the global mean loss parts."""

    @abstractmethod
    def finish_grads(self) -> torch.Tensor:
        """Gradient reductions the backward did not do, then the global gradient norm (the clip itself is
        applied inside the optimizer step: `dsv3.train.optim.step_with_clip`)."""

    @abstractmethod
    def eval_sums(self, batches: list[dict[str, torch.Tensor]], autocast) -> torch.Tensor:
        """(CE sum, token count) of the main head over `batches` (the one-process result on every rank)."""

    @abstractmethod
    def save(self, root: Path, step: int, optimizer, scheduler, loader_state: dict) -> Path:
        """Checkpoint `step-N/` under `root`."""

    @abstractmethod
    def restore(self, path: Path, optimizer, scheduler) -> dict[str, Any]:
        """Fill the parts, optimizer and scheduler from checkpoint `path`; returns the trainer state."""

    @abstractmethod
    def export_hf(self, out: Path, saved: Path | None) -> Path | None:
        """HF safetensors of the final weights; the directory on the main rank."""

    # ---- shared by every layout
    def _optimizer(self, log: Callable[[str], None], zero_group=None) -> torch.optim.Optimizer:
        """DSA's indexer stage on every part, then the optimizer over the trainable parameters."""
        cfg, trainable = self.cfg, None
        if cfg.model.sparse_attention:
            for p in self.parts:
                set_indexer_stage(p, cfg.train.indexer_stage, attach=self.dims.pp > 1)
            if self.indexer_warmup:
                trainable = lambda name: ".indexer." in name  # noqa: E731
                log("DSA dense warm-up: attention dense, only the lightning indexers train (KL to the attention)")
        return build_optimizer(self.parts, cfg.optimizer, cfg.lr_schedule, zero_group=zero_group, trainable=trainable)

    def reduce_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Expert counts summed over every rank that routed other tokens (the bias update's input)."""
        return counts

    def moe_layers(self) -> list[nn.Module]:
        return [m for p in self.parts for m in p.moe_layers()]

    def close(self) -> None:
        """Release what the strategy holds beyond its parts (a process group it created)."""


class LocalStrategy(Strategy):
    """The trivial layout: one process, the whole model, micro-batches accumulated."""

    def __init__(self, cfg: RunConfig, device: torch.device):
        super().__init__(cfg, device)
        self.dims = ParallelDims()
        self.fused_ce = cfg.train.fused_ce

    def build(self, log: Callable[[str], None]) -> tuple[list[nn.Module], torch.optim.Optimizer]:
        self.parts = [build_model(self.cfg, self.device, log)]
        return self.parts, self._optimizer(log)

    def forward_backward(self, batches: list[dict[str, torch.Tensor]], autocast) -> dict[str, float]:
        vec, self.routing_agreement = model_step(self.parts[0], batches, autocast, self.cfg.train.mtp_loss_factor,
                                                 self.fused_ce, self.main_loss_weight)
        return {k: float(v) for k, v in zip(LOSS_PARTS, vec)}

    def finish_grads(self) -> torch.Tensor:
        return torch.nn.utils.get_total_norm([p.grad for p in self.parts[0].parameters() if p.grad is not None])

    def eval_sums(self, batches: list[dict[str, torch.Tensor]], autocast) -> torch.Tensor:
        self.parts[0].eval()
        try:
            return model_eval_sums(self.parts[0], batches, autocast, self.fused_ce)
        finally:
            self.parts[0].train()

    def save(self, root: Path, step: int, optimizer, scheduler, loader_state: dict) -> Path:
        """The single-file format (`dsv3.train.checkpoint`)."""
        return checkpoint.save_checkpoint(root, step, self.parts[0], optimizer, scheduler, loader_state, self.cfg,
                                          self.cfg.checkpoint.keep_last)

    def restore(self, path: Path, optimizer, scheduler) -> dict[str, Any]:
        """The single-file format, or a DCP directory written under any layout."""
        if (path / ".metadata").is_file():
            return checkpoint.load_dcp_checkpoint(path, self.parts, optimizer, scheduler)
        return checkpoint.load_checkpoint(path, self.parts[0], optimizer, scheduler)

    def export_hf(self, out: Path, saved: Path | None) -> Path | None:
        """Straight from the model."""
        from dsv3.checkpoint.save import save_pretrained

        return save_pretrained(self.parts[0], out)
