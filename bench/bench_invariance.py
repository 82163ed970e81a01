"""The cost of batch invariance: the engine with `batch_invariant=True` against its default paths, and the
trainer's exact scoring (`dsv3.train.score`) against the default teacher-forced forward, same weights,
same process, as ratios (exact / default; below 1 = slower).

    flock /tmp/dsv3-bench.lock python bench/bench_invariance.py                  # seed 1B config, CPU fp32
    flock /tmp/dsv3-bench.lock python bench/bench_invariance.py --config tiny --prompt-len 16 --new-tokens 4 --repeats 1

Measured per path: decode tokens/s at batch 1 and at --batch (decode steps only, `bench_decode.time_dsv3`),
prefill tokens/s (one --prompt-len prompt, one token out; prefix caching off), and scoring tokens/s of a --prompt-len sequence,
forward + backward of the summed logprobs (default: `model(ids)` then log_softmax / gather). Best of
--repeats after a burn-in. Also recorded: whether the batched exact run reproduced the batch-1 tokens.
Writes bench/results/invariance.json (provenance: command, commit, load, CPU/ISA, threads).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from bench_decode import time_dsv3  # noqa: E402


def time_prefill(engine, prompt: list[int]) -> float:
    """Prompt tokens/s of one prefill (the request samples one token and ends)."""
    from dsv3.infer.sampling import SamplingParams

    engine.add_request(f"p{time.perf_counter_ns()}", None, prompt, SamplingParams(temperature=0.0, max_tokens=1))
    t = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return len(prompt) / (time.perf_counter() - t)


def time_scoring(model, ids: list[int], exact: bool) -> float:
    """Scored tokens/s, forward + backward of the summed teacher-forced logprobs of `ids`."""
    from dsv3.train.score import score_logprobs

    model.zero_grad(set_to_none=True)
    t = time.perf_counter()
    if exact:
        lp = score_logprobs(model, [ids])[0]
    else:
        x = torch.tensor([ids])
        lp = model(x[:, :-1]).float().log_softmax(-1).gather(-1, x[:, 1:, None])
    lp.sum().backward()
    return (len(ids) - 1) / (time.perf_counter() - t)


def measure(model, prompts: list[list[int]], args, exact: bool) -> dict:
    from dsv3.infer.engine import LLMEngine

    n = len(prompts)
    engine = LLMEngine(model, None, max_num_seqs=n, batch_invariant=exact, block_size=16, enable_prefix_caching=False,
                       num_gpu_blocks=n * (args.prompt_len + args.new_tokens) // 16 + 2 * n + 2)
    time_dsv3(engine, prompts[:1], 2)  # burn-in
    best: dict = {}
    for _ in range(args.repeats):
        b1, alone = time_dsv3(engine, prompts[:1], args.new_tokens)
        bn, batch = time_dsv3(engine, prompts, args.new_tokens)
        run = {"decode_b1_tok_s": b1, f"decode_b{n}_tok_s": bn, "prefill_tok_s": time_prefill(engine, prompts[-1]),
               "score_tok_s": time_scoring(model, prompts[0], exact)}
        best = {k: max(v, best.get(k, 0.0)) for k, v in run.items()}
        best["batch_tokens_equal_alone"] = best.get("batch_tokens_equal_alone", True) and batch[0] == alone[0]
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in best.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="deepseek_v3_1b")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "invariance.json"))
    args = ap.parse_args()

    from dsv3.bench.provenance import provenance
    from dsv3.bench.serve import write_json_atomic
    from dsv3.config.presets import load_model_config
    from dsv3.model.transformer import Transformer

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_model_config(args.config)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    model.reset_parameters(std=0.02)  # random weights, wide enough that greedy logits have no ties
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, min(cfg.vocab_size, 100_000), (args.prompt_len,), generator=g).tolist() for _ in range(args.batch)]
    paths = {"default": measure(model, prompts, args, False), "exact": measure(model, prompts, args, True)}
    d, e = paths["default"], paths["exact"]
    res = {
        "bench": "invariance", "config": args.config, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "batch": args.batch, "dtype": "float32", **paths,
        "ratios_exact_over_default": {k: round(e[k] / d[k], 3) for k in d if k.endswith("_tok_s")},
        "provenance": provenance(REPO),
    }
    print(json.dumps(res, indent=2))
    write_json_atomic(Path(args.out), res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
