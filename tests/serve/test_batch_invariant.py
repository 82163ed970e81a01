"""`dsv3 serve --batch-invariant` over HTTP: a completion's tokens and logprobs are the same bits when it is
served alone and when it arrives among 9 concurrent requests (other lengths, some sharing its prefix,
prompts chunked at 7 tokens). The engine is built from the real command line (`dsv3 serve` parser and
`load_engine`), the app is the real server."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from dsv3.cli import build_parser
from dsv3.serve.app import build_app
from dsv3.serve.cli import load_engine, vllm_compat_notes

from serve_helpers import API_KEY, MODEL_NAME, ServerThread

rng = random.Random(1)
TARGET = [rng.randrange(1000, 100000) for _ in range(20)]
OTHERS = [TARGET[:8] + [rng.randrange(1000, 100000) for _ in range(rng.randrange(1, 15))] for _ in range(3)] + \
         [[rng.randrange(1000, 100000) for _ in range(rng.randrange(3, 30))] for _ in range(6)]


@pytest.fixture(scope="module")
def exact_server(tiny_model_dir):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # many small ops: a second thread only waits at barriers on a loaded machine
    args = build_parser({"serve": ("dsv3.serve.cli", "")}, only="serve").parse_args(
        ["serve", str(tiny_model_dir), "--batch-invariant", "--max-num-batched-tokens", "7", "--max-num-seqs", "16",
         "--dtype", "float32", "--device", "cpu"])
    vllm_compat_notes(args)
    engine = load_engine(args)
    assert engine.batch_invariant
    with ServerThread(build_app(engine, MODEL_NAME, api_key=API_KEY)) as s:
        yield s
    torch.set_num_threads(before)


def complete(server, prompt: list[int], seed: int) -> dict:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 6, "temperature": 1.0, "seed": seed, "logprobs": 3,
            "ignore_eos": True}
    r = httpx.post(f"{server.url}/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return {"text": choice["text"], "logprobs": choice["logprobs"]}


def test_completion_is_bit_identical_alone_and_among_concurrent_requests(exact_server):
    alone = complete(exact_server, TARGET, 7)
    with ThreadPoolExecutor(len(OTHERS) + 1) as pool:
        others = [pool.submit(complete, exact_server, p, 100 + i) for i, p in enumerate(OTHERS)]
        crowded = pool.submit(complete, exact_server, TARGET, 7)
        assert all(f.result()["logprobs"]["token_logprobs"] for f in others)
        assert crowded.result() == alone
