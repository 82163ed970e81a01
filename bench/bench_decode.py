"""Decode speed of the dsv3 engine vs transformers' `generate`, same weights, same process.

    flock /tmp/dsv3-bench.lock python bench/bench_decode.py            # seed 1B config, CPU fp32
    flock /tmp/dsv3-bench.lock python bench/bench_decode.py --quantization int4 --out bench/results/decode_int4.json

Both models share every weight tensor (transformers' fused expert gate_up_proj is the only copy), so
the comparison is memory-fair. Decode tokens/s = (new tokens - 1) / (time of the whole generation -
time of a 1-token generation), i.e. prefill excluded, for both. One burn-in run of each is excluded.
Each torch thread count in --threads is measured for both engines; the best of each is compared.
Also reported: the measured streaming-read bandwidth and the bandwidth bound on batch-1 decode
(bytes of weights one token reads: attention, dense MLPs, shared experts, top-k routed experts, head).
Writes bench/results/decode.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def hf_twin(model):
    """A transformers DeepseekV3ForCausalLM whose parameters are our tensors (expert gate/up fused: one copy)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    from dsv3.config.hf import to_hf_dict

    cfg = model.config
    hf_cfg = DeepseekV3Config(**{k: v for k, v in to_hf_dict(cfg).items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        hf = DeepseekV3ForCausalLM(hf_cfg)
    sd = {}
    for name, t in model.state_dict().items():
        if ".mtp." in name or name.startswith("rotary."):
            continue
        if name.endswith("experts.gate_proj"):
            sd[name.replace("gate_proj", "gate_up_proj")] = torch.cat([t, model.state_dict()[name.replace("gate_proj", "up_proj")]], dim=1)
        elif name.endswith("experts.up_proj"):
            continue
        else:
            sd[name] = t
    hf.load_state_dict(sd, strict=True, assign=True)
    hf.model.rotary_emb = DeepseekV3RotaryEmbedding(hf_cfg)  # non-persistent buffers were on meta
    return hf.eval()


def weight_bytes_per_token(model) -> int:
    """Bytes of weights a batch-1 decode step must read (the embedding reads one row); quantised
    modules count their stored weights and scales (`dsv3.quant`)."""
    cfg, total = model.config, 0
    for name, p in model.state_dict().items():
        if name.startswith("model.mtp.") or name == "model.embed_tokens.weight":
            continue
        if ".experts." in name:
            total += p.numel() * cfg.num_experts_per_tok // cfg.n_routed_experts * p.element_size()
        else:
            total += p.numel() * p.element_size()
    return total


def read_bandwidth(nbytes: int = 1 << 29) -> float:
    """Streaming-read GB/s of this machine (sum over a large fp32 tensor, best of 5)."""
    x = torch.ones(nbytes // 4)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


@torch.inference_mode()
def time_hf(hf, prompt: torch.Tensor, new: int) -> tuple[float, list[int]]:
    def gen(n):
        t = time.perf_counter()
        out = hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                          attention_mask=torch.ones_like(prompt))
        return time.perf_counter() - t, out[0, prompt.shape[1]:].tolist()

    gen(2)  # burn-in
    t1, _ = gen(1)
    tn, toks = gen(new)
    return (new - 1) / (tn - t1), toks


def time_dsv3(engine, prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
    """Decode tokens/s (aggregate over the batch): time of decode steps only."""
    from dsv3.infer.sampling import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=new, min_tokens=new)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{time.perf_counter_ns()}-{i}", None, p, sp)
    decode_time, decode_tokens, out = 0.0, 0, {}
    while engine.has_unfinished_requests():
        before = engine.stats()["decode_tokens"]
        t = time.perf_counter()
        res = engine.step()
        dt = time.perf_counter() - t
        if engine.stats()["decode_tokens"] > before:
            decode_time += dt
            decode_tokens += engine.stats()["decode_tokens"] - before
        for o in res:
            if o.finished:
                out[o.request_id] = o.outputs[0].token_ids
    return decode_tokens / decode_time, [out[k] for k in sorted(out, key=lambda k: int(k.rsplit("-", 1)[1]))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="deepseek_v3_1b")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers (dsv3 only)")
    ap.add_argument("--quantization", default=None, help="w8a8 | int8 | int4[:G] | fp8: quantise dsv3's weights (transformers stays fp32)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to measure (best is reported)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "decode.json"))
    args = ap.parse_args()

    from dsv3.bench.provenance import provenance
    from dsv3.config.load import to_dict
    from dsv3.config.presets import load_model_config
    from dsv3.infer.engine import LLMEngine, resolve_dtype
    from dsv3.model.transformer import Transformer
    from dsv3.tools.decode_bound import process_memory

    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    cfg = load_model_config(args.config)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg)
    model.reset_parameters(std=0.02)  # wide enough that greedy logits have no ties
    model = model.to(dtype).eval()
    hf = hf_twin(model) if not args.no_hf else None  # shares the dense tensors, built before quantising ours
    quant = None
    if args.quantization:
        from dsv3.quant import quantize_model, resolve

        quant = quantize_model(model, resolve(args.quantization)).summary()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 100_000, (args.prompt_len,), generator=g).tolist() for _ in range(args.batch)]
    engine = LLMEngine(model, None, max_num_seqs=args.batch, max_model_len=4 * (args.prompt_len + args.new_tokens),
                       num_gpu_blocks=args.batch * (args.prompt_len + args.new_tokens) // 16 + args.batch * 2, block_size=16)

    runs = {}
    for threads in args.threads:
        # On a shared 2-core machine, one thread can beat two (no waiting at OpenMP barriers for a
        # descheduled sibling), so every thread count is measured, for both engines, and the best kept.
        torch.set_num_threads(threads)
        r = runs[threads] = {}
        time_dsv3(engine, prompts[:1], 4)  # burn-in
        r["dsv3_b1_tok_s"], ours_tokens = time_dsv3(engine, prompts[:1], args.new_tokens)
        r[f"dsv3_b{args.batch}_tok_s"], ours_batch_tokens = time_dsv3(engine, prompts, args.new_tokens)
        r["batch_tokens_equal_alone"] = ours_batch_tokens[0] == ours_tokens[0]
        if device.type == "cpu":
            r["read_bandwidth_GBps"] = read_bandwidth()
        if not args.no_hf:
            r["hf_b1_tok_s"], hf_tokens = time_hf(hf, torch.tensor([prompts[0]], device=device), args.new_tokens)
            r["greedy_tokens_equal_hf"] = hf_tokens == ours_tokens[0]
        print(threads, "threads:", json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}), flush=True)

    def best(key):
        return max(r[key] for r in runs.values())

    b1, bn = best("dsv3_b1_tok_s"), best(f"dsv3_b{args.batch}_tok_s")
    res = {
        "bench": "decode", "config": args.config,
        "config_hash": hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:12],
        "git_commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip(),
        "device": str(device) if device.type != "cpu" else f"cpu ({os.cpu_count()} cores)",
        "load_average_1min": round(os.getloadavg()[0], 2),
        "dtype": str(dtype).replace("torch.", ""), "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "torch": torch.__version__,
        "dsv3_b1_tok_s": round(b1, 3),
        f"dsv3_b{args.batch}_tok_s": round(bn, 3),
        f"batch{args.batch}_over_batch1": round(bn / b1, 2),
        "batch_tokens_equal_alone": all(r["batch_tokens_equal_alone"] for r in runs.values()),
        "quantization": args.quantization or "none", "quantization_report": quant,
        **process_memory(),  # RSS of the process: dsv3 (quantised) + the transformers twin when it runs
        "kv_cache": engine.cache_info(),
        "per_thread_count": {t: {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for t, r in runs.items()},
    }
    if device.type == "cpu":
        bw = best("read_bandwidth_GBps")
        wb = weight_bytes_per_token(model)
        res.update(read_bandwidth_GBps=round(bw, 2), weight_bytes_per_token=wb, bandwidth_bound_b1_tok_s=round(bw * 1e9 / wb, 2),
                   dsv3_b1_fraction_of_bound=round(b1 / (bw * 1e9 / wb), 3))
    if not args.no_hf:
        import transformers

        hf_b1 = best("hf_b1_tok_s")
        res.update(transformers=transformers.__version__, hf_b1_tok_s=round(hf_b1, 3), dsv3_over_hf_b1=round(b1 / hf_b1, 2),
                   greedy_tokens_equal_hf=all(r["greedy_tokens_equal_hf"] for r in runs.values()))
    res["provenance"] = provenance(REPO)
    print(json.dumps(res, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
