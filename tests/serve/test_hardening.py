"""One client must never hurt another (issue 10, items 1-5), through real HTTP on 127.0.0.1.

Each test sends what an attacker (or a buggy client) would, and checks both sides: the bad request
gets a 4xx in the OpenAI shape, and a well-formed request running at the same time is unaffected.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from serve_helpers import API_KEY, MODEL_NAME, free_port

HEADERS = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}


def _post(server, path: str, body, timeout: float = 30) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.root + path, content=content, headers=HEADERS, timeout=timeout)


def _assert_error(r: httpx.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["code"] == status, err
    for w in words:
        assert w in err["message"], err
    return err


class _Background:
    """A well-formed greedy streaming completion running while the test sends bad requests."""

    def __init__(self, server, max_tokens: int = 24):
        self.server, self.max_tokens = server, max_tokens
        self.text, self.finish, self.error, self.first = "", None, None, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        body = {"model": MODEL_NAME, "prompt": "The quick brown fox", "max_tokens": self.max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", self.server.root + "/v1/completions", json=body, headers=HEADERS,
                              timeout=60) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        self.error = chunk["error"]
                        break
                    self.text += chunk["choices"][0]["text"]
                    self.finish = chunk["choices"][0]["finish_reason"] or self.finish
                    self.first.set()
        except Exception as e:  # noqa: BLE001  (reported by the test)
            self.error = repr(e)
        finally:
            self.first.set()

    def __enter__(self):
        self.thread.start()
        assert self.first.wait(60), "the background request produced nothing"
        return self

    def __exit__(self, *exc):
        self.thread.join(60)

    def check(self, alone: str | None = None):
        assert self.error is None, self.error
        assert self.finish == "length", (self.finish, self.text)
        if alone is not None:
            assert self.text == alone


def _alone(server, max_tokens: int = 24) -> str:
    bg = _Background(server, max_tokens)
    with bg:
        pass
    bg.check()
    return bg.text


class _HealthProbe:
    """Polls /health in a thread; `worst` is the slowest answer (s)."""

    def __init__(self, server):
        self.server, self.worst, self.count, self.failures = server, 0.0, 0, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            t0 = time.perf_counter()
            try:
                code = httpx.get(self.server.root + "/health", timeout=10).status_code
                if code != 200:
                    self.failures.append(code)
            except httpx.HTTPError as e:
                self.failures.append(repr(e))
            self.worst = max(self.worst, time.perf_counter() - t0)
            self.count += 1
            time.sleep(0.05)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(30)


# ------------------------------------------------------------------------------- 1. sampling fields
BAD_SAMPLING = [
    ("/v1/completions", {"top_k": 2**63}, "top_k"),
    ("/v1/completions", {"top_k": 10**6}, "top_k"),  # above the vocabulary
    ("/v1/completions", {"seed": 2**64}, "seed"),
    ("/v1/completions", {"seed": -(2**63) - 1}, "seed"),
    ("/v1/completions", {"n": 129}, "n must be"),
    ("/v1/completions", {"n": 20000}, "n must be"),
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"logprobs": 10000, "echo": True}, "logprobs"),
    ("/v1/completions", {"prompt": ["a"] * 257}, "prompts"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2**70}, "maximum context length"),
    ("/v1/completions", {"stop_token_ids": [2**63]}, "stop_token_ids"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "logprobs"),
    ("/v1/chat/completions", {"top_k": 2**63 + 5}, "top_k"),
]


@pytest.mark.parametrize("path,fields,word", BAD_SAMPLING, ids=[f"{p}-{'-'.join(f)}" for p, f, _ in BAD_SAMPLING])
def test_sampling_fields_out_of_range_are_400(server, path, fields, word):
    body = {"model": MODEL_NAME, "max_tokens": 2, **fields}
    if path == "/v1/completions":
        body.setdefault("prompt", "hello")
    else:
        body["messages"] = [{"role": "user", "content": "hi"}]
    t0 = time.perf_counter()
    _assert_error(_post(server, path, body), 400, word)
    assert time.perf_counter() - t0 < 5


def test_sampling_params_validate_bounds_offline_too():
    """The same check guards the offline `LLM` / `LLMEngine.add_request` (one place for both)."""
    from dsv3.infer.sampling import SamplingParams

    ok = dict(top_k=129280, seed=2**63 - 1, logprobs=20, prompt_logprobs=0, temperature=0.5)
    SamplingParams(**ok).validate(129280, max_logprobs=20)
    for bad in ({"top_k": 129281}, {"top_k": -2}, {"top_k": 2**63}, {"seed": 2**63}, {"seed": -(2**63) - 1},
                {"logprobs": 21}, {"prompt_logprobs": 21}, {"temperature": float("inf")},
                {"repetition_penalty": float("nan")}, {"n": True}, {"max_tokens": 2**64},
                {"stop_token_ids": [129280]}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**{**ok, **bad}).validate(129280, max_logprobs=20)
    SamplingParams(logprobs=1000).validate(129280)  # offline: no server cap, only the vocabulary


def test_non_finite_floats_are_400(server):
    for field in ("temperature", "repetition_penalty", "top_p"):
        raw = f'{{"model": "{MODEL_NAME}", "prompt": "hi", "max_tokens": 2, "{field}": Infinity}}'
        _assert_error(_post(server, "/v1/completions", raw), 400, field)


def test_bad_sampling_fields_do_not_hurt_requests_in_flight(server):
    want = _alone(server)
    with _Background(server) as bg:
        for fields in ({"top_k": 2**63}, {"seed": 2**64}, {"n": 20000}, {"logprobs": 10000, "echo": True}):
            body = {"model": MODEL_NAME, "prompt": "hello", "max_tokens": 2, "temperature": 1.0, **fields}
            assert _post(server, "/v1/completions", body).status_code == 400
    bg.check(want)


def test_step_failure_fails_only_the_request_that_caused_it(server, monkeypatch):
    """A validation gap (simulated: validation switched off) lets top_k 2**63 reach engine.step(), which
    overflows. Only that request fails (400, its own fault); the request in flight is recomputed and
    finishes with exactly the text it has when it runs alone."""
    from dsv3.infer.sampling import SamplingParams

    want = _alone(server)
    monkeypatch.setattr(SamplingParams, "validate", lambda self, *a, **k: None)
    with _Background(server) as bg:
        body = {"model": MODEL_NAME, "prompt": "hello", "max_tokens": 4, "top_k": 2**63, "temperature": 1.0}
        err = _assert_error(_post(server, "/v1/completions", body), 400, "sampling parameters")
        assert "Error" not in err["message"]
    bg.check(want)


def test_engine_fault_is_500_without_exception_class(server, monkeypatch):
    engine = server.app.state.engine.engine
    real_step = engine.step

    def broken_step():
        raise RuntimeError("simulated device fault")

    monkeypatch.setattr(engine, "step", broken_step)
    try:
        err = _assert_error(_post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2}),
                            500)
        assert "RuntimeError" not in err["message"] and "Error:" not in err["message"], err
    finally:
        monkeypatch.setattr(engine, "step", real_step)
    r = _post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200, r.text  # the server goes on


# ------------------------------------------------------------------------------- 2. size and tokenising
def test_huge_body_is_413_and_health_stays_fast(server):
    huge = json.dumps({"model": MODEL_NAME, "messages": [{"role": "user", "content": "a" * (10 << 20)}]})
    with _HealthProbe(server) as probe:
        for path in ("/v1/chat/completions", "/tokenize", "/v1/completions"):
            _assert_error(_post(server, path, huge, timeout=60), 413, "--max-request-bytes")
    assert probe.count >= 1 and not probe.failures and probe.worst < 1.0, (probe.worst, probe.failures)


def test_prompt_longer_than_context_refused_from_its_characters(server):
    """max_model_len x the longest token's characters bounds the characters of any prompt that fits:
    past it the prompt is refused without being tokenised."""
    from dsv3.serve.handlers.base import max_token_chars

    tok = server.app.state.engine.tokenizer
    assert max_token_chars(tok) == 128  # the V3 vocabulary's longest entry (a run of 128 dots / spaces)
    handler_chars = server.app.state.engine.max_model_len * 128
    tok_calls = []
    real = tok.encode
    try:
        tok.encode = lambda *a, **k: tok_calls.append(1) or real(*a, **k)
        for path, body in [("/v1/completions", {"prompt": "a" * (handler_chars + 1)}),
                           ("/v1/completions", {"prompt": ["hi", "b" * (handler_chars + 1)]}),
                           ("/tokenize", {"prompt": "c" * (handler_chars + 1)})]:
            _assert_error(_post(server, path, {"model": MODEL_NAME, **body}), 400, "characters")
        assert not tok_calls  # refused before tokenising anything
        chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "d" * (handler_chars + 1)}]}
        _assert_error(_post(server, "/v1/chat/completions", chat), 400, "characters")
        # just inside the bound: tokenised, then refused by its token count
        r = _post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": "e " * 3000})
        _assert_error(r, 400, "maximum context length", "tokens")
    finally:
        del tok.encode
    assert tok.encode == real


def test_tokenising_runs_off_the_event_loop(server, monkeypatch):
    """A slow tokenisation (3 s) must not stall /health."""
    tok = server.app.state.engine.tokenizer
    real = tok.encode

    def slow(*a, **k):
        time.sleep(3)
        return real(*a, **k)

    monkeypatch.setattr(tok, "encode", slow)
    with _HealthProbe(server) as probe:
        r = _post(server, "/tokenize", {"model": MODEL_NAME, "prompt": "hello"})
        assert r.status_code == 200, r.text
    assert probe.count >= 3 and not probe.failures and probe.worst < 1.0, (probe.worst, probe.count)


# ------------------------------------------------------------------------------- 4. malformed requests
def _deep(n: int) -> str:
    return '{"model": "%s", "messages": ' % MODEL_NAME + "[" * n + "]" * n + "}"


MALFORMED = [
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\ud800b"}]}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "name": "\\ud800", "content": "hi"}]}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", '
                             '"function": {"name": "f\\ud800", "parameters": {}}}]}'),
    ("/v1/chat/completions", '{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}'),
    ("/v1/completions", '{"prompt": "\\ud800", "max_tokens": 2}'),
    ("/v1/completions", '{"prompt": ["ok", "\\udbff"], "max_tokens": 2}'),
    ("/v1/completions", '{"prompt": "hi", "stop": ["\\ud800"], "max_tokens": 2}'),
    ("/v1/completions", '{"\\ud800": 1, "prompt": "hi", "max_tokens": 2}'),
    ("/tokenize", '{"prompt": "\\ud800"}'),
    ("/v1/chat/completions", _deep(100_000)),
    ("/v1/chat/completions", _deep(500)),
    ("/v1/completions", '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"),
    ("/tokenize", '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"),
    ("/v1/completions", b'{"prompt": "\xff\xfe", "max_tokens": 2}'),
    ("/v1/completions", "[1, 2]"),
    ("/v1/completions", ""),
]


def test_malformed_requests_get_4xx_never_500(server):
    want = _alone(server)
    with _Background(server) as bg, _HealthProbe(server) as probe:
        for path, raw in MALFORMED:
            r = _post(server, path, raw)
            assert 400 <= r.status_code < 500, (path, raw[:80], r.status_code, r.text[:300])
            _assert_error(r, r.status_code)
    bg.check(want)
    assert not probe.failures and probe.worst < 1.0


# ------------------------------------------------------------------------------- 5. key and model name
def test_build_app_refuses_an_empty_key(engine):
    from dsv3.errors import UserError
    from dsv3.serve.app import build_app

    for key in ("", "  "):
        with pytest.raises(UserError, match="--api-key is empty"):
            build_app(engine, MODEL_NAME, api_key=key)


def test_serve_refuses_an_empty_key_in_one_line(tiny_model_dir, capsys):
    """`dsv3 serve --api-key ""` exits 2 with one line before loading anything (it used to serve
    without auth: run in a thread so that the old behaviour fails the test instead of hanging it)."""
    from dsv3.cli import main

    result = []
    args = ["serve", "--model", str(tiny_model_dir), "--port", str(free_port()), "--api-key", ""]
    t = threading.Thread(target=lambda: result.append(main(args)), daemon=True)
    t.start()
    t.join(30)
    assert result == [2]
    assert capsys.readouterr().err.strip() == ("dsv3 serve: error: --api-key is empty: give a non-empty key, or "
                                               "leave --api-key and $DSV3_API_KEY unset to serve without one")
