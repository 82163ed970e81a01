"""Where a batch-1 decode step goes: torch.profiler over a few engine decode steps (seed 1B config,
random weights, prompt 128), printed as operator shares of the step. On a loaded machine read the
proportions, not the absolute times.

    python bench/profile_decode.py [--config deepseek_v3_1b] [--quantization int4] [--threads 1] [--steps 6]
"""

from __future__ import annotations

import argparse
import sys

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="deepseek_v3_1b")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rows", type=int, default=25, help="operators to list")
    ap.add_argument("--shapes", action="store_true", help="group operators by input shape")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from torch.profiler import ProfilerActivity, profile

    from dsv3.config.presets import load_model_config
    from dsv3.infer.engine import LLMEngine
    from dsv3.infer.sampling import SamplingParams
    from dsv3.model.transformer import Transformer

    cfg = load_model_config(args.config)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.reset_parameters(std=0.02)
    model.eval()
    engine = LLMEngine(model, None, max_num_seqs=args.batch, num_gpu_blocks=args.batch * (args.prompt_len // 16 + 4),
                       quantization=args.quantization)
    g = torch.Generator().manual_seed(0)
    for i in range(args.batch):
        engine.add_request(str(i), None, torch.randint(2, 100_000, (args.prompt_len,), generator=g).tolist(),
                           SamplingParams(temperature=0.0, max_tokens=args.steps + 3, min_tokens=args.steps + 3))
    engine.step()  # prefill(s)
    while engine.stats()["decode_steps"] < 1:
        engine.step()  # one warm decode step
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
        for _ in range(args.steps):
            engine.step()
    print(prof.key_averages(group_by_input_shape=args.shapes).table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
