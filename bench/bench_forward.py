"""Forward of a 512-token prompt: dsv3 vs transformers' DeepseekV3ForCausalLM, same weights, same run.

    flock /tmp/dsv3-bench.lock python bench/bench_forward.py [--config deepseek_v3_1b] [--tokens 512] [--quantization w8a8]

The seed 1B config (configs/deepseek_v3_1b.yaml) is built with random weights (init std 0.006,
random router bias), written with our `save_pretrained` and read back by transformers
(`from_pretrained`), so both models hold identical fp32 weights. Each model runs the same prompt
(full logits for every position, as a prefill / training forward does); timings alternate between
the two models after a warm-up. On a shared machine other processes only ever add time, so the
minimum over the runs is the headline figure (as `timeit` does); medians are recorded too. The
logits are compared, and the achieved GFLOP/s uses `dsv3 info`'s FLOP count.
Results go to bench/results/forward.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="deepseek_v3_1b", help="model preset (default: the seed 1B)")
    ap.add_argument("--tokens", type=int, default=512, help="prompt length (default 512)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per model (default 5)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--quantization", default=None, help="w8a8 | int8 | int4[:G] | fp8: quantise dsv3's weights (transformers stays fp32)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "forward.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import dataclasses

    import transformers
    from transformers import DeepseekV3ForCausalLM

    from dsv3.config.presets import load_model_config
    from dsv3.model import Transformer
    from dsv3.tools.decode_bound import process_memory

    cfg = load_model_config(args.config)
    cfg = dataclasses.replace(cfg, num_nextn_predict_layers=0, torch_dtype="float32")  # the forward never runs MTP
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.reset_parameters()
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.01)
    model.eval()

    with tempfile.TemporaryDirectory(prefix="dsv3-bench-") as tmp:
        model.save_pretrained(tmp)
        hf = DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    hf_impl = hf.config._attn_implementation
    quant = None
    if args.quantization:
        from dsv3.quant import quantize_model, resolve

        quant = quantize_model(model, resolve(args.quantization)).summary()

    ids = torch.randint(0, cfg.vocab_size, (1, args.tokens))
    with torch.inference_mode():
        ours_logits = model(ids)
        hf_logits = hf(ids).logits
        max_diff = (ours_logits - hf_logits).abs().max().item()
        del ours_logits, hf_logits
        ours_t, hf_t = [], []
        for _ in range(args.repeats):
            ours_t.append(timed(model, ids))
            hf_t.append(timed(hf, ids))
    ours, theirs = min(ours_t), min(hf_t)
    from dsv3.bench.provenance import provenance
    from dsv3.tools.info import account

    flops = account(cfg, seq_len=args.tokens).flops_per_token * args.tokens
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    result = {
        "benchmark": "forward",
        "config": args.config,
        "tokens": args.tokens,
        "dtype": "float32",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "dsv3_s": round(ours, 4),
        "transformers_s": round(theirs, 4),
        "speedup": round(theirs / ours, 3),
        "statistic": "min over runs",
        "dsv3_median_s": round(statistics.median(ours_t), 4),
        "transformers_median_s": round(statistics.median(hf_t), 4),
        "speedup_median": round(statistics.median(hf_t) / statistics.median(ours_t), 3),
        "forward_gflop": round(flops / 1e9, 1),
        "dsv3_gflops_per_s": round(flops / ours / 1e9, 1),
        "transformers_gflops_per_s": round(flops / theirs / 1e9, 1),
        "dsv3_runs_s": [round(t, 4) for t in ours_t],
        "transformers_runs_s": [round(t, 4) for t in hf_t],
        "dsv3_tokens_per_s": round(args.tokens / ours, 1),
        "transformers_tokens_per_s": round(args.tokens / theirs, 1),
        "max_abs_logit_diff": max_diff,
        "quantization": args.quantization or "none",
        "quantization_report": quant,
        **process_memory(),  # RSS of the process: both models
        "dsv3_impl": {"attn": cfg.attn_impl, "moe": cfg.moe_impl},
        "transformers_attn": hf_impl,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_commit": commit,
        "load_avg": os.getloadavg()[0],
        "provenance": provenance(ROOT),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.config}, {args.tokens} tokens, fp32 CPU, {result['threads']} threads, dsv3 quantization {result['quantization']}")
    print(f"  dsv3          {ours:.3f} s  ({result['dsv3_tokens_per_s']} tok/s)")
    print(f"  transformers  {theirs:.3f} s  ({result['transformers_tokens_per_s']} tok/s)")
    print(f"  speedup       {result['speedup']:.2f}x min-of-{args.repeats} ({result['speedup_median']:.2f}x by median), "
          f"{result['forward_gflop']} GFLOP per forward, max |logit diff| {max_diff:.2e}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
