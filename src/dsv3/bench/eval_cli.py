"""`dsv3 eval`: accuracy on C-Eval, MMLU, GSM8K and CLUEWSC through a running server's OpenAI chat API.

The prompts and answer extraction are evalscope's (`eval_prompts`), so a figure here is comparable with
`evalscope eval --eval-type openai_api` on the same data; the data are the public releases' local files
(`eval_data`). Requests are greedy (temperature 0), at most --concurrency in flight; a failed request is
recorded with its error (and counted as not correct), never fatal to the others. The JSON report holds the
accuracy per task and per subset, n, the template name and few-shot count, and every item's extracted answer.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import defaultdict
from pathlib import Path

from dsv3.bench import eval_data as D
from dsv3.bench import eval_prompts as P
from dsv3.errors import UserError

DEFAULT_SHOTS = {"ceval": 5, "mmlu": 5, "gsm8k": 4, "cluewsc": 0}  # evalscope's defaults
MAX_CONCURRENCY = 256
REPLY_CHARS = 400  # of each reply kept in the report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default=None, help="server root, e.g. http://127.0.0.1:8000 (overrides host/port)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default=None, help="model id to send (default: the first of GET /v1/models)")
    p.add_argument("--api-key", default=None)
    d = p.add_argument_group("datasets (give at least one)")
    d.add_argument("--ceval", type=Path, metavar="DIR", help="C-Eval: DIR/{dev,val}/SUBJECT_{dev,val}.csv")
    d.add_argument("--ceval-split", default="val")
    d.add_argument("--ceval-subjects", default=None, help="comma-separated (default: every file of the split)")
    d.add_argument("--mmlu", type=Path, metavar="DIR", help="MMLU: DIR/{dev,test}/SUBJECT_{dev,test}.csv")
    d.add_argument("--mmlu-split", default="test")
    d.add_argument("--mmlu-subjects", default=None, help="comma-separated (default: every file of the split)")
    d.add_argument("--gsm8k", type=Path, metavar="FILE", help="GSM8K test JSONL (e.g. test.jsonl)")
    d.add_argument("--gsm8k-train", type=Path, metavar="FILE",
                   help="few-shot examples (default: train.jsonl beside --gsm8k)")
    d.add_argument("--cluewsc", type=Path, metavar="FILE", help="CLUEWSC FewCLUE JSONL (e.g. dev_few_all.json)")
    p.add_argument("--few-shot", action="append", default=[], metavar="TASK=K",
                   help="few-shot examples per prompt (defaults: ceval=5 mmlu=5 gsm8k=4 cluewsc=0, evalscope's)")
    p.add_argument("--limit", type=int, default=None, help="items per subset (default: all)")
    p.add_argument("--max-tokens", type=int, default=1024, help="tokens generated per answer")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--concurrency", type=int, default=8, help=f"requests in flight (1-{MAX_CONCURRENCY})")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--output-json", required=True, help="the report")


def _shots(specs: list[str]) -> dict[str, int]:
    shots = dict(DEFAULT_SHOTS)
    for spec in specs:
        task, _, k = spec.partition("=")
        if task not in shots or not k.isdigit():
            raise UserError(f"--few-shot {spec!r}: expected TASK=K with TASK one of {', '.join(D.TASKS)}, K >= 0")
        shots[task] = int(k)
    return shots


def _names(text: str | None) -> list[str] | None:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def load_items(args) -> tuple[list[D.Item], dict[str, dict]]:
    """The items of every dataset given, and per task its template, split and few-shot count."""
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    shots = _shots(args.few_shot)
    items: list[D.Item] = []
    meta: dict[str, dict] = {}
    if args.ceval:
        items += D.load_ceval(args.ceval, args.ceval_split, _names(args.ceval_subjects), args.limit, shots["ceval"])
        meta["ceval"] = {"split": args.ceval_split}
    if args.mmlu:
        items += D.load_mmlu(args.mmlu, args.mmlu_split, _names(args.mmlu_subjects), args.limit, shots["mmlu"])
        meta["mmlu"] = {"split": args.mmlu_split}
    if args.gsm8k:
        items += D.load_gsm8k(args.gsm8k, args.gsm8k_train, args.limit, shots["gsm8k"])
        meta["gsm8k"] = {"split": args.gsm8k.name}
    if args.cluewsc:
        items += D.load_cluewsc(args.cluewsc, args.limit)
        meta["cluewsc"] = {"split": args.cluewsc.name}
    if not meta:
        raise UserError("give at least one dataset: --ceval DIR, --mmlu DIR, --gsm8k FILE or --cluewsc FILE")
    for task, m in meta.items():
        m.update(template=P.TEMPLATES[task], few_shot=shots[task])
    return items, meta


def extract(item: D.Item, reply: str) -> tuple[str, bool]:
    """(extracted answer, correct) with the task's evalscope rule."""
    if item.task == "ceval":
        pred = P.ceval_answer(reply)
    elif item.task == "gsm8k":
        pred = P.gsm8k_answer(reply)
        return pred, P.numbers_equal(pred, item.target)
    else:
        pred = P.mcq_answer(reply, item.n_choices, chinese=item.task == "cluewsc")
    return pred, pred == item.target


async def _ask(session, url: str, headers: dict, body: dict, sem: asyncio.Semaphore) -> tuple[str, str | None]:
    """(reply text, error or None)."""
    async with sem:
        try:
            async with session.post(url, json=body, headers=headers) as resp:
                data = await resp.json(content_type=None)
                if resp.status != 200:
                    return "", f"HTTP {resp.status}: {str(data)[:300]}"
                return data["choices"][0]["message"]["content"] or "", None
        except Exception as e:  # one failed request never stops the others
            return "", f"{type(e).__name__}: {e}"[:300]


async def _ask_all(args, base_url: str, model: str, items: list[D.Item]) -> list[tuple[str, str | None]]:
    import aiohttp

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    sem = asyncio.Semaphore(args.concurrency)
    url = base_url.rstrip("/") + "/v1/chat/completions"
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        return await asyncio.gather(*(_ask(session, url, headers, {
            "model": model, "messages": [{"role": "user", "content": it.prompt}], "max_tokens": args.max_tokens,
            "temperature": args.temperature}, sem) for it in items))


def _tally(rows: list[dict]) -> dict:
    n, correct = len(rows), sum(r["correct"] for r in rows)
    return {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0,
            "answered": sum(r["pred"] != "" for r in rows), "errors": sum("error" in r for r in rows)}


def build_report(items: list[D.Item], replies, meta: dict[str, dict]) -> dict:
    samples = []
    for it, (reply, error) in zip(items, replies):
        pred, ok = extract(it, reply) if error is None else ("", False)
        row = {"task": it.task, "subset": it.subset, "id": it.id, "target": it.target, "pred": pred,
               "correct": ok, "reply": reply[:REPLY_CHARS]}
        if error is not None:
            row["error"] = error
        samples.append(row)
    tasks = {}
    for task, m in meta.items():
        rows = [r for r in samples if r["task"] == task]
        by_subset: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            by_subset[r["subset"]].append(r)
        tasks[task] = {**m, **_tally(rows), "subsets": {s: _tally(rs) for s, rs in by_subset.items()}}
    return {"tasks": tasks, "samples": samples}


def run(args) -> int:
    from dsv3.serve.cli import need_extra

    need_extra("dsv3 eval", "aiohttp", "httpx")
    from dsv3.bench.serve import server_model, write_json_atomic

    if not 1 <= args.concurrency <= MAX_CONCURRENCY:
        raise UserError(f"--concurrency must be in 1..{MAX_CONCURRENCY}, got {args.concurrency}")
    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    items, meta = load_items(args)
    base_url = args.base_url or f"http://{args.host}:{args.port}"
    model, _ = server_model(base_url, args.api_key, args.model)
    print(f"dsv3 eval: {len(items)} prompts ({', '.join(meta)}) to {base_url} model {model}, "
          f"{args.concurrency} in flight", flush=True)
    t0 = time.perf_counter()
    replies = asyncio.run(_ask_all(args, base_url, model, items))
    report = build_report(items, replies, meta)
    report.update(model=model, base_url=base_url, endpoint="/v1/chat/completions",
                  generation={"max_tokens": args.max_tokens, "temperature": args.temperature},
                  elapsed_s=round(time.perf_counter() - t0, 3))
    write_json_atomic(Path(args.output_json), report)
    errors = 0
    for task, t in report["tasks"].items():
        errors += t["errors"]
        print(f"{task:8s} accuracy {t['accuracy']:.4f} ({t['correct']}/{t['n']}, {t['answered']} answered, "
              f"{t['errors']} failed) template {t['template']}, {t['few_shot']}-shot")
    print(f"saved {args.output_json}")
    if errors:
        first = next(r["error"] for r in report["samples"] if "error" in r)
        print(f"dsv3 eval: {errors} request(s) failed, counted as not correct; first: {first}", file=sys.stderr)
        return 1
    return 0
