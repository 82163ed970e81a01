"""`dsv3 bench serve`: load an OpenAI-compatible server like vLLM's `benchmark_serving.py`.

Requests stream (`stream_options.include_usage`), are dispatched with Poisson/Gamma arrivals at
`--request-rate` (inf = all at once) and capped at `--max-concurrency` in flight. One test request
checks the endpoint first (not counted). Timing and aggregates: `dsv3.bench.metrics`.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from datetime import datetime
from pathlib import Path

import aiohttp
import httpx

from dsv3.bench.datasets import SampleRequest
from dsv3.bench.metrics import RequestFuncOutput, calculate_metrics, format_table, result_json
from dsv3.errors import UserError


def is_chat(endpoint: str) -> bool:
    """The endpoint decides the payload (the seed runs the default backend against /v1/chat/completions)."""
    return endpoint.rstrip("/").endswith("/chat/completions")


def endpoint_of(args) -> str:
    return args.endpoint or ("/v1/chat/completions" if args.backend == "openai-chat" else "/v1/completions")


def payload_kind(args) -> str:
    """"openai-chat" (messages) or "openai" (prompt), from the endpoint."""
    return "openai-chat" if is_chat(endpoint_of(args)) else "openai"


def build_payload(backend: str, model: str, req: SampleRequest, ignore_eos: bool, temperature: float) -> dict:
    """`backend`: "openai-chat" (messages) or anything else (prompt); see `is_chat`."""
    body: dict = {"model": model, "temperature": temperature, "max_tokens": req.expected_output_len,
                  "stream": True, "stream_options": {"include_usage": True}}
    if backend == "openai-chat":
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    if ignore_eos:
        body["ignore_eos"] = True
    return body


async def request_func(session: aiohttp.ClientSession, url: str, payload: dict, headers: dict, prompt_len: int,
                       pbar=None) -> RequestFuncOutput:
    """One streamed request, timed with vLLM's rules (a chunk counts if it carries `choices`).

    aiohttp, as in vLLM's benchmark client: the client shares the machine with the server, and
    its per-chunk cost is a fraction of httpx's."""
    out = RequestFuncOutput(prompt_len=prompt_len)
    chat = "messages" in payload
    text: list[str] = []
    st = most_recent = time.perf_counter()
    out.start_time = st
    first = False
    try:
        async with session.post(url, json=payload, headers=headers) as resp:
            if resp.status != 200:
                body = (await resp.read()).decode("utf-8", "replace")
                out.error = f"HTTP {resp.status}: {body[:500]}"
                return out
            buf = b""
            async for data in resp.content.iter_any():
                buf += data
                *events, buf = buf.split(b"\n\n")  # SSE events end with a blank line
                for event in events:
                    event = event.strip()
                    if not event.startswith(b"data:"):
                        continue
                    event = event[5:].strip()
                    if event == b"[DONE]":
                        continue
                    chunk = json.loads(event)
                    if "error" in chunk:
                        out.error = json.dumps(chunk["error"])
                        return out
                    if choices := chunk.get("choices"):
                        now = time.perf_counter()
                        if not first:
                            first = True
                            out.ttft = now - st
                        else:
                            out.itl.append(now - most_recent)
                        most_recent = now
                        c = choices[0]
                        text.append((c.get("delta") or {}).get("content") or "" if chat else c.get("text") or "")
                    elif usage := chunk.get("usage"):
                        out.output_tokens = int(usage.get("completion_tokens") or 0)
        out.generated_text = "".join(text)
        if first:
            out.success = True
            out.latency = most_recent - st
        else:
            out.error = "no chunk with choices received"
    except Exception as e:  # a failed request is recorded, never fatal to the run
        out.error = f"{type(e).__name__}: {e}"
    finally:
        if pbar is not None:
            pbar.update(1)
    return out


async def _arrivals(n: int, rate: float, burstiness: float, rng: random.Random):
    """Yield request indices at Gamma(shape=burstiness, mean 1/rate) intervals (Poisson at 1.0)."""
    for i in range(n):
        yield i
        if rate == float("inf") or i == n - 1:
            continue
        await asyncio.sleep(rng.gammavariate(burstiness, 1.0 / (rate * burstiness)))


async def benchmark(base_url: str, endpoint: str, backend: str, model: str, requests: list[SampleRequest], *,
                    request_rate: float = float("inf"), burstiness: float = 1.0, max_concurrency: int | None = None,
                    ignore_eos: bool = False, temperature: float = 0.0, api_key: str | None = None,
                    disable_tqdm: bool = False, seed: int = 0, timeout_s: float = 6 * 3600,
                    ) -> tuple[list[RequestFuncOutput], float]:
    """Run the load; -> (outputs in request order, duration in seconds)."""
    url = base_url.rstrip("/") + endpoint
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    connector = aiohttp.TCPConnector(limit=max_concurrency or 0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as client:
        first = requests[0]
        test = await request_func(client, url, build_payload(backend, model, first, ignore_eos, temperature),
                                  headers, first.prompt_len)
        if not test.success:
            raise UserError(f"test request to {url} failed: {test.error}")
        pbar = None
        if not disable_tqdm:
            from tqdm.auto import tqdm

            pbar = tqdm(total=len(requests), desc="requests")
        sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None

        async def one(req: SampleRequest) -> RequestFuncOutput:
            payload = build_payload(backend, model, req, ignore_eos, temperature)
            if sem is None:
                return await request_func(client, url, payload, headers, req.prompt_len, pbar)
            async with sem:
                return await request_func(client, url, payload, headers, req.prompt_len, pbar)

        t0 = time.perf_counter()
        tasks = []
        async for i in _arrivals(len(requests), request_rate, burstiness, random.Random(seed)):
            tasks.append(asyncio.create_task(one(requests[i])))
        outputs = await asyncio.gather(*tasks)
        dur = time.perf_counter() - t0
        if pbar is not None:
            pbar.close()
    return list(outputs), dur


DEFAULT_RANDOM_INPUT_LEN, DEFAULT_RANDOM_OUTPUT_LEN = 1024, 128


def run_serve(args, tokenizer, requests: list[SampleRequest]) -> dict:
    """Run the benchmark from parsed CLI args; print the table; save the JSON if asked."""
    if args.request_rate <= 0:
        raise UserError(f"--request-rate must be > 0 (inf = all at once), got {args.request_rate}")
    base_url = args.base_url or f"http://{args.host}:{args.port}"
    endpoint = endpoint_of(args)
    model = args.model
    outputs, dur = asyncio.run(benchmark(
        base_url, endpoint, payload_kind(args), model, requests, request_rate=args.request_rate,
        burstiness=args.burstiness, max_concurrency=args.max_concurrency, ignore_eos=args.ignore_eos,
        temperature=args.temperature, api_key=args.api_key, disable_tqdm=args.disable_tqdm, seed=args.seed))
    metrics_sel = [m.strip() for m in args.percentile_metrics.split(",") if m.strip()]
    pcts = [float(p) for p in args.metric_percentiles.split(",") if p.strip()]
    goodput = parse_goodput(args.goodput)
    input_lens = [r.prompt_len for r in requests]
    m = calculate_metrics(input_lens, outputs, dur, lambda t: len(tokenizer.encode(t)), metrics_sel, pcts, goodput)
    failed = len(outputs) - m.completed
    print(format_table(m, dur, failed, args.max_concurrency, args.request_rate, metrics_sel, pcts, bool(goodput)))
    errors = [o.error for o in outputs if o.error]
    if errors:
        print(f"first error: {errors[0]}")
    config = {"date": datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": args.backend, "endpoint": endpoint,
              "model_id": model, "tokenizer_id": args.tokenizer, "dataset_name": args.dataset_name,
              "num_prompts": len(requests), "request_rate": args.request_rate if args.request_rate != float("inf")
              else "inf", "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
              "goodput": goodput}
    for kv in args.metadata or []:
        key, _, value = kv.partition("=")
        config[key] = value
    result = result_json(m, outputs, input_lens, dur, config)
    if args.save_result:
        name = args.result_filename or (
            f"{args.backend}-{config['request_rate']}qps-concurrency{args.max_concurrency}-"
            f"{model.split('/')[-1]}-{config['date']}.json")
        path = Path(args.result_dir or ".") / name
        write_json_atomic(path, result)
        print(f"saved {path}")
    return result


def parse_goodput(items: list[str] | None) -> dict[str, float] | None:
    if not items:
        return None
    out = {}
    for item in items:
        key, sep, value = item.partition(":")
        if not sep or key not in ("ttft", "tpot", "e2el"):
            raise UserError(f"--goodput {item!r}: expected ttft:MS, tpot:MS or e2el:MS")
        try:
            out[key] = float(value)
        except ValueError:
            raise UserError(f"--goodput {item!r}: {value!r} is not a number of milliseconds") from None
    return out


def server_model(base_url: str, api_key: str | None, model: str | None) -> tuple[str, int | None]:
    """(model id, its max_model_len or None) from GET /v1/models: `model`, else the first one listed.
    With --model given, a server that cannot list its models is not an error (no context check)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
        r.raise_for_status()
        cards = r.json()["data"]
    except (httpx.ConnectError, httpx.ConnectTimeout) as e:
        raise UserError(f"no server is reachable at {base_url} ({e}); start one (dsv3 serve MODEL_DIR) or "
                        f"give its address with --base-url / --host / --port") from None
    except Exception as e:
        if model is not None:
            return model, None
        raise UserError(f"cannot list models at {base_url}/v1/models ({e}); pass --model") from None
    card = next((c for c in cards if c.get("id") == model), None) if model is not None else cards[0]
    ctx = card.get("max_model_len") if isinstance(card, dict) else None
    return (model if model is not None else card["id"]), (ctx if isinstance(ctx, int) and ctx > 0 else None)


def prompt_overhead(tokenizer, backend: str) -> int:
    """Tokens the server adds around a prompt: BOS for completions, the chat template for chat."""
    if backend == "openai-chat" and hasattr(tokenizer, "apply_chat_template"):
        return len(tokenizer.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True,
                                                 tokenize=True))
    return 1


def fit_random_lengths(args, max_model_len: int | None, overhead: int) -> None:
    """Random dataset: fill in the default lengths (vLLM's 1024 in / 128 out), shortening the input to fit
    the server's context when the defaults would not (one line says so); lengths given on the command
    line that cannot fit are an error."""
    explicit_in, explicit_out = args.random_input_len is not None, args.random_output_len is not None
    n_in = args.random_input_len if explicit_in else DEFAULT_RANDOM_INPUT_LEN
    n_out = args.random_output_len if explicit_out else DEFAULT_RANDOM_OUTPUT_LEN
    r = args.random_range_ratio
    longest = lambda n_in_, n_out_: (args.random_prefix_len + int(n_in_ * (1 + r)) + overhead  # noqa: E731
                                     + int(n_out_ * (1 + r)))
    if max_model_len is not None and longest(n_in, n_out) > max_model_len:
        room = max_model_len - args.random_prefix_len - overhead - int(n_out * (1 + r))
        fitted = int(room / (1 + r))
        while fitted > 0 and longest(fitted, n_out) > max_model_len:
            fitted -= 1
        if explicit_in or fitted < 1:
            raise UserError(f"--random-input-len {n_in} + --random-output-len {n_out} (range ratio {r}, prefix "
                            f"{args.random_prefix_len}, {overhead} token(s) the server adds) exceed the server's "
                            f"max_model_len {max_model_len}: choose lengths that fit")
        print(f"dsv3 bench serve: the default --random-input-len {n_in} + --random-output-len {n_out} (+{overhead} "
              f"token(s) the server adds) exceed the server's max_model_len {max_model_len}; using "
              f"--random-input-len {fitted}", flush=True)
        n_in = fitted
    args.random_input_len, args.random_output_len = n_in, n_out


def check_fits(requests: list[SampleRequest], max_model_len: int | None, overhead: int, flags: str) -> None:
    """Every request's prompt + output must fit the server's context (else every request would fail)."""
    if max_model_len is None:
        return
    over = [r for r in requests if r.prompt_len + overhead + r.expected_output_len > max_model_len]
    if over:
        worst = max(over, key=lambda r: r.prompt_len + r.expected_output_len)
        raise UserError(f"{len(over)} of {len(requests)} prompts do not fit the server's max_model_len "
                        f"{max_model_len} (longest: {worst.prompt_len} prompt + {overhead} added + "
                        f"{worst.expected_output_len} output tokens): shorten {flags}")


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
