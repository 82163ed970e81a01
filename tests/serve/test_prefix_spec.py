"""Prefix caching and MTP speculative decoding as the server reports them: `usage.prompt_tokens_details
.cached_tokens`, the vLLM-named /metrics counters, and outputs equal to runs without the feature."""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from serve_helpers import API_KEY, MODEL_NAME, ServerThread

SYSTEM = ("You are a careful assistant. " * 40).strip()  # a long shared prefix (~240 tokens)


def _serve(engine):
    from dsv3.serve.app import build_app

    return ServerThread(build_app(engine, MODEL_NAME, api_key=API_KEY))


def _client(server):
    return openai.OpenAI(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=120)


def _metric(server, name: str) -> float:
    text = httpx.get(server.root + "/metrics", timeout=30).text
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def _conversation(client, turns: int = 2, stream: bool = False):
    """A multi-turn chat that re-sends the whole conversation each turn (greedy)."""
    msgs = [{"role": "system", "content": SYSTEM}]
    outs, usages = [], []
    for t in range(turns):
        msgs.append({"role": "user", "content": f"Question number {t}: tell me more."})
        if stream:
            text, usage = "", None
            for ch in client.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=6, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}):
                text += "".join(c.delta.content or "" for c in ch.choices)
                usage = ch.usage or usage
        else:
            r = client.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=6, temperature=0)
            text, usage = r.choices[0].message.content, r.usage
        outs.append(text)
        usages.append(usage)
        msgs.append({"role": "assistant", "content": text})
    return outs, usages, msgs


@pytest.fixture(scope="module")
def engine_nocache(tiny_model_dir):
    from dsv3.infer.engine import LLMEngine

    return LLMEngine.from_pretrained(tiny_model_dir, dtype="float32", device="cpu", max_num_seqs=8,
                                     enable_prefix_caching=False)


def test_second_turn_reports_cached_prefix_and_equal_outputs(engine, engine_nocache):
    tok = engine.tokenizer
    with _serve(engine) as s:
        client = _client(s)
        q0, h0 = _metric(s, "vllm:prefix_cache_queries_total"), _metric(s, "vllm:prefix_cache_hits_total")
        outs, usages, msgs = _conversation(client)
        souts, susages, _ = _conversation(client, stream=True)  # the same conversation again, streamed
        q1, h1 = _metric(s, "vllm:prefix_cache_queries_total"), _metric(s, "vllm:prefix_cache_hits_total")
    first = tok.apply_chat_template(msgs[:2], tokenize=True)
    second = tok.apply_chat_template(msgs[:4], tokenize=True)
    shared = next((i for i, (a, b) in enumerate(zip(first, second)) if a != b), min(len(first), len(second)))
    cached = usages[1].prompt_tokens_details.cached_tokens
    assert cached >= 0.9 * shared, (cached, shared)
    assert cached < usages[1].prompt_tokens
    assert susages[1].prompt_tokens_details.cached_tokens >= cached  # streamed usage carries it too
    assert q1 - q0 >= sum(u.prompt_tokens for u in usages) and h1 - h0 >= cached
    with _serve(engine_nocache) as s:
        client = _client(s)
        ref, ref_usages, _ = _conversation(client)
        assert _metric(s, "vllm:prefix_cache_hits_total") == 0
    assert outs == ref == souts
    assert all(u.prompt_tokens_details.cached_tokens == 0 for u in ref_usages)


@pytest.fixture(scope="module")
def engine_spec(tiny_model_dir):
    from dsv3.infer.engine import LLMEngine

    return LLMEngine.from_pretrained(tiny_model_dir, dtype="float32", device="cpu", max_num_seqs=8, speculative=True)


def test_speculative_server_greedy_equal_and_metrics(engine, engine_spec):
    prompts = ["The weather today is", "Once upon a time"]
    with _serve(engine) as s:
        ref = [_client(s).completions.create(model=MODEL_NAME, prompt=p, max_tokens=10, temperature=0).choices[0].text
               for p in prompts]
    with _serve(engine_spec) as s:
        client = _client(s)
        got = [client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=10, temperature=0).choices[0].text
               for p in prompts]
        sampled = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=10, temperature=0.8, seed=7,
                                                 extra_body={"ignore_eos": True})
        again = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=10, temperature=0.8, seed=7,
                                               extra_body={"ignore_eos": True})
        drafts = _metric(s, "vllm:spec_decode_num_draft_tokens_total")
        accepted = _metric(s, "vllm:spec_decode_num_accepted_tokens_total")
        per_request = _metric(s, "dsv3:spec_decode_request_acceptance_rate_count")
    assert got == ref  # greedy speculative decoding returns exactly the greedy text
    assert sampled.usage.completion_tokens == 10 and sampled.choices[0].message.content == \
        again.choices[0].message.content  # a seeded sampled request is reproducible with drafts too
    assert drafts > 0 and 0 <= accepted <= drafts
    assert per_request == 4
