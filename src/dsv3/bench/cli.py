"""`dsv3 bench serve | throughput | latency` (vLLM's three benchmarks, same flags and metrics)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dsv3 import threads
from dsv3.errors import UserError


def _dataset_args(p: argparse.ArgumentParser, default_in: int | None, default_out: int | None) -> None:
    """default_in / default_out None: `dsv3 bench serve` fills them in to fit the server's context."""
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset-name", default="random", choices=["random", "sonnet", "custom"])
    g.add_argument("--dataset-path", default=None,
                   help="custom: a JSONL file; sonnet: a text file of poem lines (vLLM's sonnet.txt; default built-in)")
    g.add_argument("--num-prompts", type=int, default=1000)
    g.add_argument("--seed", type=int, default=0)
    fit = " (default 1024, shortened to fit the server's max_model_len)" if default_in is None else ""
    g.add_argument("--random-input-len", "--input-len", dest="random_input_len", type=int, default=default_in,
                   help="prompt tokens" + fit)
    g.add_argument("--random-output-len", "--output-len", dest="random_output_len", type=int, default=default_out,
                   help="output tokens" + (" (default 128)" if default_out is None else ""))
    g.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len*(1-r), len*(1+r)]")
    g.add_argument("--random-prefix-len", type=int, default=0, help="shared random prefix tokens")
    g.add_argument("--sonnet-input-len", type=int, default=550)
    g.add_argument("--sonnet-output-len", type=int, default=150)
    g.add_argument("--sonnet-prefix-len", type=int, default=200)
    g.add_argument("--custom-output-len", type=int, default=256, help="output tokens for custom lines without one")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dsv3.serve.cli import add_vllm_compat_arguments

    sub = parser.add_subparsers(dest="bench", metavar="<benchmark>", required=True)

    s = sub.add_parser("serve", help="load an OpenAI-compatible server (TTFT, TPOT, ITL, E2EL, tok/s)")
    s.add_argument("--backend", default="vllm", choices=["vllm", "openai", "openai-chat"],
                   help="vllm / openai: /v1/completions; openai-chat: /v1/chat/completions (--endpoint decides)")
    s.add_argument("--base-url", default=None, help="server root, e.g. http://127.0.0.1:8000 (overrides host/port)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--endpoint", default=None,
                   help="default by backend; a path ending in /chat/completions sends chat messages, else a prompt")
    s.add_argument("--model", default=None, help="model id to send (default: the first of GET /v1/models); "
                   "a local model directory also gives the tokenizer, as in vLLM")
    s.add_argument("--tokenizer", default=None, help="tokenizer for prompt generation and token counts "
                   "(default: the one in --model when it is a directory, else the installed one)")
    s.add_argument("--api-key", default=None)
    _dataset_args(s, None, None)
    s.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (inf: all at once)")
    s.add_argument("--burstiness", type=float, default=1.0, help="Gamma shape of arrivals (1 = Poisson)")
    s.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    s.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (exact output lengths)")
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el")
    s.add_argument("--metric-percentiles", default="99")
    s.add_argument("--goodput", nargs="+", default=None, metavar="METRIC:MS", help="SLOs, e.g. ttft:500 tpot:50")
    s.add_argument("--save-result", action="store_true")
    s.add_argument("--result-dir", default=None)
    s.add_argument("--result-filename", default=None)
    s.add_argument("--metadata", nargs="*", default=None, metavar="KEY=VALUE")
    s.add_argument("--disable-tqdm", action="store_true")

    for name, help_ in (("throughput", "offline engine throughput, all prompts at once"),
                        ("latency", "offline engine latency of one batch")):
        q = sub.add_parser(name, help=help_)
        q.add_argument("--model", required=True, help="HF-format model directory")
        threads.add_argument(q)
        q.add_argument("--tokenizer", default=None)
        q.add_argument("--dtype", default="auto")
        q.add_argument("--device", default="auto")
        q.add_argument("--max-model-len", type=int, default=None)
        q.add_argument("--max-num-seqs", type=int, default=None)
        q.add_argument("--output-json", default=None, help="write the results here")
        q.add_argument("--disable-tqdm", action="store_true")
        add_vllm_compat_arguments(q)
        if name == "throughput":
            _dataset_args(q, 128, 128)
            q.add_argument("--temperature", type=float, default=1.0)
        else:
            q.add_argument("--input-len", type=int, default=32)
            q.add_argument("--output-len", type=int, default=128)
            q.add_argument("--batch-size", type=int, default=8)
            q.add_argument("--n", type=int, default=1)
            q.add_argument("--num-iters-warmup", type=int, default=10)
            q.add_argument("--num-iters", type=int, default=30)
            q.add_argument("--seed", type=int, default=0)


def make_requests(args, tokenizer):
    from dsv3.bench import datasets

    if args.num_prompts < 1:
        raise UserError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if args.dataset_name == "random":
        return datasets.random_dataset(tokenizer, args.num_prompts, args.random_input_len, args.random_output_len,
                                       args.random_range_ratio, args.random_prefix_len, args.seed)
    if args.dataset_name == "sonnet":
        lines = datasets.read_lines(args.dataset_path) if args.dataset_path else None
        return datasets.sonnet_dataset(tokenizer, args.num_prompts, args.sonnet_input_len, args.sonnet_output_len,
                                       args.sonnet_prefix_len, args.seed, lines=lines)
    if not args.dataset_path:
        raise UserError("--dataset-name custom needs --dataset-path FILE.jsonl")
    return datasets.custom_dataset(tokenizer, args.dataset_path, args.num_prompts, args.custom_output_len, args.seed)


def _model_tokenizer(model: str | None) -> str | None:
    """vLLM's bench loads the tokenizer from --model; we do so when it is a local directory holding one."""
    if model and any((Path(model) / n).is_file() for n in ("tokenizer.json", "tokenizer.json.xz")):
        return model
    return None


def check_context(requests, max_model_len: int | None, where: str, bos: int = 0) -> None:
    """One clear line when a request cannot fit the model's context (instead of N failed requests)."""
    if not max_model_len:
        return
    worst = max(requests, key=lambda r: r.prompt_len + r.expected_output_len)
    need = worst.prompt_len + bos + worst.expected_output_len
    if need > max_model_len:
        raise UserError(f"requests need up to {need} tokens ({worst.prompt_len + bos} prompt + "
                        f"{worst.expected_output_len} output) but the model's context is {max_model_len} tokens "
                        f"({where}); shrink the input/output lengths or raise --max-model-len")


def _write(path: str | None, obj: dict) -> None:
    if path:
        from dsv3.bench.serve import write_json_atomic

        write_json_atomic(Path(path), obj)
        print(f"saved {path}")


def run(args) -> int:
    from dsv3.data.tokenizer import load_tokenizer

    if args.bench == "serve":
        from dsv3.serve.cli import need_extra

        need_extra("dsv3 bench serve", "aiohttp", "httpx")
        from dsv3.bench import serve

        tokenizer = load_tokenizer(args.tokenizer or _model_tokenizer(args.model))
        base_url = args.base_url or f"http://{args.host}:{args.port}"
        args.model, max_model_len = serve.server_model(base_url, args.api_key, args.model)
        overhead = serve.prompt_overhead(tokenizer, serve.payload_kind(args)) if args.dataset_name != "sonnet" else 1
        if args.dataset_name == "random":
            serve.fit_random_lengths(args, max_model_len, overhead)
        requests = make_requests(args, tokenizer)
        serve.check_fits(requests, max_model_len, overhead, {
            "random": "--random-input-len / --random-output-len", "custom": "the prompts or --custom-output-len",
            "sonnet": "--sonnet-input-len / --sonnet-output-len"}[args.dataset_name])
        serve.run_serve(args, tokenizer, requests)
        return 0

    from dsv3.bench import offline
    from dsv3.serve.cli import load_engine, vllm_compat_notes

    vllm_compat_notes(args)
    engine = load_engine(args)
    threads.announce()
    if args.bench == "throughput":
        requests = make_requests(args, engine.tokenizer)
        check_context(requests, engine.max_model_len, "--max-model-len / the model's context", bos=1)
        res = offline.throughput(engine, requests, args.temperature, args.disable_tqdm)
        print(f"Throughput: {res['requests_per_second']:.2f} requests/s, {res['tokens_per_second']:.2f} total "
              f"tokens/s, {res['output_tokens_per_second']:.2f} output tokens/s "
              f"({res['num_requests']} requests, {res['elapsed_time']:.2f} s)")
    else:
        need = args.input_len + args.output_len
        if need > engine.max_model_len:
            raise UserError(f"--input-len {args.input_len} + --output-len {args.output_len} = {need} tokens exceed "
                            f"the engine's max_model_len {engine.max_model_len}; shrink them or raise --max-model-len")
        res = offline.latency(engine, args.batch_size, args.input_len, args.output_len, args.num_iters_warmup,
                              args.num_iters, args.n, args.seed, args.disable_tqdm)
        print(f"Avg latency: {res['avg_latency']:.4f} seconds")
        for p, v in res["percentiles"].items():
            print(f"{p}% percentile latency: {v:.4f} seconds")
    _write(args.output_json, res)
    print(json.dumps({k: v for k, v in res.items() if k != "latencies"}))
    return 0
