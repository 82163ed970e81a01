"""The pretraining loop, one `Trainer` whatever the layout. Setup is split into `build_data` and
`restore`; the layout (one process, or this rank's part of a parallel layout under torchrun / `dsv3
launch`) is a `dsv3.train.strategy.Strategy` (`LocalStrategy` or `DistributedStrategy`, picked by
`dsv3.train.distributed.make_strategy`) built from `cfg.layout()`, applied from outside:
it builds the model parts and the optimizer, runs a step's forward/backward, reduces and clips the
gradients, evaluates, and writes / reads checkpoints. `Trainer` only runs steps, evaluates, logs and saves.

One optimizer step = `micro_batches_per_step` micro-batches on this rank, each forward/backward on
loss/n so the gradient is the mean over the global batch; then clip, AdamW, LR schedule, and ONE
bias update from the expert counts of all those micro-batches (summed over every rank that routed
other tokens; `dsv3.train.balance`).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from dsv3 import devices, threads
from dsv3.config.load import dump_yaml
from dsv3.config.train import RunConfig
from dsv3.errors import UserError
from dsv3.train import balance, checkpoint, metrics, precision
from dsv3.train.distributed import make_strategy
from dsv3.train.host_memory import keep_freed_memory
from dsv3.train.loss import combine
from dsv3.train.lr_schedule import build_scheduler
from dsv3.train.optim import clip_coefficient, step_with_clip
from dsv3.train.strategy import Strategy


# ----------------------------------------------------------------------------------------- setup
def resolve_device(name: str) -> torch.device:
    return devices.resolve_device(name, "train.device")


def check_fits_one_process(cfg: RunConfig, device: torch.device) -> None:
    """Before any allocation: a model whose fp32 weights, gradients and AdamW moments exceed this
    machine's memory is refused with one line naming the layout's process count."""
    from dsv3.tools.info import account

    acc = account(cfg.model, cfg.data.seq_length)
    n = acc.total + acc.mtp
    need = n * (4 + 4 + (4 if cfg.optimizer.state_dtype == "bfloat16" else 8))
    if device.type == "cuda":
        have, where = torch.cuda.get_device_properties(device).total_memory, f"{device} has"
    else:
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine has"
    if need <= have:
        return
    p = cfg.parallel
    world = p.data_parallel * p.model_parallel * p.pipeline_stage
    raise UserError(f"one process cannot hold this model: {n / 1e9:.1f}B parameters need {need / 2**30:,.0f} GiB for fp32 "
                    f"weights, gradients and AdamW state, {where} {have / 2**30:,.0f} GiB; its layout (data_parallel {p.data_parallel} "
                    f"x model_parallel {p.model_parallel} x pipeline_stage {p.pipeline_stage}) needs {world} processes: start it with "
                    f"`dsv3 launch` on {world} devices; `dsv3 dryrun --config ...` reports every rank's memory without devices")


@dataclass
class Data:
    """The training loader (resumable) and the validation dataset (None when there is none)."""

    train: Any
    valid: Any | None


def check_data(cfg: RunConfig) -> None:
    """Clear errors before any work: missing or inconsistent .bin/.idx, token ids outside the model's
    vocabulary, or seq_length beyond the preprocessed sample length."""
    from dsv3.data.gpt_indices import parse_data_path
    from dsv3.data.indexed_dataset import IndexedDataset, exists

    L = cfg.data.seq_length
    for name, paths in (("data.data_path", cfg.data.data_path), ("data.valid_data_path", cfg.data.valid_data_path)):
        for prefix in parse_data_path(paths)[0] if paths else []:
            if not exists(prefix):
                raise UserError(f"{name}: {prefix}.bin / {prefix}.idx not found; write them with "
                                f"`dsv3 preprocess --input FILE --output-prefix ...` (the prefix ends in _text_document)")
            ds = IndexedDataset(prefix)  # validates the index against itself and the .bin
            ds.check_token_ids(cfg.model.vocab_size)  # an id outside the embedding would fail at step 1
            lengths = ds.sequence_lengths
            # stitch/pad preprocessing writes equal sequences of seq_length+1 tokens: longer samples
            # would run across its cuts (and across padding)
            if len(lengths) > 1 and (lengths == lengths[0]).all() and L + 1 > int(lengths[0]):
                raise UserError(f"data.seq_length {L} exceeds the data's sample length {int(lengths[0]) - 1} ({prefix} was "
                                f"preprocessed with --seq-length {int(lengths[0]) - 1}); lower data.seq_length or re-run "
                                f"`dsv3 preprocess --seq-length {L}`")
            if int(lengths.sum()) < L + 1:
                raise UserError(f"{name}: {prefix} holds {int(lengths.sum())} tokens, fewer than one sample of data.seq_length {L} + 1")


def build_data(cfg: RunConfig, micro_batches: int, dp_rank: int = 0, dp_size: int = 1, log: Callable[[str], None] | None = None,
               pipeline: bool = False) -> Data:
    """GPTDatasets over the configured prefixes, sized for the whole run (all data-parallel ranks);
    valid from the split or its own prefixes. The loader hands rank `dp_rank` its slice of each global batch.
    `pipeline`: the run's micro-batches go through a pipeline schedule.
    SFT data (`data.type: sft`): packed/padded sequences; `train.epochs` sets train.steps from their count."""
    from dsv3.data.gpt_dataset import build_gpt_datasets
    from dsv3.data.loader import ResumableLoader

    if cfg.data.type == "sft":
        from dsv3.data.sft_dataset import build_sft_data

        if cfg.data.sft.packing and pipeline:
            raise UserError("data.sft.packing needs the per-sample attention mask, which the pipeline schedule does not carry: "
                            "set data.sft.packing: false (padding) or parallel.pipeline_stage: 1")
        train, valid = build_sft_data(cfg, log)
        per_epoch = len(train) // (micro_batches * cfg.train.batch_size * dp_size)
        if cfg.train.epochs:
            if per_epoch == 0:
                raise UserError(f"{len(train)} SFT training sequences are fewer than one global batch "
                                f"({micro_batches * cfg.train.batch_size * dp_size} sequences)")
            cfg.train.steps = cfg.train.epochs * per_epoch
            if log:
                log(f"train.epochs {cfg.train.epochs} x {per_epoch} steps per epoch -> train.steps {cfg.train.steps}")
        return Data(train=ResumableLoader(train, cfg.train.batch_size, dp_rank=dp_rank, dp_size=dp_size, cycle=True), valid=valid)
    check_data(cfg)
    d, bs = cfg.data, cfg.train.batch_size
    n_train = cfg.train.steps * micro_batches * bs * dp_size
    n_valid = cfg.eval.eval_iters * bs if (cfg.eval.eval_steps or cfg.eval.eval_at_end) else None
    own_valid = bool(d.valid_data_path)
    train, valid, _ = build_gpt_datasets(_dataset_config(cfg, d.data_path, d.split),
                                         num_samples=(n_train, None if own_valid else n_valid, None))
    if own_valid:
        valid = None
        if n_valid:
            valid, _, _ = build_gpt_datasets(_dataset_config(cfg, d.valid_data_path, "1,0,0"), num_samples=(n_valid, None, None))
    if train is None:
        raise UserError(f"data.split {d.split!r} leaves no training samples")
    if valid is not None and len(valid) == 0:
        valid = None
    return Data(train=ResumableLoader(train, bs, dp_rank=dp_rank, dp_size=dp_size, cycle=True), valid=valid)


def _dataset_config(cfg: RunConfig, prefixes: list[str], split: str):
    from dsv3.data.gpt_dataset import GPTDatasetConfig

    d = cfg.data
    return GPTDatasetConfig(data_path=list(prefixes), split=split, seq_length=d.seq_length, seed=d.random_seed,
                            eod_mask_loss=d.eod_mask_loss, reset_position_ids=d.reset_position_ids,
                            eod_id=cfg.model.eos_token_id)


def restore(trainer: "Trainer", path: Path) -> None:
    """Load model, optimizer, scheduler, data position and RNG from checkpoint `path` (written under any layout)."""
    state = trainer.strategy.restore(path, trainer.optimizer, trainer.scheduler)
    trainer.step = int(state["step"])
    try:
        trainer.data.train.load_state_dict(state["loader"])
    except ValueError as e:
        raise UserError(f"checkpoint {path}: {e} (train.steps, batch size or data changed since it was written?)") from None
    checkpoint.set_rng_state(state["rng"])


# ----------------------------------------------------------------------------------------- loop
class _NoMetrics:
    """Metrics sink of the ranks that do not write them (rank 0 does)."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class Trainer:
    """Runs `cfg.train.steps` optimizer steps of a RunConfig under the layout of `strategy` (default:
    the one built from `cfg.parallel` and the launcher's environment; see the module docstring)."""

    def __init__(self, cfg: RunConfig, quiet: bool = False, strategy: Strategy | None = None):
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        if cfg.train.threads and threads.ENV not in os.environ:  # --threads / $DSV3_NUM_THREADS win over the YAML
            threads.apply(threads.Choice(cfg.train.threads, "train.threads"))
        self.strategy = strategy or make_strategy(cfg, self.device)
        self.quiet = quiet or not self.strategy.logs
        if self.device.type == "cpu" and cfg.train.cpu_allocator == "cache":
            note = keep_freed_memory()
            if note:
                self.log(note)
        self.micro_batches = cfg.micro_batches_per_step(self.strategy.dp_size)
        self.run_dir = cfg.output_dir
        self.ckpt_root = checkpoint.checkpoint_root(self.run_dir)
        resume_from = self._resume_path()
        self.data = build_data(cfg, self.micro_batches, self.strategy.dp_rank, self.strategy.dp_size, self.log,
                               pipeline=self.strategy.dims.pp > 1)
        self.parts, self.optimizer = self.strategy.build(self.log)
        self.precision = precision.resolve(cfg.train.precision, self.device, cfg.train.cpu_bf16)
        if self.precision.note:
            self.log(self.precision.note)
        if self.device.type == "cpu" and threads.current() is not None:
            self.log(threads.current().line())
        self.model = self.parts[0] if self.strategy.dims.pp == 1 else None  # under PP no rank holds the whole model
        self.scheduler = build_scheduler(self.optimizer, cfg.lr_schedule, cfg.train.steps)
        self.moe_layers = self.strategy.moe_layers()
        self.moe_labels = balance.layer_labels(self.strategy.parts)  # "layer N" / "MTP k", for the log and plots
        self.step = 0
        self._batches = None
        if resume_from is not None:
            restore(self, resume_from)
            self.log(f"resumed from {resume_from} (step {self.step})")
        self.saved_step = self.step if resume_from is not None else None  # the step of this run's last checkpoint
        self.tokens_per_step = self.micro_batches * cfg.train.batch_size * cfg.data.seq_length * self.strategy.dp_size
        self.flops_per_token = metrics.train_flops_per_token(cfg.model, cfg.data.seq_length,
                                                             cfg.model.num_nextn_predict_layers if cfg.train.mtp_loss_factor > 0 else 0)
        dev_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.peak_flops = metrics.peak_flops(dev_name, self.precision.runs, cfg.logging.peak_tflops)

    def _resume_path(self) -> Path | None:
        existing = checkpoint.latest_checkpoint(self.ckpt_root)
        if self.cfg.checkpoint.resume:
            if existing is None:
                raise UserError(f"--resume: no checkpoint under {self.ckpt_root}")
            return checkpoint.resume_checkpoint(self.ckpt_root, self.log)  # the newest one that verifies
        if existing is not None:
            raise UserError(f"{self.ckpt_root} already holds {existing.name}: pass --resume to continue it, "
                            f"or set checkpoint.output_dir to a new directory")
        return None

    def log(self, msg: str) -> None:
        if not self.quiet:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stderr)

    def autocast(self):
        if self.precision.runs == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _next_batch(self) -> dict[str, torch.Tensor]:
        if self._batches is None:  # created lazily so a restored loader position is honoured
            self._batches = iter(self.data.train)
        try:
            return next(self._batches)
        except StopIteration:
            raise UserError("the training data yielded no batch: fewer samples than one micro-batch") from None

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over `micro_batches` micro-batches; returns the step's metrics."""
        batches = [self._to_device(self._next_batch()) for _ in range(self.micro_batches)]
        losses = self.strategy.forward_backward(batches, self.autocast)
        return self.finish_step(losses, self.strategy.finish_grads())

    def finish_step(self, losses: dict[str, float], grad_norm) -> dict[str, Any]:
        """Optimizer + LR step, then the bias update from this step's expert counts; the step's record.
        `losses` holds the step's global mean `lm`, `mtp`, `aux` and `indexer` losses."""
        lr = self.scheduler.get_last_lr()[0]
        clip = self.cfg.optimizer.clip_grad
        step_with_clip(self.optimizer, clip_coefficient(grad_norm, clip) if clip > 0 else 1.0)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        warmup = self.strategy.indexer_warmup  # DSA dense warm-up: the routing bias stays fixed too
        counts = balance.balance_step(self.moe_layers, 0.0 if warmup else self.cfg.train.bias_update_rate, self.strategy.reduce_counts)
        self.step += 1
        rec = {k + "_loss": v for k, v in losses.items()}
        rec["loss"] = float(combine(rec["lm_loss"], rec["mtp_loss"], rec["aux_loss"], rec["indexer_loss"], self.strategy.main_loss_weight))
        if not math.isfinite(rec["loss"]):
            raise UserError(f"loss is {rec['loss']} at step {self.step}: training diverged (lower lr_schedule.learning_rate "
                            f"or check the data); the last checkpoint is intact")
        rec.update(step=self.step, lr=lr, grad_norm=float(grad_norm), counts=counts, precision=self.precision.runs)
        if (agree := self.strategy.routing_agreement) is not None:  # replayed routes (`dsv3.train.replay`)
            seen = [a for a in agree if a is not None]
            rec.update(routing_agreement=sum(seen) / len(seen) if seen else None, routing_agreement_layers=agree)
        return rec

    def logprobs(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """Teacher-forced logprobs of each sequence of batch["input_ids"] ([B,T] or B lists of ids): [T-1]
        per sequence, differentiable, equal (`==`) to a batch-invariant engine's logprobs of the same tokens
        on the same weights (`dsv3.train.score`). Layouts: one process, or data parallel with replicated weights."""
        from dsv3.train.score import score_logprobs

        dims = self.strategy.dims
        if self.model is None or dims.tp > 1 or dims.ep > 1 or dims.fsdp:
            raise UserError(f"Trainer.logprobs: exact scoring runs whole, unsharded layers (tp 1, ep 1, pp 1, no FSDP); "
                            f"this run has tp {dims.tp}, ep {dims.ep}, pp {dims.pp}, dp {dims.dp} ({dims.dp_shard})")
        if batch.get("routed_experts") is None:
            return score_logprobs(self.model, batch["input_ids"])
        return self._replayed_logprobs(batch, score_logprobs)

    def _replayed_logprobs(self, batch: dict[str, Any], score) -> list[torch.Tensor]:
        """`logprobs` with batch["routed_experts"]: per sequence [T, L, K] (`dsv3.train.replay`), each sequence
        scored through its rows; the per-layer agreement goes to `strategy.routing_agreement` (the step's record)."""
        from dsv3.train.replay import RoutingReplay, merge_agreement

        if self.cfg.train.recompute != "none":  # the backward would run the blocks again, after the replay ended
            raise UserError(f"Trainer.logprobs with routed_experts: train.recompute {self.cfg.train.recompute!r} would "
                            f"re-route the backward's forward by itself; set train.recompute: none")
        out, replays = [], []
        for ids, routed in zip(batch["input_ids"], batch["routed_experts"]):
            ids = [int(t) for t in ids]
            with RoutingReplay(self.model, torch.as_tensor(routed)[None, : len(ids) - 1], torch.tensor([ids[:-1]])) as r:
                out += score(self.model, [ids])
            replays.append(r)
        self.strategy.routing_agreement = merge_agreement(replays)
        return out

    def evaluate(self) -> dict[str, float] | None:
        """Token-mean main-head loss and perplexity over the first eval_iters validation batches."""
        if self.data.valid is None:
            return None
        total, count = (float(v) for v in self.strategy.eval_sums(self.eval_batches(), self.autocast))
        if count == 0:
            return None
        loss = total / count
        return {"valid_loss": loss, "valid_ppl": math.exp(min(loss, 50.0))}

    def eval_batches(self) -> list[dict[str, torch.Tensor]]:
        """The validation micro-batches of every evaluation (the first eval_iters, always the same)."""
        bs, n = self.cfg.train.batch_size, len(self.data.valid)
        out = []
        for i in range(min(self.cfg.eval.eval_iters, n // bs)):
            items = [self.data.valid[j] for j in range(i * bs, (i + 1) * bs)]
            out.append(self._to_device({k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}))
        return out

    def save(self) -> Path:
        return self.strategy.save(self.ckpt_root, self.step, self.optimizer, self.scheduler, self.data.train.state_dict())

    def fit(self) -> dict[str, Any]:
        """Train to cfg.train.steps, evaluating/saving/logging on schedule; returns a summary."""
        from tqdm import tqdm

        cfg, main = self.cfg, self.strategy.is_main  # the main rank writes the run directory's files
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_yaml(cfg, self.run_dir / "config.resolved.yaml")
        writer = (metrics.MetricsWriter(self.run_dir, cfg.logging.tensorboard, resume_step=self.step if cfg.checkpoint.resume else None)
                  if main else _NoMetrics())
        bar = tqdm(total=cfg.train.steps, initial=self.step, desc="train", unit="step", file=sys.stderr,
                   disable=self.quiet or not cfg.logging.progress_bar or not sys.stderr.isatty(), dynamic_ncols=True)
        t_start = time.perf_counter()
        t_last, step_last, counts_acc = t_start, self.step, None
        summary: dict[str, Any] = {"start_step": self.step}
        try:
            if self.step == 0 and cfg.eval.eval_steps and (ev := self.evaluate()) is not None:
                writer.write({"kind": "eval", "step": 0, **ev})
                self.log(f"step 0 | valid loss {ev['valid_loss']:.4f} ppl {ev['valid_ppl']:.1f}")
            while self.step < cfg.train.steps:
                rec = self.train_step()
                counts = rec.pop("counts")
                counts_acc = counts if counts_acc is None else counts_acc + counts
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}")
                if self.step % cfg.logging.log_interval == 0 or self.step == cfg.train.steps:
                    now = time.perf_counter()
                    tps = self.tokens_per_step * (self.step - step_last) / max(now - t_last, 1e-9)
                    per_step = (now - t_start) / (self.step - summary["start_step"])  # this run's steps so far, evals included
                    rec.update(kind="train", tokens_per_s=tps, expert_load=balance.load_ratio(counts_acc),
                               expert_load_layers=self.moe_labels, total_steps=cfg.train.steps,
                               eta_s=per_step * (cfg.train.steps - self.step),
                               mfu=tps * self.flops_per_token / self.peak_flops if self.peak_flops else None)
                    writer.write(rec)
                    self.log(metrics.format_line(rec))
                    t_last, step_last, counts_acc = now, self.step, None
                    summary["train_loss"] = rec["loss"]
                if cfg.eval.eval_steps and self.step % cfg.eval.eval_steps == 0 and (ev := self.evaluate()) is not None:
                    writer.write({"kind": "eval", "step": self.step, **ev})
                    self.log(f"step {self.step} | valid loss {ev['valid_loss']:.4f} ppl {ev['valid_ppl']:.1f}")
                    summary.update(ev)
                if cfg.checkpoint.save_steps and self.step % cfg.checkpoint.save_steps == 0:
                    self.log(f"saved {self.save()}")
                    self.saved_step = self.step
            if cfg.eval.eval_at_end and not (cfg.eval.eval_steps and self.step % cfg.eval.eval_steps == 0) and (ev := self.evaluate()) is not None:
                writer.write({"kind": "eval", "step": self.step, **ev})
                self.log(f"step {self.step} | valid loss {ev['valid_loss']:.4f} ppl {ev['valid_ppl']:.1f}")
                summary.update(ev)
            if cfg.checkpoint.save_at_end and self.saved_step != self.step:
                self.log(f"saved {self.save()}")
                self.saved_step = self.step
        finally:
            bar.close()
            writer.close()
        summary.update(steps=self.step, seconds=time.perf_counter() - t_start)
        if cfg.checkpoint.export_hf and (hf := self.export_hf()) is not None:
            summary["hf_dir"] = str(hf)
        if cfg.logging.plots and main:
            from dsv3.train.plot import plots_after_training

            summary["plots"] = [str(p) for p in plots_after_training(self.run_dir, self.log)]
        return summary

    def export_hf(self) -> Path | None:
        """The final weights as an HF directory `run_dir/hf` with the tokenizer (the main rank's path;
        a distributed layout exports from its final checkpoint, written now if this step has none)."""
        saved = None
        if self.strategy.distributed:
            saved = self.ckpt_root / f"step-{self.step}" if self.saved_step == self.step else self.save()
        hf = self.strategy.export_hf(self.run_dir / "hf", saved)
        if hf is None:
            return None
        self.log(f"exported HF weights to {hf}")
        from dsv3.data.tokenizer import export_tokenizer

        source = self.cfg.data.tokenizer
        if self.cfg.data.type == "sft":  # fine-tuned weights ship with the tokenizer they were tuned with (or init_from's)
            from dsv3.data.sft_dataset import tokenizer_source

            source = tokenizer_source(self.cfg)
        self.log(export_tokenizer(hf, source, self.cfg.model.vocab_size))
        return hf

    def close(self) -> None:
        """Release the strategy's process group (when it created one)."""
        self.strategy.close()
