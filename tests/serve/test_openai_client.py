"""`dsv3 serve` against the official `openai` client (and raw httpx for malformed requests).

The oracle for greedy text and logprobs is the model itself run without the engine: a full
forward over the whole sequence per step (no KV cache, no batching, naive attention), so the
server's paged / batched / absorbed path is checked against the plain maths.
"""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import openai
import pytest
import torch

from serve_helpers import API_KEY, MODEL_NAME


@pytest.fixture(scope="module")
def oracle(tiny_model_dir):
    import dsv3

    return dsv3.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok(engine):
    return engine.tokenizer


@torch.no_grad()
def greedy_ids(model, ids: list[int], n: int, eos: int = 1) -> list[int]:
    ids, out = list(ids), []
    for _ in range(n):
        nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
        out.append(nxt)
        ids.append(nxt)
        if nxt == eos:
            break
    return out


def _raw(server, method: str, path: str, key: str | None = API_KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, server.root + path, headers=headers, timeout=60, **kw)


def _assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"], err
    return err


# ------------------------------------------------------------------------------------------- basics
def test_models_health_tokenizer_endpoints(server, client, tok):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert _raw(server, "GET", "/health", key=None).status_code == 200
    r = _raw(server, "POST", "/tokenize", json={"prompt": "Hello world", "add_special_tokens": True}).json()
    assert r["tokens"] == tok.encode("Hello world", add_bos=True) and r["count"] == len(r["tokens"])
    assert r["tokens"][0] == tok.bos_id
    r2 = _raw(server, "POST", "/tokenize", json={"prompt": "Hello world", "add_special_tokens": False}).json()
    assert r2["tokens"] == r["tokens"][1:]
    assert _raw(server, "POST", "/detokenize", json={"tokens": r2["tokens"]}).json()["prompt"] == "Hello world"
    info = _raw(server, "GET", "/tokenizer_info").json()
    assert info["eos_token"] == tok.eos_token and info["bos_token"] == tok.bos_token


def test_completion_greedy_matches_model_and_stream(client, oracle, tok):
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0)
    ids = tok.encode(prompt, add_bos=True)
    want = greedy_ids(oracle, ids, 12)
    assert r.choices[0].text == tok.decode(want)
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(want) and r.usage.total_tokens == len(ids) + len(want)
    assert r.choices[0].finish_reason == ("stop" if want[-1] == tok.eos_id else "length")

    chunks = list(client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == len(ids)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason


def test_chat_text_parts_multiturn_stream(client, oracle, tok):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},  # guidellm's form
    ]
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_completion_tokens=10, temperature=0,
                                       extra_body={"ignore_eos": True, "min_tokens": 2})  # vLLM extras accepted
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = greedy_ids(oracle, ids, 10, eos=-1)
    assert r.choices[0].message.content == tok.decode(want)
    assert r.choices[0].message.role == "assistant"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 10)
    assert r.choices[0].finish_reason == "length"

    stream = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == len(ids) + 10


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Count"}],
                                       max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert len(t.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5)
    assert "".join(t.token for t in content) == r.choices[0].message.content


def test_chat_stream_logprobs_cover_held_back_tokens(client):
    """Streamed, a token whose text is held back (here by a long stop string) still gets its logprob in a
    later chunk: every completion token has exactly one entry, as unstreamed."""
    kw = dict(model=MODEL_NAME, messages=[{"role": "user", "content": "Count"}], max_tokens=8, temperature=0,
              logprobs=True, top_logprobs=1, stop=["a stop string longer than anything eight tokens spell"])
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == len(streamed)
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in whole.choices[0].logprobs.content], abs=1e-5)


@torch.no_grad()
def test_echo_logprobs_token_id_batch(client, oracle, tok):
    """lm-eval's loglikelihood request: a batch of token-id prompts, echo, logprobs=1, max_tokens=1."""
    prompts = [tok.encode("One two three four", add_bos=True), tok.encode("Paris is in France")]
    r = client.completions.create(model=MODEL_NAME, prompt=prompts, echo=True, logprobs=1, max_tokens=1,
                                  temperature=0, seed=1234)
    assert [c.index for c in r.choices] == [0, 1]
    for p, c in zip(prompts, r.choices):
        lp = c.logprobs
        assert len(lp.token_logprobs) == len(p) + 1 and lp.token_logprobs[0] is None
        assert lp.top_logprobs[0] is None and len(lp.tokens) == len(p) + 1
        ref = torch.log_softmax(oracle(torch.tensor([p]))[0].float(), -1)
        want = [float(ref[i - 1, p[i]]) for i in range(1, len(p))]
        assert lp.token_logprobs[1:len(p)] == pytest.approx(want, abs=2e-4)
        assert lp.token_logprobs[-1] == pytest.approx(float(ref[-1].max()), abs=2e-4)  # greedy next token
        for top, t in zip(lp.top_logprobs[1:], lp.tokens[1:]):
            assert 1 <= len(top) <= 2 and t in top  # the top-1 plus the actual token
        assert c.text.startswith(tok.decode(p, skip_special_tokens=False))
    assert r.usage.prompt_tokens == sum(len(p) for p in prompts)


def test_stop_strings(client):
    prompt = "Once upon a time"
    full = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]  # two characters from the middle of the greedy text
    cut = full[:full.index(stop)]
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=16, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    chunks = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=16, temperature=0, stop=stop,
                                       stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in chunks if c.choices) == cut


def test_prompt_list_and_n(client):
    r = client.completions.create(model=MODEL_NAME, prompt=["Alpha", "Beta"], n=2, max_tokens=4, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text and r.choices[2].text == r.choices[3].text
    assert r.usage.prompt_tokens == 2 * 2  # BOS + one token each ("Alpha", "Beta"); n does not repeat prompts
    sampled = client.completions.create(model=MODEL_NAME, prompt="Alpha", n=2, max_tokens=8, temperature=1.0,
                                        seed=7)
    again = client.completions.create(model=MODEL_NAME, prompt="Alpha", n=2, max_tokens=8, temperature=1.0, seed=7)
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]  # seeded: reproducible


# ------------------------------------------------------------------------------------------- errors
def test_api_key_required(server):
    bad = openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    _assert_openai_error(_raw(server, "POST", "/v1/completions", key=None, json={"prompt": "x"}), 401)
    _assert_openai_error(_raw(server, "GET", "/v1/models", key="wrong"), 401)


@pytest.mark.parametrize("body, status, param", [
    ("{not json", 400, None),
    ({"model": MODEL_NAME}, 400, "messages"),
    ({"model": MODEL_NAME, "messages": []}, 400, "messages"),
    ({"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400, None),
    ({"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": MODEL_NAME, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
    ({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
])
def test_malformed_chat(server, body, status, param):
    kw = {"content": body} if isinstance(body, str) else {"json": body}
    err = _assert_openai_error(_raw(server, "POST", "/v1/chat/completions", **kw), status)
    if param:
        assert err["param"] is not None and param in err["param"]


@pytest.mark.parametrize("prompt", [None, [], [[]], [1.5], [[0, 10**9]], {"a": 1}, "x" * 6000],
                         ids=["none", "empty", "empty-ids", "float", "id-range", "object", "too-long"])
def test_malformed_completion_prompt(server, prompt):
    _assert_openai_error(_raw(server, "POST", "/v1/completions", json={"prompt": prompt, "max_tokens": 4}), 400)


def test_errors_do_not_hurt_the_server(server, client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=4, top_p=7)
    assert _raw(server, "GET", "/no/such/route").status_code == 404
    r = client.completions.create(model=MODEL_NAME, prompt="still alive", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens >= 1


# ------------------------------------------------------------------------------------------- concurrency
def test_concurrent_streaming_clients_match_sequential(client):
    prompts = [f"Request number {i}: tell me about {w}" for i, w in
               enumerate(["cats", "dogs", "the sea", "tea", "rain", "maps", "clocks", "salt"])]
    lengths = [5, 9, 13, 17, 7, 11, 15, 19]  # different lengths: requests join and leave the batch
    sequential = [client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=n, temperature=0,
                                            extra_body={"ignore_eos": True}).choices[0].text
                  for p, n in zip(prompts, lengths)]
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            stream = client.completions.create(model=MODEL_NAME, prompt=prompts[i], max_tokens=lengths[i],
                                               temperature=0, stream=True, extra_body={"ignore_eos": True})
            results[i] = "".join(c.choices[0].text for c in stream if c.choices)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert [results[i] for i in range(8)] == sequential


def _metric(server, name: str, labels: str = "") -> float:
    text = _raw(server, "GET", "/metrics", key=None).text
    m = re.search(rf"^{re.escape(name)}{{[^}}]*{re.escape(labels)}[^}}]*}} (\S+)$", text, re.M)
    assert m, f"{name} {labels} not in /metrics"
    return float(m.group(1))


def _wait_idle(server, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (_metric(server, "dsv3:kv_cache_blocks", 'state="used"') == 0
                and _metric(server, "dsv3:num_requests_running") == 0):
            return
        time.sleep(0.1)
    raise AssertionError("KV-cache blocks were not freed")


def test_client_disconnect_frees_blocks(server):
    _wait_idle(server)
    body = {"model": MODEL_NAME, "prompt": "A long story " * 20, "max_tokens": 400, "stream": True,
            "ignore_eos": True, "temperature": 0}
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        with c.stream("POST", server.url + "/completions", json=body) as r:
            lines, seen = r.iter_lines(), 0  # keep the iterator alive: closing it closes the connection
            while seen < 3:
                seen += next(lines).startswith("data: {")
            assert _metric(server, "dsv3:kv_cache_blocks", 'state="used"') > 0  # mid-generation
        # leaving the block closes the connection mid-stream
    _wait_idle(server)
    # the same for a non-streaming request: the handler is cancelled when the client goes away
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/completions", json={**body, "stream": False}, timeout=1.0,
                   headers={"Authorization": f"Bearer {API_KEY}"})
    _wait_idle(server)
    assert _metric(server, "dsv3:request_success_total", 'finished_reason="abort"') >= 2


def test_metrics_exposition(server, client):
    client.completions.create(model=MODEL_NAME, prompt="metrics", max_tokens=3, temperature=0)
    text = _raw(server, "GET", "/metrics", key=None).text
    for name in ("dsv3:prompt_tokens_total", "dsv3:generation_tokens_total",
                 "dsv3:time_to_first_token_seconds_bucket", "dsv3:e2e_request_latency_seconds_count",
                 "dsv3:kv_cache_usage_perc", "dsv3:http_requests_total"):
        assert name in text
    assert _metric(server, "dsv3:generation_tokens_total") >= 3
    assert _metric(server, "dsv3:e2e_request_latency_seconds_count") >= 1
    hist = [float(x) for x in re.findall(r'^dsv3:time_to_first_token_seconds_bucket{[^}]*} (\S+)$', text, re.M)]
    assert hist == sorted(hist)  # cumulative buckets
    assert json.loads(json.dumps(_raw(server, "GET", "/v1/models").json()))["data"][0]["max_model_len"] == 512


def test_continuous_usage_stats(server):
    """guidellm's body: content parts, max_completion_tokens, ignore_eos, continuous usage in every chunk."""
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": [{"type": "text", "text": "Go"}]}],
            "max_completion_tokens": 6, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with httpx.stream("POST", server.url + "/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert all("usage" in c for c in chunks) and counts == sorted(counts) and counts[-1] == 6
    assert chunks[-1]["choices"] == [] and chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_engine_step_failure_is_contained(server, client, engine, monkeypatch):
    """If engine.step() raises, the requests in flight get an OpenAI error; the server keeps serving."""
    real_step, calls = engine.step, {"n": 0}

    def failing_step():
        calls["n"] += 1
        if calls["n"] == 3:  # fail in the middle of the generation
            raise RuntimeError("injected fault")
        return real_step()

    monkeypatch.setattr(engine, "step", failing_step)
    with pytest.raises(openai.InternalServerError, match="injected fault"):
        client.completions.create(model=MODEL_NAME, prompt="doomed", max_tokens=20, temperature=0,
                                  extra_body={"ignore_eos": True})
    stream = client.completions.create(model=MODEL_NAME, prompt="fine", max_tokens=3, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices)
    monkeypatch.setattr(engine, "step", real_step)
    _wait_idle(server)
