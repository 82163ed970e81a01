"""The GRPO run: `dsv3 train --config configs/grpo_tiny.yaml` (a run YAML with a `grpo:` section).

One step: draw prompts, sample `group_size` completions of each from the in-process engine (an `LLM`
holding its own copy of the policy's weights, temperature 1, each completion seeded by (train.seed,
step, index) so a resumed run draws the same ones), reward them, standardise the rewards per group,
score the same tokens with the policy (`dsv3.rl.grpo.token_logprobs`), compare those logprobs with the
sampler's (metrics `logprob_mismatch_max` / `_tokens`), take one AdamW step on the clipped loss (plus
beta x k3 KL to the frozen reference when grpo.kl_coef > 0), then copy the new weights into the engine.
The first grpo.warmup_steps steps are supervised format steps (`AdditionTask.format_batch`).

Checkpoints are the trainer's (`dsv3.train.checkpoint`: weights, AdamW, LR schedule, RNG and the task's
prompt RNG in the loader slot), so `--resume` continues exactly; the KL reference is written once to
`output_dir/reference.safetensors` when GRPO begins. metrics.jsonl holds `kind: grpo` / `kind: sft`
records; the plots add reward.png.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from dsv3 import threads
from dsv3.config.load import dump_yaml
from dsv3.errors import UserError
from dsv3.rl.config import GRPORunConfig
from dsv3.rl.grpo import RolloutBatch, group_advantages, mismatch, policy_logprobs, policy_loss, rollout_batch
from dsv3.rl.task import AdditionTask
from dsv3.train import balance, checkpoint, metrics
from dsv3.train.loss import masked_ce
from dsv3.train.lr_schedule import build_scheduler
from dsv3.train.optim import build_optimizer, clip_coefficient, step_with_clip
from dsv3.train.trainer import resolve_device

REFERENCE = "reference.safetensors"


def copy_model(model: torch.nn.Module, cfg) -> torch.nn.Module:
    """A separate model with `model`'s weights (the engine's copy, the frozen reference)."""
    from dsv3.kernels import apply_fast_paths
    from dsv3.model import Transformer

    with torch.device(next(model.parameters()).device):
        twin = Transformer(cfg)
    apply_fast_paths(twin)
    twin.load_state_dict(model.state_dict())
    return twin.eval().requires_grad_(False)


class GRPORun:
    """Runs cfg.train.steps steps of a GRPORunConfig in this process (see the module docstring)."""

    def __init__(self, cfg: GRPORunConfig, quiet: bool = False):
        from dsv3 import LLM
        from dsv3.train.strategy import build_model

        self.cfg, self.quiet = cfg, quiet
        self.device = resolve_device(cfg.train.device)
        if cfg.train.threads and threads.ENV not in os.environ:
            threads.apply(threads.Choice(cfg.train.threads, "train.threads"))
        m, g = cfg.model, cfg.grpo
        self.task = AdditionTask(m.bos_token_id, m.eos_token_id, m.vocab_size, g.max_operand)
        self.rng = random.Random(cfg.train.seed)
        self.run_dir = cfg.output_dir
        self.ckpt_root = checkpoint.checkpoint_root(self.run_dir)
        resume_from = self._resume_path()
        self.policy = build_model(cfg, self.device, self.log)
        self.optimizer = build_optimizer(self.policy, cfg.optimizer, cfg.lr_schedule)
        self.scheduler = build_scheduler(self.optimizer, cfg.lr_schedule, cfg.train.steps)
        self.moe_layers = self.policy.moe_layers()
        self.replay = g.routing_replay and bool(self.moe_layers)
        self.step = 0
        if resume_from is not None:
            state = checkpoint.load_checkpoint(resume_from, self.policy, self.optimizer, self.scheduler)
            self.step = int(state["step"])
            checkpoint.set_rng_state(state["rng"])
            self.rng.setstate(_rng_from_state(state["loader"]["task_rng"]))
            self.log(f"resumed from {resume_from} (step {self.step})")
        self.saved_step = self.step if resume_from is not None else None
        self.ref = self._load_reference() if g.kl_coef > 0 and self.step > g.warmup_steps else None
        self.llm = LLM(copy_model(self.policy, m), tokenizer=None, device=self.device, max_num_seqs=g.max_num_seqs,
                       batch_invariant=g.batch_invariant)
        if self.device.type == "cpu" and threads.current() is not None:
            self.log(threads.current().line())

    # ---- setup helpers
    def log(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def _resume_path(self) -> Path | None:
        existing = checkpoint.latest_checkpoint(self.ckpt_root)
        if self.cfg.checkpoint.resume:
            if existing is None:
                raise UserError(f"--resume: no checkpoint under {self.ckpt_root}")
            return checkpoint.resume_checkpoint(self.ckpt_root, self.log)
        if existing is not None:
            raise UserError(f"{self.ckpt_root} already holds {existing.name}: pass --resume to continue it, "
                            f"or set checkpoint.output_dir to a new directory")
        return None

    def _load_reference(self) -> torch.nn.Module:
        path = self.run_dir / REFERENCE
        if not path.is_file():
            raise UserError(f"{path} is missing: grpo.kl_coef > 0 needs the reference written when GRPO began")
        ref = copy_model(self.policy, self.cfg.model)
        try:
            load_model(ref, str(path), strict=True, device=str(self.device))
        except Exception as e:  # a truncated or foreign file
            raise UserError(f"{path} is corrupt or does not match this model: {str(e).splitlines()[0][:200]}") from None
        return ref

    def _snapshot_reference(self) -> torch.nn.Module:
        """The frozen reference: the policy as GRPO begins, also written (temp name, then rename) for a resume."""
        ref = copy_model(self.policy, self.cfg.model)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / (REFERENCE + ".tmp")
        save_model(ref, str(tmp))
        tmp.replace(self.run_dir / REFERENCE)
        return ref

    # ---- steps
    def _sample_seed(self, k: int) -> int:
        return ((self.cfg.train.seed * 1_000_003 + self.step) << 20) + k

    def rollouts(self) -> tuple[RolloutBatch, torch.Tensor]:
        """The step's rollouts (with the sampler's logprob and, with replay, experts of each sampled token) and rewards."""
        from dsv3 import SamplingParams

        g = self.cfg.grpo
        problems = self.task.sample(g.prompts_per_step, self.rng)
        prompts = [p.prompt_ids for p in problems for _ in range(g.group_size)]
        params = [SamplingParams(temperature=1.0, max_tokens=g.max_new_tokens, logprobs=0, seed=self._sample_seed(k),
                                 return_routed_experts=self.replay) for k in range(len(prompts))]
        outs = self.llm.generate(prompts, params)
        completions = [list(o.outputs[0].token_ids) for o in outs]
        logprobs = [[lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, c)] for o, c in zip(outs, completions)]
        rewards = torch.tensor([self.task.reward(problems[k // g.group_size], c) for k, c in enumerate(completions)])
        routed = [o.outputs[0].routed_experts for o in outs] if self.replay else None
        return rollout_batch(prompts, completions, logprobs, group_advantages(rewards.view(g.prompts_per_step, g.group_size)),
                             self.cfg.model.eos_token_id, routed, self.cfg.model.num_experts_per_tok), rewards.view(
                                 g.prompts_per_step, g.group_size)

    def _update(self, loss: torch.Tensor) -> tuple[float, float]:
        """Backward (plus the balance loss when configured), clipped AdamW step, LR step, routing-bias update."""
        aux = self.policy.aux_loss()
        (loss + aux if aux is not None else loss).backward()
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.policy.parameters() if p.grad is not None])
        lr = self.scheduler.get_last_lr()[0]
        clip = self.cfg.optimizer.clip_grad
        step_with_clip(self.optimizer, clip_coefficient(norm, clip) if clip > 0 else 1.0)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        balance.balance_step(self.moe_layers, self.cfg.train.bias_update_rate)
        return lr, float(norm)

    def grpo_step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        batch, rewards = self.rollouts()
        t1 = time.perf_counter()
        exact = self.cfg.grpo.batch_invariant
        logp, agreement = policy_logprobs(self.policy, batch, exact, self.cfg.grpo.exact_backward)
        mm_max, mm_count = mismatch(logp, batch.sampler_logprobs, batch.mask)
        ref_logp = None
        if self.ref is not None:
            with torch.no_grad():
                ref_logp = policy_logprobs(self.ref, batch, exact)[0]
        loss, stats = policy_loss(logp, batch, self.cfg.grpo.clip_eps, ref_logp, self.cfg.grpo.kl_coef)
        lr, norm = self._update(loss)
        t2 = time.perf_counter()
        self.sync_weights()
        t3 = time.perf_counter()
        sampled = int(batch.mask.sum())
        return {"kind": "grpo", "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
                "groups_all_equal": int((rewards.std(dim=1) == 0).sum()), "loss": float(loss.detach()), **stats,
                "logprob_mismatch_max": mm_max, "logprob_mismatch_tokens": mm_count, "sampled_tokens": sampled,
                "completion_len": sampled / len(batch.sequences), "routing_agreement": agreement, "lr": lr, "grad_norm": norm,
                "tokens_per_s": sampled / (t3 - t0), "rollout_s": t1 - t0, "train_s": t2 - t1, "sync_s": t3 - t2}

    def sft_step(self) -> dict[str, Any]:
        """A supervised format step (warm-up): cross-entropy on the answer and eos of random-answer samples."""
        t0 = time.perf_counter()
        b = {k: v.to(self.device) for k, v in self.task.format_batch(self.cfg.grpo.prompts_per_step, self.rng).items()}
        total, count = masked_ce(self.policy(b["tokens"]), b["labels"], b["loss_mask"])
        loss = total / count
        lr, norm = self._update(loss)
        self.sync_weights()
        return {"kind": "sft", "loss": float(loss.detach()), "lr": lr, "grad_norm": norm,
                "tokens_per_s": float(count) / (time.perf_counter() - t0)}

    def sync_weights(self) -> str:
        """The policy's weights into the engine (`LLM.update_weights`: checked, copied in place, derived
        weights rebuilt, prefix cache flushed); returns the engine's new weight version."""
        return self.llm.update_weights(self.policy.state_dict(), version=str(self.step + 1))

    # ---- the run
    def save(self) -> Path:
        return checkpoint.save_checkpoint(self.ckpt_root, self.step, self.policy, self.optimizer, self.scheduler,
                                          {"task_rng": _rng_to_state(self.rng.getstate())}, self.cfg,
                                          self.cfg.checkpoint.keep_last)

    def fit(self) -> dict[str, Any]:
        cfg, g = self.cfg, self.cfg.grpo
        self.run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, self.run_dir / "config.resolved.yaml")
        writer = metrics.MetricsWriter(self.run_dir, cfg.logging.tensorboard,
                                       resume_step=self.step if cfg.checkpoint.resume else None)
        summary: dict[str, Any] = {"start_step": self.step}
        t_start = time.perf_counter()
        try:
            while self.step < cfg.train.steps:
                if self.step >= g.warmup_steps and g.kl_coef > 0 and self.ref is None:
                    self.ref = self._snapshot_reference()
                rec = self.sft_step() if self.step < g.warmup_steps else self.grpo_step()
                self.step += 1
                rec.update(step=self.step, total_steps=cfg.train.steps)
                if not all(v == v for v in rec.values() if isinstance(v, float)):
                    raise UserError(f"step {self.step}: a metric is NaN ({rec}); lower lr_schedule.learning_rate")
                if self.step % cfg.logging.log_interval == 0 or self.step == cfg.train.steps:
                    writer.write(rec)
                    self.log(format_line(rec))
                if rec["kind"] == "grpo":
                    summary["reward_mean"] = rec["reward_mean"]
                if cfg.checkpoint.save_steps and self.step % cfg.checkpoint.save_steps == 0:
                    self.log(f"saved {self.save()}")
                    self.saved_step = self.step
            if cfg.checkpoint.save_at_end and self.saved_step != self.step:
                self.log(f"saved {self.save()}")
        finally:
            writer.close()
        summary.update(steps=self.step, seconds=time.perf_counter() - t_start)
        if cfg.checkpoint.export_hf:
            from dsv3.checkpoint.save import save_pretrained

            summary["hf_dir"] = str(save_pretrained(self.policy, self.run_dir / "hf", tokenizer=None))
        if cfg.logging.plots:
            from dsv3.train.plot import plots_after_training

            summary["plots"] = [str(p) for p in plots_after_training(self.run_dir, self.log)]
        return summary

    def close(self) -> None:
        self.llm.shutdown()


def format_line(r: dict[str, Any]) -> str:
    head = f"step {r['step']}/{r['total_steps']} | {r['kind']}"
    if r["kind"] == "sft":
        return f"{head} | loss {r['loss']:.4f} | lr {r['lr']:.3e} | gnorm {r['grad_norm']:.3f} | {r['tokens_per_s']:.0f} tok/s"
    return (f"{head} | reward {r['reward_mean']:.3f} | kl {r['kl']:.2e} | logprob mismatch {r['logprob_mismatch_tokens']} "
            f"tokens (max {r['logprob_mismatch_max']:.1e}) | clip {r['clip_frac']:.2f} | {_agreement(r)}lr {r['lr']:.3e} | "
            f"gnorm {r['grad_norm']:.3f} | {r['tokens_per_s']:.0f} tok/s")


def _agreement(r: dict[str, Any]) -> str:
    a = r.get("routing_agreement")
    return "routing agreement " + " ".join("-" if x is None else f"{x:.3f}" for x in a) + " | " if a else ""


def _rng_to_state(state: tuple) -> dict[str, Any]:
    """random.Random state as tensors/ints (checkpoints load with weights_only)."""
    version, internal, gauss = state
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _rng_from_state(d: dict[str, Any]) -> tuple:
    return d["version"], tuple(int(x) for x in d["internal"].tolist()), d["gauss"]


def run_grpo(config: str | Path, overrides: list[str], dump_config: bool) -> int:
    """`dsv3 train` on a run YAML with a `grpo:` section."""
    from dsv3.rl.config import load_grpo_config

    cfg = load_grpo_config(config, overrides)
    if dump_config:
        import yaml

        from dsv3.config.load import to_dict

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    run = GRPORun(cfg)
    try:
        summary = run.fit()
    finally:
        run.close()
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, list)}))
    return 0
