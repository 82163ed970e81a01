"""Multi-turn chat with automatic prefix caching on vs off, and MTP speculative decoding speed-up at batch 1.

    flock /tmp/dsv3-bench.lock python bench/bench_multiturn.py                       # prefix caching, tiny random model
    python bench/bench_multiturn.py --model CKPT --conversations 8 --turns 6           # a real checkpoint
    python bench/bench_multiturn.py --mode spec --model CKPT --output-tokens 128       # MTP speculative, batch 1

prefix (default): `--conversations` chats run side by side for `--turns` turns; each turn re-sends the
whole conversation (system prompt + every earlier user message and answer) plus a new user message,
as a chat client does. The same workload runs on one engine with prefix caching and one without
(greedy, fixed output length, so both do the same work; their outputs are compared token by token).
Reported per mode: mean / median time to first token (request added -> first token out), output
tokens/s and requests/s over the whole run, the share of prompt tokens served from the cache; and
the on/off ratios. Prompts are random token ids (the cache sees only ids, so any text would do).

spec: one prompt at a time (batch 1), `--output-tokens` new tokens, greedy and sampled (temperature
`--temperature`), with and without MTP speculation; reported: decode tokens/s of each, the speed-up,
the draft acceptance rate (after the warm-up) and whether greedy outputs are identical. Prompts:
`--prompt` texts through the model folder's tokenizer (default PROMPTS below), else random ids.
Needs a checkpoint with trained MTP weights for a meaningful acceptance (a random model's MTP head
guesses at random); one trained on WikiText-2 (docs/inference.md):

    dsv3 quickstart --config configs/pretrain_mtp_cpu.yaml --out runs/mtp        # -> runs/mtp/run1/hf
    flock /tmp/dsv3-bench.lock python bench/bench_multiturn.py --mode spec --model runs/mtp/run1/hf --output-tokens 128

Timings on a loaded machine mean nothing; the lead runs this on a quiet one. Writes
bench/results/multiturn.json or bench/results/mtp_spec.json (temporary name, then renamed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from dsv3.bench.provenance import provenance  # noqa: E402
from dsv3.infer.engine import LLMEngine  # noqa: E402
from dsv3.infer.sampling import SamplingParams  # noqa: E402


def load(args, mtp: bool):
    """(model, where it came from): a checkpoint directory, else random weights of `--config`."""
    if args.model:
        import dsv3

        return dsv3.from_pretrained(args.model, dtype=torch.float32, mtp=mtp), args.model
    from dsv3.config.presets import load_model_config
    from dsv3.model.transformer import Transformer

    torch.manual_seed(0)
    m = Transformer(load_model_config(args.config))
    m.reset_parameters(std=0.05)
    return m.eval(), f"random {args.config}"


def ids(n: int, vocab: int, g: torch.Generator) -> list[int]:
    return torch.randint(3, min(vocab, 100_000), (n,), generator=g).tolist()


def run_turns(engine: LLMEngine, convs: list[list[list[int]]], out_tokens: int) -> dict:
    """All conversations advance one turn together; returns timings and every output."""
    sp = SamplingParams(temperature=0.0, max_tokens=out_tokens, min_tokens=out_tokens, ignore_eos=True)
    history = [[] for _ in convs]
    ttft, outputs, cached, prompt_tokens, n_out = [], [], 0, 0, 0
    t_start = time.perf_counter()
    for turn in range(len(convs[0])):
        added, first = {}, {}
        for i, conv in enumerate(convs):
            prompt = history[i] + conv[turn]
            history[i] = prompt
            rid = f"c{i}t{turn}"
            added[rid] = time.perf_counter()
            engine.add_request(rid, None, prompt, sp)
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id not in first and out.outputs[0].token_ids:
                    first[out.request_id] = time.perf_counter()
                if out.finished:
                    done[out.request_id] = out
        for i in range(len(convs)):
            out = done[f"c{i}t{turn}"]
            ttft.append(first[out.request_id] - added[out.request_id])
            cached += out.num_cached_tokens
            prompt_tokens += len(out.prompt_token_ids)
            n_out += len(out.outputs[0].token_ids)
            history[i] = history[i] + out.outputs[0].token_ids
            outputs.append(out.outputs[0].token_ids)
    wall = time.perf_counter() - t_start
    return {"mean_ttft_ms": 1000 * statistics.mean(ttft), "median_ttft_ms": 1000 * statistics.median(ttft),
            "output_throughput_tok_s": n_out / wall, "request_throughput_req_s": len(ttft) / wall, "wall_s": wall,
            "prompt_tokens": prompt_tokens, "cached_tokens": cached, "cached_fraction": cached / prompt_tokens,
            "outputs": outputs}


def bench_prefix(args) -> dict:
    model, source = load(args, mtp=False)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    system = ids(args.system_tokens, vocab, g)
    convs = [[system + ids(args.user_tokens, vocab, g)] + [ids(args.user_tokens, vocab, g) for _ in range(args.turns - 1)]
             for _ in range(args.conversations)]
    need = args.system_tokens + args.turns * (args.user_tokens + args.output_tokens) + 1
    res = {}
    for mode, on in (("caching_on", True), ("caching_off", False)):
        eng = LLMEngine(model, None, max_num_seqs=args.conversations, block_size=args.block_size, enable_prefix_caching=on,
                        max_model_len=max(need, 64), max_num_batched_tokens=args.max_num_batched_tokens)
        run_turns(eng, [[c[0][:8]] for c in convs[:1]], 2)  # warm-up (not timed)
        eng = LLMEngine(model, None, max_num_seqs=args.conversations, block_size=args.block_size, enable_prefix_caching=on,
                        max_model_len=max(need, 64), max_num_batched_tokens=args.max_num_batched_tokens)
        res[mode] = run_turns(eng, convs, args.output_tokens)
        res[mode]["engine_stats"] = eng.stats()
    same = res["caching_on"].pop("outputs") == res["caching_off"].pop("outputs")
    on, off = res["caching_on"], res["caching_off"]
    return {"model": source, "conversations": args.conversations, "turns": args.turns, "system_tokens": args.system_tokens,
            "user_tokens": args.user_tokens, "output_tokens": args.output_tokens, "block_size": args.block_size,
            "threads": torch.get_num_threads(), "outputs_identical": same, **res,
            "ttft_ratio_off_over_on": off["mean_ttft_ms"] / on["mean_ttft_ms"],
            "throughput_ratio_on_over_off": on["output_throughput_tok_s"] / off["output_throughput_tok_s"]}


PROMPTS = ("The history of the city", "In 1998 , the band released", "The game 's plot follows",
           "= Early life =\n\nHe was born in")  # WikiText-2-like openings (spec mode, with a tokenizer)


def decode_rate(eng: LLMEngine, prompt: list[int], sp: SamplingParams) -> tuple[int, float, list[int]]:
    """(decode tokens, decode seconds, output ids) of one request: time after its first token (the
    prefill is excluded)."""
    eng.add_request("s", None, prompt, sp)
    t_first, out = None, None
    while eng.has_unfinished_requests():
        for o in eng.step():
            if t_first is None and o.outputs[0].token_ids:
                t_first, n_first = time.perf_counter(), len(o.outputs[0].token_ids)
            out = o
    toks = out.outputs[0].token_ids
    return len(toks) - n_first, time.perf_counter() - t_first, toks


def spec_prompts(args, vocab: int) -> tuple[list[list[int]], str]:
    """Prompt ids: `--prompt` texts (default PROMPTS) through the model folder's tokenizer, else random ids."""
    if args.model:
        from dsv3.data.tokenizer import load_tokenizer
        from dsv3.errors import UserError

        try:
            tok = load_tokenizer(args.model)
        except UserError:
            tok = None
        if tok is not None:
            texts = args.prompt or list(PROMPTS)
            return [tok.encode(t, add_bos=True) for t in texts], "text"
    g = torch.Generator().manual_seed(0)
    return [ids(args.user_tokens, vocab, g) for _ in range(args.num_prompts)], "random ids"


def bench_spec(args) -> dict:
    model, source = load(args, mtp=True)
    prompts, kind = spec_prompts(args, model.config.vocab_size)
    n = args.output_tokens
    res = {"model": source, "prompts": kind, "num_prompts": len(prompts), "prompt_tokens": [len(p) for p in prompts],
           "output_tokens": n, "threads": torch.get_num_threads()}
    for name, sp in (("greedy", SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True)),
                     ("sampled", SamplingParams(temperature=args.temperature, seed=0, max_tokens=n, min_tokens=n, ignore_eos=True))):
        row, outs = {}, {}
        for label, spec in (("plain", False), ("speculative", True)):
            need = max(map(len, prompts)) + n + 8
            eng = LLMEngine(model, None, max_num_seqs=1, block_size=args.block_size, speculative=spec, max_model_len=need,
                            num_gpu_blocks=-(-need // args.block_size) + 2)
            decode_rate(eng, prompts[0][:8], SamplingParams(temperature=0.0, max_tokens=4))  # warm-up (not counted)
            before = eng.stats()
            runs = [decode_rate(eng, p, sp) for p in prompts]
            row[f"{label}_decode_tok_s"] = sum(r[0] for r in runs) / max(sum(r[1] for r in runs), 1e-9)
            outs[label] = [r[2] for r in runs]
            if spec:
                st = eng.stats()
                drafts = st["spec_num_draft_tokens"] - before["spec_num_draft_tokens"]
                row["acceptance_rate"] = (st["spec_num_accepted_tokens"] - before["spec_num_accepted_tokens"]) / max(drafts, 1)
                row["drafts"] = drafts
                row["spec_steps"] = st["spec_steps"] - before["spec_steps"]
        row["speedup"] = row["speculative_decode_tok_s"] / row["plain_decode_tok_s"]
        if name == "greedy":  # greedy speculation must not change a single token
            row["outputs_identical"] = outs["speculative"] == outs["plain"]
            greedy_out = outs["plain"][0]
        res[name] = row
    if res["prompts"] == "text":  # what the model writes (acceptance depends on it)
        from dsv3.data.tokenizer import load_tokenizer

        res["greedy_text_of_prompt_1"] = load_tokenizer(args.model).decode(greedy_out)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["prefix", "spec"], default="prefix")
    ap.add_argument("--model", help="checkpoint directory (default: random weights of --config)")
    ap.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--system-tokens", type=int, default=256)
    ap.add_argument("--user-tokens", type=int, default=64)
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--temperature", type=float, default=0.7, help="spec mode: temperature of the sampled run")
    ap.add_argument("--prompt", action="append", help="spec mode: prompt text (repeatable; default: a few WikiText-like openings; "
                    "needs the model folder's tokenizer, else random ids)")
    ap.add_argument("--num-prompts", type=int, default=4, help="spec mode without a tokenizer: random-id prompts of --user-tokens")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--out", help="result JSON (default bench/results/multiturn.json or mtp_spec.json)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with torch.inference_mode():
        result = bench_prefix(args) if args.mode == "prefix" else bench_spec(args)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    result.update(command="python bench/bench_multiturn.py " + " ".join(sys.argv[1:]), git_commit=commit, torch=torch.__version__,
                  load_avg_1_5_15_before=list(load_before), load_avg_1_5_15_after=list(os.getloadavg()),
                  provenance=provenance(REPO))
    out = Path(args.out or REPO / "bench" / "results" / ("multiturn.json" if args.mode == "prefix" else "mtp_spec.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=2))
    for k, v in result.items():
        if isinstance(v, dict):
            print(k, json.dumps({kk: vv for kk, vv in v.items() if not isinstance(vv, (dict, list))}))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
