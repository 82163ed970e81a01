"""Training speed of dsv3 vs transformers' DeepseekV3ForCausalLM, same config, same AdamW, same run.

    flock /tmp/dsv3-bench.lock python bench/bench_train.py            # seed 1B config, seq 256, batch 1, fp32, CPU

One optimizer step = forward, cross-entropy (dsv3: its trainer's fused head + cross-entropy;
transformers: `model(x).logits` then the same fp32 cross-entropy), backward, grad-norm clip (1.0), AdamW step
(β 0.9/0.95, eps 1e-8, wd 0.1 on matrices; `dsv3.train.optim.build_optimizer` for both models),
zero_grad; dsv3 also does its aux-loss-free bias update. MTP is off in both (transformers has no MTP
module), as is the sequence-wise aux loss. Each implementation runs in its own subprocess (a 1B model
with AdamW states takes ~16 GB in fp32, two would not fit) on the same token batches;
`--warmup` steps are excluded; tokens/s is taken from the median step (mean and best are recorded too).
Writes bench/results/train.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def model_config(args):
    from dsv3.config.presets import load_model_config

    cfg = load_model_config(args.config)
    return dataclasses.replace(cfg, num_nextn_predict_layers=0, aux_loss_alpha=0.0)


def build(impl: str, cfg):
    torch.manual_seed(0)
    if impl == "dsv3":
        from dsv3.model import Transformer

        model = Transformer(cfg)
        model.reset_parameters()
        return model.train()
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from dsv3.config.hf import to_hf_dict

    hf_cfg = DeepseekV3Config(**{k: v for k, v in to_hf_dict(cfg).items() if k not in ("architectures", "model_type")})
    hf_cfg.torch_dtype = torch.float32
    model = DeepseekV3ForCausalLM(hf_cfg).float()
    return model.train()


def child(args) -> dict:
    """Time `args.steps` training steps of one implementation; prints one JSON line."""
    from dsv3.config.train import LRScheduleConfig, OptimizerConfig
    from dsv3.train.balance import balance_step
    from dsv3.train.loss import compute_loss, mean_ce
    from dsv3.train.optim import build_optimizer

    cfg = model_config(args)
    model = build(args.impl, cfg)
    opt = build_optimizer(model, OptimizerConfig(), LRScheduleConfig())
    moe = model.moe_layers() if args.impl == "dsv3" else []
    gen = torch.Generator().manual_seed(1234)
    batches = [torch.randint(2, 128000, (args.batch, args.seq + 1), generator=gen) for _ in range(args.warmup + args.steps)]
    losses, times = [], []
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        x, y = b[:, :-1], b[:, 1:]
        mask = torch.ones_like(y, dtype=torch.float32)
        if args.impl == "dsv3":  # the trainer's step: fused head + cross-entropy
            loss, _ = compute_loss(model, {"tokens": x, "labels": y, "loss_mask": mask}, mtp_loss_factor=0.0)
        else:
            loss = mean_ce(model(x).logits, y, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        balance_step(moe, 0.001)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    measured = times[args.warmup:]
    n_params = sum(p.numel() for p in model.parameters())
    tokens = args.batch * args.seq
    # the median step: the machine is shared, and a step slowed by another process is not this code's time
    return {"impl": args.impl, "params": n_params, "step_seconds": measured, "losses": losses,
            "tokens_per_s": tokens / statistics.median(measured), "tokens_per_s_mean": tokens * len(measured) / sum(measured),
            "tokens_per_s_best": tokens / min(measured)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "deepseek_v3_1b.yaml"))
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--impl", choices=("dsv3", "hf"), default=None, help="(internal) run one implementation and print JSON")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "train.json"))
    args = p.parse_args()
    if args.impl:
        print(json.dumps(child(args)))
        return 0
    results = {}
    for impl in ("hf", "dsv3"):
        cmd = [sys.executable, __file__, "--impl", impl, "--config", args.config, "--seq", str(args.seq),
               "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return out.returncode
        results[impl] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{impl}: {results[impl]['tokens_per_s']:.2f} tokens/s  (steps {['%.2f' % s for s in results[impl]['step_seconds']]} s)", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    report = {
        "benchmark": "train_step", "config": os.path.relpath(args.config, REPO), "seq": args.seq, "batch": args.batch,
        "dtype": "float32", "device": "cpu", "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "commit": commit, "warmup_steps": args.warmup, "measured_steps": args.steps,
        "mtp": False, "optimizer": "AdamW(0.9, 0.95, eps 1e-8, wd 0.1 on matrices, fused), clip 1.0",
        "dsv3_tokens_per_s": results["dsv3"]["tokens_per_s"], "hf_tokens_per_s": results["hf"]["tokens_per_s"],
        "speedup": results["dsv3"]["tokens_per_s"] / results["hf"]["tokens_per_s"],
        "speedup_best_step": results["dsv3"]["tokens_per_s_best"] / results["hf"]["tokens_per_s_best"],
        "load_average_after": os.getloadavg(), "runs": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    tmp.replace(args.out)
    print(f"speedup {report['speedup']:.2f}x -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
