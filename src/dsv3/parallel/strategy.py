"""How one run is laid out over processes: the `Strategy` the trainer applies from outside.

Built from `cfg.parallel` (the only description of a layout) and the launcher's WORLD_SIZE:
* one process (no torchrun / `dsv3 launch`): the trivial layout. The whole model on this device, the
  global batch of data_parallel x micro_batch_num micro-batches accumulated here, the fused
  head + cross-entropy, single-file checkpoints (`dsv3.train.checkpoint`);
* WORLD_SIZE > 1: this rank's part of the layout (`dsv3.parallel.build`: meta device -> PP stages,
  EP, TP+SP, recompute, FSDP/DDP/ZeRO-1 -> materialise its shards -> seeded init or `train.init_from`),
  its slice of every global batch, gradient reductions, global-norm clipping, and DCP checkpoints
  (`step-N/`: any layout, one process included, resumes any other).

The trainer asks the strategy for everything that depends on the layout (the model parts, one
step's forward/backward, evaluation sums, checkpoints, HF export, which rank writes what) and
holds no layout code itself.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dsv3.config.load import dump_yaml
from dsv3.config.train import RunConfig
from dsv3.errors import UserError
from dsv3.model.mla import set_indexer_stage
from dsv3.parallel.dims import ParallelDims, build_meshes, init_distributed
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
    from dsv3.parallel.layout import recompute_layer_ids, stage_layers
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
        _enable_fp8(model, log)
    apply_fast_paths(model)
    # the layers the configured pipeline stages would recompute (all of them without recompute_layers)
    per_stage = stage_layers(cfg.model, cfg.parallel.pipeline_stage, cfg.parallel.pp_layer_offset)
    apply_recompute(model, cfg.train.recompute,
                    recompute_layer_ids(cfg.model, cfg.train.recompute, per_stage, cfg.parallel.recompute_layers))
    return model.train()


def _enable_fp8(model: nn.Module, log: Callable[[str], None] | None) -> None:
    from dsv3.train.fp8 import enable_fp8_training

    n = enable_fp8_training(model)
    if log is not None:
        log(f"FP8 training (e4m3, 1x128 / 128x128 scaling): {n} linear layers and routed-expert groups; head, "
            "embedding, router, eh_proj and attention in the run's precision")


class Strategy:
    """This process's place in the run's layout and every layout-dependent operation of a step."""

    def __init__(self, cfg: RunConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self._owns_group = False
        self.rank, self.meshes, self.dm, self.pipeline = 0, None, None, None
        if self.world > 1:
            self._owns_group = not dist.is_initialized()
            init_distributed(device.type)
            self.rank = dist.get_rank()
            self.dims = ParallelDims.from_config(cfg.parallel)
            self.dims.validate(self.world, cfg.model, seq_len=cfg.data.seq_length)
            self.meshes = build_meshes(self.dims, device.type, cfg.model)
        else:
            self.dims = ParallelDims()  # the trivial layout
        self.fsdp = self.dims.dp_shard == "fsdp" and self.dims.dp > 1
        # FSDP and TP act on module calls, which the fused head + cross-entropy bypasses
        self.fused_ce = cfg.train.fused_ce and not self.fsdp and self.dims.tp == 1
        # DSA's dense warm-up: only the indexers learn (their KL loss is the whole objective)
        self.indexer_warmup = cfg.model.sparse_attention and cfg.train.indexer_stage == "dense_warmup"
        self.main_loss_weight = 0.0 if self.indexer_warmup else 1.0
        self.routing_agreement: list[float | None] | None = None  # of the last step's replayed micro-batches

    # ---- roles
    @property
    def distributed(self) -> bool:
        return self.world > 1

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
        return self.meshes.dp_rank if self.meshes is not None else 0

    # ---- build
    def build(self, log: Callable[[str], None]) -> tuple[list[nn.Module], torch.optim.Optimizer]:
        """This rank's model parts and the optimizer over them (`dsv3.train.optim.build_optimizer`)."""
        cfg = self.cfg
        if not self.distributed:
            parts = [build_model(cfg, self.device, log)]
        else:
            from dsv3.parallel.build import build_parallel_model

            seed_everything(cfg.train.seed)
            kw = {"init_from": cfg.train.init_from} if cfg.train.init_from else {}
            self.dm = build_parallel_model(cfg.model, self.dims, self.meshes, cfg.train.seed,
                                           offset=cfg.parallel.pp_layer_offset, recompute=cfg.train.recompute,
                                           recompute_layers=cfg.parallel.recompute_layers, device=self.device, log=log,
                                           prepare=(lambda m: _enable_fp8(m, log)) if cfg.train.fp8 else None, **kw)
            parts = self.dm.parts
            if self.dims.pp > 1:
                from dsv3.parallel.pipeline import PipelineRunner

                self.pipeline = PipelineRunner(self.dm, cfg.train.mtp_loss_factor, self.main_loss_weight)
        zero = self.meshes.dense.get_group("dp") if self.dims.dp_shard == "zero1" and self.dims.dp > 1 else None
        self.parts = parts
        trainable = None
        if cfg.model.sparse_attention:
            for p in parts:
                set_indexer_stage(p, cfg.train.indexer_stage, attach=self.dims.pp > 1)
            if self.indexer_warmup:
                trainable = lambda name: ".indexer." in name  # noqa: E731
                log("DSA dense warm-up: attention dense, only the lightning indexers train (KL to the attention)")
        return parts, build_optimizer(parts, cfg.optimizer, cfg.lr_schedule, zero_group=zero, trainable=trainable)

    # ---- one step
    def forward_backward(self, batches: list[dict[str, torch.Tensor]], autocast) -> dict[str, float]:
        """Forward and backward of this rank's micro-batches (each loss / their number); gradients
        reduced and clipped afterwards by `finish_grads`. Returns the global mean loss parts.
        A batch's `routed_experts` [B,T,L,K] routes its forward and backward (`dsv3.train.replay`);
        `routing_agreement` then holds the step's per-layer agreement."""
        M = len(batches)
        replays: list[RoutingReplay] = []
        if self.pipeline is not None:
            if any("routed_experts" in b for b in batches):
                raise UserError("batch routed_experts: routing replay is not supported under pipeline parallelism")
            vec = self.pipeline.step(batches, autocast)
        else:
            model, sums = self.parts[0], torch.zeros(len(LOSS_PARTS), device=self.device)
            for b in batches:
                with RoutingReplay(model, b.get("routed_experts"), b["tokens"]) as replay:
                    with autocast():
                        loss, p = compute_loss(model, b, self.cfg.train.mtp_loss_factor, self.fused_ce, self.main_loss_weight)
                    (loss / M).backward()
                replays.append(replay)
                sums += torch.stack([torch.as_tensor(p[k], dtype=torch.float32, device=self.device).detach() for k in LOSS_PARTS])
            vec = sums / M
        self.routing_agreement = merge_agreement(replays)
        if self.dims.dp > 1:  # replica means -> global mean
            dist.all_reduce(vec, group=self.meshes.dense.get_group("dp"))
            vec /= self.dims.dp
        return {k: float(v) for k, v in zip(LOSS_PARTS, vec)}

    def finish_grads(self) -> torch.Tensor:
        """Gradient reductions FSDP does not do, then the global gradient norm (the clip itself is
        applied inside the optimizer step: `dsv3.train.optim.step_with_clip`)."""
        if not self.distributed:
            return torch.nn.utils.get_total_norm([p.grad for p in self.parts[0].parameters() if p.grad is not None])
        from dsv3.parallel.api import grad_norm

        self.dm.finalize_grads()
        return grad_norm(self.dm)

    def reduce_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Expert counts summed over every rank that routed other tokens (the bias update's input)."""
        if self.distributed and self.dims.dp * self.dims.tp > 1:
            dist.all_reduce(counts, group=self.meshes.tokens_group)
        return counts

    def moe_layers(self) -> list[nn.Module]:
        return [m for p in self.parts for m in p.moe_layers()]

    @torch.no_grad()
    def eval_sums(self, batches: list[dict[str, torch.Tensor]], autocast) -> torch.Tensor:
        """(CE sum, token count) of the main head over `batches`; every rank evaluates the same
        batches, so the collectives line up and the result is the one-process one."""
        for p in self.parts:
            p.eval()
        try:
            if self.pipeline is not None:
                return self.pipeline.eval_sums(batches, autocast)
            model, sums = self.parts[0], torch.zeros(2, device=self.device)
            for b in batches:
                with autocast():
                    if self.fused_ce:
                        _, post = model.hidden_states(b["tokens"], b.get("position_ids"), attention_mask(b))
                        s = LinearCrossEntropy.apply(post.flatten(0, 1), model.lm_head.weight, b["labels"].flatten(),
                                                     b["loss_mask"].flatten())
                        sums += torch.stack([s.float(), b["loss_mask"].sum().float()])
                    else:
                        logits = model(b["tokens"], positions=b.get("position_ids"))
                        sums += torch.stack(masked_ce(logits, b["labels"], b["loss_mask"]))
            return sums
        finally:
            for p in self.parts:
                p.train()

    # ---- checkpoints
    def save(self, root: Path, step: int, optimizer, scheduler, loader_state: dict) -> Path:
        """`step-N/` under `root`: the single-file format in one process, a DCP directory (model +
        optimizer by parameter name, trainer_state.pt and the manifest from rank 0) otherwise."""
        cfg = self.cfg
        if not self.distributed:
            return checkpoint.save_checkpoint(root, step, self.parts[0], optimizer, scheduler, loader_state, cfg,
                                              cfg.checkpoint.keep_last)
        from dsv3.parallel import dcp as pdcp

        final, tmp = root / f"step-{step}", root / f".tmp-step-{step}-dcp"
        if self.is_main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        pdcp.save(tmp, self.parts, optimizer)
        if self.is_main:
            torch.save({"step": step, "scheduler": scheduler.state_dict(), "loader": loader_state, "rng": checkpoint.rng_state()},
                       tmp / "trainer_state.pt")
            dump_yaml(cfg, tmp / "config.resolved.yaml")
            checkpoint.write_manifest(tmp, step)  # `--resume` verifies every file against it
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            checkpoint.prune(root, cfg.checkpoint.keep_last, step)
        dist.barrier()
        return final

    def restore(self, path: Path, optimizer, scheduler) -> dict[str, Any]:
        """Fill the parts, optimizer and scheduler from checkpoint `path` (a DCP directory written under
        any layout, or in one process the single-file format); returns the trainer state (step, loader, rng)."""
        if not (path / ".metadata").is_file():
            if self.distributed:
                raise UserError(f"checkpoint {path} was written by a one-process run (no DCP .metadata): resume it in one "
                                f"process, or start this layout from its weights with train.init_from {path}")
            return checkpoint.load_checkpoint(path, self.parts[0], optimizer, scheduler)
        from dsv3.parallel import dcp as pdcp

        pdcp.load(path, self.parts, optimizer)
        state = torch.load(path / "trainer_state.pt", weights_only=True)
        scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr  # the DCP optimizer state holds the moments only, not the groups' current lr
        return state

    def export_hf(self, out: Path, saved: Path | None) -> Path | None:
        """HF safetensors of the final weights: straight from the model in one process; from the
        final DCP checkpoint `saved` on rank 0 otherwise. Returns the directory on the main rank."""
        if not self.distributed:
            from dsv3.checkpoint.save import save_pretrained

            return save_pretrained(self.parts[0], out)
        from dsv3.parallel import dcp as pdcp

        hf = pdcp.export_hf(saved, self.cfg.model, out) if self.is_main else None
        dist.barrier()
        return hf

    def close(self) -> None:
        """Destroy the process group this strategy created (one created by the caller stays)."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
