"""`dsv3 train` under torchrun / `dsv3 launch`: the single-process `Trainer` with the model, data,
optimizer step and checkpoints made distributed.

What changes against `dsv3.train.trainer.Trainer` (everything else, the loop, logging, LR schedule,
loss maths and balancing, is the parent's):
* each rank builds only its part of the model (`dsv3.parallel.build`: meta device, parallelize by
  `parallel`, materialise its shards, seeded init equal to one process's);
* each data-parallel rank reads its own slice of every global batch (the loader's dp slicing);
* one step: micro-batches through the model (or the pipeline schedule), then gradient
  all-reduces, global-norm clipping, AdamW, and the bias update on counts summed over every rank
  that routed different tokens;
* checkpoints are DCP directories (`step-N/`, any layout can resume any other), metrics and plots
  are written by rank 0; losses are reduced so every rank logs the global loss.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dsv3.config.load import dump_yaml
from dsv3.config.train import RunConfig
from dsv3.errors import UserError
from dsv3.parallel import dcp as pdcp
from dsv3.parallel.api import clip_grad_norm_
from dsv3.parallel.build import build_parallel_model
from dsv3.parallel.dims import ParallelDims, build_meshes, init_distributed
from dsv3.train import checkpoint
from dsv3.train.loss import compute_loss, masked_ce, mean_ce, mtp_loss
from dsv3.train.lr_schedule import build_scheduler
from dsv3.train.optim import param_groups
from dsv3.train.trainer import Trainer, resolve_device, seed_everything


class DistributedTrainer(Trainer):
    """`Trainer` over this rank's part of a parallel layout (see the module docstring)."""

    def __init__(self, cfg: RunConfig, quiet: bool = False):
        device = resolve_device(cfg.train.device)
        init_distributed(device.type)
        self.rank, world = dist.get_rank(), dist.get_world_size()
        dims = ParallelDims.from_config(cfg.parallel)
        dims.validate(world, cfg.model, seq_len=cfg.data.seq_length)
        self.dims, self.meshes = dims, build_meshes(dims, device.type, cfg.model)
        # rank 0 and the last rank log (the seed shows the loss in the last worker's log); all log the global loss
        # the loader hands this rank its slice of every global batch
        super().__init__(cfg, data_parallel_world=dims.dp, data_parallel_rank=self.meshes.dp_rank,
                         reduce_counts=self._reduce_counts, quiet=quiet or self.rank not in (0, world - 1))
        self.tokens_per_step *= dims.dp  # the parent counts one replica's tokens
        self._pp_parts: dict[str, list[torch.Tensor]] = {"lm": [], "mtp": []}
        if self._dist_resume is not None:
            self._restore(self._dist_resume)
            self.log(f"resumed from {self._dist_resume} (step {self.step})")
            self.saved_step = self.step
        if self.rank != 0:  # metrics, plots and the resolved config come from rank 0 only
            self.run_dir = Path(tempfile.mkdtemp(prefix=f"dsv3-rank{self.rank}-"))
            cfg.logging.plots = False

    # ---- setup hooks
    def build_model_and_optimizer(self) -> None:
        """This rank's shards only: meta device -> parallelize -> materialise -> init (`parallel.build`)."""
        cfg = self.cfg
        seed_everything(cfg.train.seed)
        self.dm = build_parallel_model(cfg.model, self.dims, self.meshes, cfg.train.seed, mtp_lambda=cfg.train.mtp_loss_factor,
                                       offset=cfg.parallel.pp_layer_offset, recompute=cfg.train.recompute,
                                       recompute_layers=cfg.parallel.recompute_layers, device=self.device,
                                       init_from=cfg.train.init_from, log=self.log)
        self.parts = self.dm.parts
        self.model = self.parts[0] if self.dims.pp == 1 else None  # under PP there is no whole model on any rank
        opt = cfg.optimizer
        self.optimizer = torch.optim.AdamW(param_groups(nn.ModuleList(self.parts), opt.weight_decay), lr=cfg.lr_schedule.learning_rate,
                                           betas=tuple(opt.betas), eps=opt.eps, foreach=False)
        self.scheduler = build_scheduler(self.optimizer, cfg.lr_schedule, cfg.train.steps)
        self.moe_layers = [m for p in self.parts for m in p.moe_layers()]

    def _resume_path(self) -> Path | None:
        self._dist_resume = super()._resume_path()  # same checks; loaded after parallelize, with DCP
        return None

    def _reduce_counts(self, counts: torch.Tensor) -> torch.Tensor:
        if self.dims.dp * self.dims.tp > 1:
            dist.all_reduce(counts, group=self.meshes.tokens_group)
        return counts

    # ---- one step
    def _pp_loss(self, out, target: torch.Tensor) -> torch.Tensor:
        """Last pipeline stage: out (logits, *mtp_logits), target [b, 2, T] = (labels, loss_mask)."""
        logits, mtp_logits = (out[0], list(out[1:])) if isinstance(out, tuple) else (out, [])
        labels, mask = target[:, 0], target[:, 1]
        lm = mean_ce(logits, labels, mask)
        mtp, _ = mtp_loss(mtp_logits, labels, mask, self.cfg.train.mtp_loss_factor) if mtp_logits else (torch.zeros(()), [])
        self._pp_parts["lm"].append(lm.detach())
        self._pp_parts["mtp"].append(mtp.detach())
        return lm + mtp

    def train_step(self) -> dict[str, Any]:
        cfg, dims, meshes = self.cfg, self.dims, self.meshes
        batches = [self._to_device(self._next_batch()) for _ in range(self.micro_batches)]
        dev = self.device
        if dims.pp > 1:
            tokens = torch.cat([b["tokens"] for b in batches])
            target = torch.stack([torch.cat([b["labels"] for b in batches]), torch.cat([b["loss_mask"] for b in batches]).long()], 1)
            self._pp_parts = {"lm": [], "mtp": []}
            for m in self.moe_layers:
                m.aux_accum = 0.0  # balance losses ride on the backward under PP; summed here for the log
            last = meshes.pp_rank == self.dm._last_stage_rank()
            if self.dm.schedule is None:
                from dsv3.parallel.pp import build_schedule

                self.dm.schedule = build_schedule(self.parts, meshes, self._pp_loss)
            kw = {"tokens": tokens}
            if "position_ids" in batches[0]:
                kw["positions"] = torch.cat([b["position_ids"] for b in batches])
            with self.autocast():
                self.dm.schedule.step(tokens, target=target if last else None, **kw)
            # the last M calls are this step's micro-batches (the first step also has the runtime's shape-inference call)
            M = self.micro_batches
            sums = torch.stack([torch.stack(self._pp_parts[k][-M:]).mean() if self._pp_parts[k] else torch.zeros((), device=dev)
                                for k in ("lm", "mtp")]
                               + [torch.as_tensor(sum(m.aux_accum for m in self.moe_layers) / M, dtype=torch.float32, device=dev)])
            dist.all_reduce(sums, group=meshes.pp_group)  # lm/mtp from the last stage, balance losses from every stage
            parts = {"lm": sums[0], "mtp": sums[1], "aux": sums[2]}
        else:
            parts = {}
            for b in batches:
                with self.autocast():
                    # the plain-logits path: FSDP and TP hook module calls, which the fused head skips
                    loss, p = compute_loss(self.model, b, cfg.train.mtp_loss_factor, fused_ce=False)
                (loss / self.micro_batches).backward()
                for k, v in p.items():
                    parts[k] = parts.get(k, 0) + v / self.micro_batches
        vec = torch.stack([torch.as_tensor(parts[k], device=dev, dtype=torch.float32) for k in ("lm", "mtp", "aux")])
        if dims.dp > 1:  # replica means -> global mean
            dist.all_reduce(vec, group=meshes.dense.get_group("dp"))
            vec /= dims.dp
        self.dm.finalize_grads()
        clip = cfg.optimizer.clip_grad if cfg.optimizer.clip_grad > 0 else float("inf")
        grad_norm = clip_grad_norm_(self.dm, clip)
        return self.finish_step({k: float(v) for k, v in zip(("lm", "mtp", "aux"), vec)}, grad_norm)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        """The parent's validation sums, through the parallelized model: its own forward (FSDP, TP and EP
        hook module calls, which the parent's fused head skips) or, under PP, the schedule's forward-only
        pass. Every rank evaluates the same batches, so the collectives line up and the result is the
        single-process one."""
        if self.data.valid is None:
            return None
        batches = self.eval_batches()
        for p in self.parts:
            p.eval()
        sums = torch.zeros(2, device=self.device)
        try:
            if self.dims.pp > 1:
                sums += self._pp_eval_sums(batches)
            else:
                for b in batches:
                    with self.autocast():
                        logits = self.model(b["tokens"], positions=b.get("position_ids"))
                    sums += torch.stack(masked_ce(logits, b["labels"], b["loss_mask"]))
        finally:
            for p in self.parts:
                p.train()
        total, count = float(sums[0]), float(sums[1])
        if count == 0:
            return None
        loss = total / count
        return {"valid_loss": loss, "valid_ppl": math.exp(min(loss, 50.0))}

    def _pp_eval_sums(self, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """(CE sum, token count) of `batches` through the pipeline in groups of micro_batch_num (the shape
        the schedule was built for; a short last group is padded with masked-out copies), from the last stage."""
        M, dev = self.micro_batches, self.device
        if getattr(self, "_eval_schedule", None) is None:  # its own stages: a forward-only run leaves state in them
            from dsv3.parallel.pp import build_schedule

            self._eval_schedule = build_schedule(self.parts, self.meshes, self._pp_loss)
        last = self.meshes.pp_rank == self.dm._last_stage_rank()
        # a stage's first call is the runtime's shape inference (kept out of the balancing counts): the training
        # schedule's first call must still be treated so after the eval schedule's
        inferred = [getattr(p, "_shapes_inferred", None) for p in self.parts]
        sums = torch.zeros(2, device=dev)
        for g in range(0, len(batches), M):
            group = batches[g:g + M]
            group = group + [{**group[0], "loss_mask": torch.zeros_like(group[0]["loss_mask"])}] * (M - len(group))
            tokens = torch.cat([b["tokens"] for b in group])
            mask = torch.cat([b["loss_mask"] for b in group])
            target = torch.stack([torch.cat([b["labels"] for b in group]), mask.long()], 1)
            kw = {"tokens": tokens}
            if "position_ids" in group[0]:
                kw["positions"] = torch.cat([b["position_ids"] for b in group])
            self._pp_parts = {"lm": [], "mtp": []}
            with self.autocast():
                self._eval_schedule.eval(tokens, target=target if last else None, **kw)
            if last:  # one token-mean CE per micro-batch, in order: back to sums
                counts = torch.stack([m.sum() for m in mask.tensor_split(M)]).to(dev, torch.float32)
                sums += torch.stack([(torch.stack(self._pp_parts["lm"][-M:]) * counts).sum(), counts.sum()])
        for p, flag in zip(self.parts, inferred):
            if flag is not None:
                p._shapes_inferred = flag
        dist.all_reduce(sums, group=self.meshes.pp_group)
        return sums

    # ---- checkpoints
    def save(self) -> Path:
        """DCP checkpoint `step-N/` (model + AdamW by parameter name) + trainer_state.pt from rank 0."""
        root = Path(self.ckpt_root)
        final = root / f"step-{self.step}"
        tmp = root / f".tmp-step-{self.step}-dcp"
        if self.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        pdcp.save(tmp, self.parts, self.optimizer)
        if self.rank == 0:
            torch.save({"step": self.step, "scheduler": self.scheduler.state_dict(), "loader": self.data.train.state_dict(),
                        "rng": checkpoint.rng_state()}, tmp / "trainer_state.pt")
            dump_yaml(self.cfg, tmp / "config.resolved.yaml")
            checkpoint.write_manifest(tmp, self.step)  # `--resume` verifies every file against it
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            checkpoint.prune(root, self.cfg.checkpoint.keep_last, self.step)
        dist.barrier()
        return final

    def _restore(self, path: Path) -> None:
        if not (path / ".metadata").is_file():
            raise UserError(f"checkpoint {path} was not written by a distributed run (no DCP .metadata); "
                            f"resume it with one process, or start a new checkpoint.output_dir")
        pdcp.load(path, self.parts, self.optimizer)
        state = torch.load(path / "trainer_state.pt", weights_only=True)
        self.scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr  # the DCP optimizer state holds the moments only, not the groups' current lr
        self.step = int(state["step"])
        self.data.train.load_state_dict(state["loader"])
        checkpoint.set_rng_state(state["rng"])

    def fit(self) -> dict[str, Any]:
        """The parent's loop; HF export (rank 0, from the final DCP checkpoint) afterwards."""
        export = self.cfg.checkpoint.export_hf
        self.cfg.checkpoint.export_hf = False  # the parent would save the (sharded) model directly
        try:
            summary = super().fit()
        finally:
            self.cfg.checkpoint.export_hf = export
        if export:
            path = self.ckpt_root / f"step-{self.step}" if self.saved_step == self.step else self.save()
            if self.rank == 0:
                from dsv3.data.tokenizer import export_tokenizer

                summary["hf_dir"] = str(pdcp.export_hf(path, self.cfg.model, Path(self.cfg.output_dir) / "hf"))
                self.log(f"exported HF weights to {summary['hf_dir']}")
                self.log(export_tokenizer(summary["hf_dir"], self.cfg.data.tokenizer, self.cfg.model.vocab_size))
            dist.barrier()
        return summary


def run_distributed(cfg: RunConfig) -> int:
    """`dsv3 train` when started by torchrun / `dsv3 launch` (WORLD_SIZE > 1)."""
    import json

    try:
        summary = DistributedTrainer(cfg).fit()
        if dist.get_rank() == 0:
            print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, list)}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
