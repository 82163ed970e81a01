"""The training step under a layout of several processes (WORLD_SIZE > 1): `DistributedStrategy`.

This rank's part of the layout (`dsv3.parallel.build`: meta device -> PP stages, EP, TP+SP,
recompute, FSDP/DDP/ZeRO-1 -> materialise its shards -> seeded init or `train.init_from`, whose
slices `InitSource.fill` reads), its slice of every global batch, the pipeline schedule
(`dsv3.train.pipeline`), gradient reductions, global-norm clipping, and DCP checkpoints.
`make_strategy` picks it or the one-process `LocalStrategy` from the launcher's WORLD_SIZE.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from dsv3.config.load import dump_yaml
from dsv3.config.train import RunConfig
from dsv3.errors import UserError
from dsv3.parallel.dims import build_meshes, init_distributed
from dsv3.train import checkpoint
from dsv3.train.strategy import LOSS_PARTS, LocalStrategy, Strategy, enable_fp8, model_eval_sums, model_step, seed_everything


def make_strategy(cfg: RunConfig, device: torch.device) -> Strategy:
    """The strategy of this process: distributed under torchrun / `dsv3 launch` with several workers."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return DistributedStrategy(cfg, device)
    return LocalStrategy(cfg, device)


class DistributedStrategy(Strategy):
    """This rank's part of the run's layout, its collectives and its DCP checkpoints."""

    distributed = True

    def __init__(self, cfg: RunConfig, device: torch.device):
        super().__init__(cfg, device)
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self._owns_group = not dist.is_initialized()
        init_distributed(device.type)
        self.rank = dist.get_rank()
        self.dims = cfg.layout()
        self.dims.validate(self.world, cfg.model, seq_len=cfg.data.seq_length)
        self.meshes = build_meshes(self.dims, device.type, cfg.model)
        self.dm, self.pipeline = None, None
        self.fsdp = self.dims.fsdp
        # FSDP and TP act on module calls, which the fused head + cross-entropy bypasses
        self.fused_ce = cfg.train.fused_ce and not self.fsdp and self.dims.tp == 1

    @property
    def dp_rank(self) -> int:
        return self.meshes.dp_rank

    # ---- build
    def build(self, log: Callable[[str], None]) -> tuple[list[nn.Module], torch.optim.Optimizer]:
        from dsv3.parallel.build import build_parallel_model

        cfg = self.cfg
        seed_everything(cfg.train.seed)
        source = None
        if cfg.train.init_from:  # checked against the model before anything is parallelised or allocated
            from dsv3.train.init_from import InitSource

            source = InitSource(cfg.model, cfg.train.init_from)
        try:
            self.dm = build_parallel_model(cfg.model, self.dims, self.meshes, cfg.train.seed, device=self.device,
                                           fill=source.fill if source is not None else None,
                                           prepare=(lambda m: enable_fp8(m, log)) if cfg.train.fp8 else None)
            if source is not None:
                read = source.bytes_read
                log(source.describe() + ("" if read is None else f"; {read:,} bytes read (this rank's slices)"))
        finally:
            if source is not None:
                source.close()
        self.parts = self.dm.parts
        if self.dims.pp > 1:
            from dsv3.train.pipeline import PipelineRunner

            self.pipeline = PipelineRunner(self.dm, cfg.train.mtp_loss_factor, self.main_loss_weight)
        zero = self.meshes.dense.get_group("dp") if self.dims.dp_shard == "zero1" and self.dims.dp > 1 else None
        return self.parts, self._optimizer(log, zero_group=zero)

    # ---- one step
    def forward_backward(self, batches: list[dict[str, torch.Tensor]], autocast) -> dict[str, float]:
        if self.pipeline is not None:
            if any("routed_experts" in b for b in batches):
                raise UserError("batch routed_experts: routing replay is not supported under pipeline parallelism")
            vec = self.pipeline.step(batches, autocast)
        else:
            vec, self.routing_agreement = model_step(self.parts[0], batches, autocast, self.cfg.train.mtp_loss_factor,
                                                     self.fused_ce, self.main_loss_weight)
        if self.dims.dp > 1:  # replica means -> global mean
            dist.all_reduce(vec, group=self.meshes.dense.get_group("dp"))
            vec /= self.dims.dp
        return {k: float(v) for k, v in zip(LOSS_PARTS, vec)}

    def finish_grads(self) -> torch.Tensor:
        """Gradient reductions FSDP does not do, then the global gradient norm."""
        from dsv3.parallel.api import grad_norm

        self.dm.finalize_grads()
        return grad_norm(self.dm)

    def reduce_counts(self, counts: torch.Tensor) -> torch.Tensor:
        if self.dims.dp * self.dims.tp > 1:
            dist.all_reduce(counts, group=self.meshes.tokens_group)
        return counts

    @torch.no_grad()
    def eval_sums(self, batches: list[dict[str, torch.Tensor]], autocast) -> torch.Tensor:
        """Every rank evaluates the same batches, so the collectives line up and the result is the
        one-process one."""
        for p in self.parts:
            p.eval()
        try:
            if self.pipeline is not None:
                return self.pipeline.eval_sums(batches, autocast)
            return model_eval_sums(self.parts[0], batches, autocast, self.fused_ce)
        finally:
            for p in self.parts:
                p.train()

    # ---- checkpoints
    def save(self, root: Path, step: int, optimizer, scheduler, loader_state: dict) -> Path:
        """A DCP directory (model + optimizer by parameter name, trainer_state.pt and the manifest
        from rank 0), `step-N/` under `root`."""
        from dsv3.parallel import dcp as pdcp

        cfg = self.cfg
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
        """A DCP directory written under any layout."""
        if not (path / ".metadata").is_file():
            raise UserError(f"checkpoint {path} was written by a one-process run (no DCP .metadata): resume it in one "
                            f"process, or start this layout from its weights with train.init_from {path}")
        return checkpoint.load_dcp_checkpoint(path, self.parts, optimizer, scheduler)

    def export_hf(self, out: Path, saved: Path | None) -> Path | None:
        """From the final DCP checkpoint `saved`, on rank 0."""
        from dsv3.parallel import dcp as pdcp

        hf = pdcp.export_hf(saved, self.cfg.model, out) if self.is_main else None
        dist.barrier()
        return hf

    def close(self) -> None:
        """Destroy the process group this strategy created (one created by the caller stays)."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
