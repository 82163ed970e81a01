"""`dsv3 bench throughput` and `dsv3 bench latency`: the engine in-process, no HTTP.

throughput (vLLM `benchmark_throughput.py`): every prompt is added at once, the engine steps until
all finish; requests/s and tokens/s over the wall time.
latency (vLLM `benchmark_latency.py`): one batch of random token-id prompts, `ignore_eos`,
temperature 1.0, timed end to end; warm-up iterations are not timed; avg and percentiles (s).
"""

from __future__ import annotations

import random
import time

import numpy as np

from dsv3.bench.datasets import SampleRequest


def run_to_completion(engine, prompts: list[list[int]], params_list, texts: list[str | None] | None = None,
                      pbar=None, prefix: str = "b") -> list:
    """Add every prompt, step until all finish; -> final RequestOutputs in prompt order."""
    final: dict[str, object] = {}
    ids = [f"{prefix}-{i}" for i in range(len(prompts))]
    for i, (rid, p, sp) in enumerate(zip(ids, prompts, params_list)):
        engine.add_request(rid, texts[i] if texts else None, p, sp)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished and out.request_id not in final:
                final[out.request_id] = out
                if pbar is not None:
                    pbar.update(1)
    return [final[r] for r in ids]


def throughput(engine, requests: list[SampleRequest], temperature: float = 1.0, disable_tqdm: bool = False) -> dict:
    from dsv3.infer.sampling import SamplingParams

    tok = engine.tokenizer
    prompts = [tok.encode(r.prompt, add_bos=tok.add_bos_token) for r in requests]
    params = [SamplingParams(temperature=temperature, top_p=1.0, ignore_eos=True, max_tokens=r.expected_output_len)
              for r in requests]
    pbar = None
    if not disable_tqdm:
        from tqdm.auto import tqdm

        pbar = tqdm(total=len(requests), desc="requests")
    t0 = time.perf_counter()
    outs = run_to_completion(engine, prompts, params, pbar=pbar, prefix="tput")
    elapsed = time.perf_counter() - t0
    if pbar is not None:
        pbar.close()
    n_prompt = sum(len(p) for p in prompts)
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "elapsed_time": elapsed,
        "num_requests": len(requests),
        "total_num_tokens": n_prompt + n_out,
        "total_prompt_tokens": n_prompt,
        "total_output_tokens": n_out,
        "requests_per_second": len(requests) / elapsed,
        "tokens_per_second": (n_prompt + n_out) / elapsed,
        "output_tokens_per_second": n_out / elapsed,
    }


PERCENTILES = (10, 25, 50, 75, 90, 99)


def latency(engine, batch_size: int, input_len: int, output_len: int, num_iters_warmup: int, num_iters: int,
            n: int = 1, seed: int = 0, disable_tqdm: bool = False) -> dict:
    from dsv3.infer.sampling import SamplingParams

    rng = random.Random(seed)
    # vLLM: np.random.randint(10000, size=(batch, input_len)); ids >= 100 skip the special tokens
    prompts = [[rng.randrange(100, 10000) for _ in range(input_len)] for _ in range(batch_size)]
    params = [SamplingParams(n=n, temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=output_len)
              for _ in prompts]

    def once(tag: str) -> float:
        t0 = time.perf_counter()
        run_to_completion(engine, prompts, params, prefix=tag)
        return time.perf_counter() - t0

    iters = range(num_iters_warmup)
    timed = range(num_iters)
    if not disable_tqdm:
        from tqdm.auto import tqdm

        iters, timed = tqdm(iters, desc="warm-up"), tqdm(timed, desc="timed")
    for i in iters:
        once(f"warm{i}")
    lat = np.array([once(f"it{i}") for i in timed])
    return {
        "avg_latency": float(lat.mean()),
        "std_latency": float(lat.std()),
        "latencies": lat.tolist(),
        "percentiles": {str(p): float(np.percentile(lat, p)) for p in PERCENTILES},
        "batch_size": batch_size, "input_len": input_len, "output_len": output_len, "n": n,
        "num_iters_warmup": num_iters_warmup, "num_iters": num_iters,
        "output_tokens_per_second": batch_size * n * output_len / float(lat.mean()),
    }
