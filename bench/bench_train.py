"""Training speed of dsv3 vs transformers' DeepseekV3ForCausalLM: same config, same weights, same batches,
same AdamW, same run, interleaved repetitions.

    flock /tmp/dsv3-bench.lock python bench/bench_train.py        # seed 1B config, seq 256, batch 1, fp32, CPU
    python bench/bench_train.py --config configs/tiny.yaml --seq 32 --steps 2 --rounds 1 --out /tmp/t.json  # smoke

The parent builds the dsv3 model once (seed 0), writes it with `save_pretrained` to a temporary
directory beside a random-token dataset (`.bin/.idx`); every child loads those weights and times
`--warmup` + `--steps` optimizer steps on the same batches from the same loader. A 1B model with AdamW
states takes ~16 GB in fp32, so the two implementations run in separate subprocesses, `--rounds`
times, alternating which goes first (step times on a shared VM swing ±30%: compare best steps).

One optimizer step, dsv3: `Trainer.train_step`, exactly what `dsv3 train` runs (weights through
`train.init_from`; fused head + cross-entropy; the clip folded into the fused AdamW; the aux-loss-free
bias update; `train.cpu_allocator` cache, which `--cpu-allocator system` turns off).
transformers: `model(x).logits`, the same fp32 cross-entropy, backward, torch's `clip_grad_norm_`
(1.0), the same AdamW (`dsv3.train.optim.build_optimizer`: β 0.9/0.95, eps 1e-8, wd 0.1 on matrices,
torch's fused kernel), zero_grad. MTP and the sequence-wise aux loss are off in both (transformers
has no MTP module). The first step's loss of both is recorded: same weights and batch, so they must
agree (`first_loss_abs_diff`).

Writes bench/results/train.json: tokens/s by best and by median step of each implementation, the
speedups, every step time, the command, commit, versions, and the load average before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

from dsv3.bench.provenance import provenance  # noqa: E402


def model_config(config: str):
    from dsv3.config.presets import load_model_config

    cfg = load_model_config(config)
    return dataclasses.replace(cfg, num_nextn_predict_layers=0, aux_loss_alpha=0.0)


def write_weights(args, path: Path) -> None:
    """The shared weights: dsv3's own init (seed 0), saved in HF format."""
    from dsv3.model import Transformer

    torch.manual_seed(0)
    model = Transformer(model_config(args.config))
    model.reset_parameters()
    model.save_pretrained(path)


def run_config(args):
    """The run both children train: the benchmark's model, the shared weights (`train.init_from`), the
    token dataset the parent wrote, batch x seq, no MTP, no evaluation; torch's fused AdamW (fp32 states)."""
    from dsv3.config.train import CheckpointConfig, DataConfig, EvalConfig, RunConfig, TrainConfig

    cfg = RunConfig(model=model_config(args.config),
                    data=DataConfig(data_path=[args.data], split="100,0,0", seq_length=args.seq),
                    train=TrainConfig(steps=args.warmup + args.steps, batch_size=args.batch, init_from=args.weights,
                                      device="cpu", precision="fp32", mtp_loss_factor=0.0, bias_update_rate=0.001,
                                      cpu_allocator=args.cpu_allocator),
                    checkpoint=CheckpointConfig(output_dir=str(Path(args.data).parent / f"run-{os.getpid()}")),
                    eval=EvalConfig(eval_steps=0, eval_at_end=False))
    cfg.validate()
    return cfg


def child(args) -> dict:
    """Time `args.warmup + args.steps` training steps of one implementation; prints one JSON line.

    dsv3: `Trainer.train_step`, the step `dsv3 train` runs (data loader, fused head + cross-entropy,
    clip folded into the fused AdamW, aux-loss-free bias update, `train.cpu_allocator`).
    transformers: the same batches from the same loader, `model(x).logits`, the same fp32
    cross-entropy, torch's `clip_grad_norm_`, the same AdamW (`dsv3.train.optim.build_optimizer`)."""
    from dsv3.train.loss import mean_ce
    from dsv3.train.optim import build_optimizer
    from dsv3.train.trainer import Trainer, build_data

    cfg = run_config(args)
    losses, times = [], []
    if args.impl == "dsv3":
        trainer = Trainer(cfg, quiet=True)
        model = trainer.model
        for _ in range(cfg.train.steps):
            t0 = time.perf_counter()
            rec = trainer.train_step()
            times.append(time.perf_counter() - t0)
            losses.append(rec["lm_loss"])
        extra = {"moe_impl": model.config.moe_impl, "attn_impl": model.config.attn_impl,
                 "cpu_allocator": cfg.train.cpu_allocator}
    else:
        from transformers import DeepseekV3ForCausalLM

        model = DeepseekV3ForCausalLM.from_pretrained(args.weights, dtype=torch.float32).train()
        opt = build_optimizer(model, cfg.optimizer, cfg.lr_schedule)
        batches = iter(build_data(cfg, 1).train)
        for _ in range(cfg.train.steps):
            b = next(batches)
            t0 = time.perf_counter()
            loss = mean_ce(model(b["tokens"]).logits, b["labels"], b["loss_mask"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.clip_grad)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
        extra = {"experts_implementation": getattr(model.config, "_experts_implementation", None),
                 "attn_implementation": getattr(model.config, "_attn_implementation", None)}
    return {"impl": args.impl, "params": sum(p.numel() for p in model.parameters()), "step_seconds": times[args.warmup:],
            "warmup_seconds": times[: args.warmup], "losses": losses, **extra}


def write_tokens(args, prefix: str) -> None:
    """Random token documents of seq + 1 tokens, enough for every step (both children read the same)."""
    from dsv3.data.indexed_dataset import IndexedDatasetBuilder

    gen = torch.Generator().manual_seed(1234)
    vocab = model_config(args.config).vocab_size
    b = IndexedDatasetBuilder(prefix + ".bin")
    for _ in range((args.warmup + args.steps) * args.batch + 2):
        b.add_document(torch.randint(2, vocab, (args.seq + 1,), generator=gen).numpy(), [args.seq + 1])
    b.finalize(prefix + ".idx")


def summary(runs: list[dict], tokens: int) -> dict:
    steps = [s for r in runs for s in r["step_seconds"]]
    return {"best_step_s": min(steps), "median_step_s": statistics.median(steps), "tokens_per_s_best": tokens / min(steps),
            "tokens_per_s_median": tokens / statistics.median(steps), "steps": len(steps)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "deepseek_v3_1b.yaml"))
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=4, help="measured steps per child")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per child (dsv3's cached heap grows during the first two)")
    p.add_argument("--rounds", type=int, default=3, help="children per implementation, alternating order")
    p.add_argument("--impl", choices=("dsv3", "hf"), default=None, help="(internal) run one implementation and print JSON")
    p.add_argument("--weights", default=None, help="(internal) the shared HF-format weights directory")
    p.add_argument("--data", default=None, help="(internal) the shared token dataset prefix")
    p.add_argument("--cpu-allocator", choices=("cache", "system"), default="cache",
                   help="dsv3's train.cpu_allocator (default: cache, as `dsv3 train`)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "train.json"))
    args = p.parse_args()
    if args.impl:
        print(json.dumps(child(args)))
        return 0
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {"hf": [], "dsv3": []}
    with tempfile.TemporaryDirectory(prefix="dsv3-bench-train-") as weights:
        write_weights(args, Path(weights))
        data = str(Path(weights) / "tokens_text_document")
        write_tokens(args, data)
        for r in range(args.rounds):
            for impl in (("hf", "dsv3") if r % 2 == 0 else ("dsv3", "hf")):
                cmd = [sys.executable, __file__, "--impl", impl, "--weights", weights, "--data", data, "--seq", str(args.seq),
                       "--cpu-allocator", args.cpu_allocator, "--config", args.config,
                       "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    print(out.stderr[-3000:], file=sys.stderr)
                    return out.returncode
                runs[impl].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"round {r} {impl}: steps {['%.2f' % s for s in runs[impl][-1]['step_seconds']]} s", flush=True)
    tokens = args.batch * args.seq
    hf, ds = summary(runs["hf"], tokens), summary(runs["dsv3"], tokens)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                                cwd=REPO).stdout.strip())
    import transformers

    report = {
        "benchmark": "train_step", "command": shlex.join([Path(sys.executable).name] + sys.argv),
        "commit": commit + ("-dirty" if dirty else ""), "config": os.path.relpath(args.config, REPO), "seq": args.seq,
        "batch": args.batch, "dtype": "float32", "device": "cpu", "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "transformers": transformers.__version__,
        "rounds": args.rounds, "warmup_steps": args.warmup, "measured_steps_per_round": args.steps,
        "mtp": False, "cpu_allocator": args.cpu_allocator, "optimizer": "AdamW(0.9, 0.95, eps 1e-8, wd 0.1 on matrices, fused), clip 1.0",
        "dsv3": ds, "hf": hf,
        "speedup_best_step": ds["tokens_per_s_best"] / hf["tokens_per_s_best"],
        "speedup_median_step": ds["tokens_per_s_median"] / hf["tokens_per_s_median"],
        "first_loss": {"dsv3": runs["dsv3"][0]["losses"][0], "hf": runs["hf"][0]["losses"][0]},
        "first_loss_abs_diff": abs(runs["dsv3"][0]["losses"][0] - runs["hf"][0]["losses"][0]),
        "load_average_before": load_before, "load_average_after": os.getloadavg(), "runs": runs,
        "provenance": provenance(REPO),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    tmp.replace(args.out)
    print(f"dsv3 {ds['tokens_per_s_best']:.2f} tok/s best, {ds['tokens_per_s_median']:.2f} median; transformers "
          f"{hf['tokens_per_s_best']:.2f} / {hf['tokens_per_s_median']:.2f}; speedup {report['speedup_best_step']:.2f}x best, "
          f"{report['speedup_median_step']:.2f}x median; first-step loss |diff| {report['first_loss_abs_diff']:.2e} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
