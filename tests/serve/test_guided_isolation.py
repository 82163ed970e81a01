"""A grammar that fails while decoding fails its own request only (issue 25, S2), over HTTP.

`(a{1000}){1003}` compiles, then llguidance's lexer hits its expression limit when the first token
is consumed inside `engine.step()`. Before, that raised out of the step and every request in flight
failed with the attacker's parser state in its error text; a template that failed stayed in the
grammar cache. Now the attacker gets one clean 400 line each time and an innocent stream runs on."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from serve_helpers import API_KEY, MODEL_NAME

pytest.importorskip("llguidance")

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
BAD_REGEX = "(a{1000}){1003}"


def _post(server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/completions", json={"model": MODEL_NAME, **body}, headers=HEADERS, timeout=300)


def _stream_innocent(server, result: dict) -> None:
    body = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 300, "temperature": 0,
            "ignore_eos": True, "stream": True}
    events = []
    with httpx.stream("POST", f"{server.url}/completions", json=body, headers=HEADERS, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
                result.setdefault("first", time.monotonic())
    result["events"], result["done"] = events, time.monotonic()


def test_failing_grammar_fails_alone_and_again_the_same_way(server):
    assert _post(server, {"prompt": "x", "max_tokens": 2, "guided_regex": "[a-z]+"}).status_code == 200  # warm up
    result: dict = {}
    innocent = threading.Thread(target=_stream_innocent, args=(server, result))
    innocent.start()
    deadline = time.monotonic() + 120
    while "first" not in result and time.monotonic() < deadline:
        time.sleep(0.01)
    attacks = [_post(server, {"prompt": "y", "max_tokens": 8, "guided_regex": BAD_REGEX}) for _ in range(2)]
    attacked_at = time.monotonic()
    innocent.join(300)

    events = result["events"]
    assert not any("error" in e for e in events), events[-1]
    assert result["done"] > attacked_at, "the innocent stream ended before the attack ran (the test proved nothing)"
    text = "".join(c["text"] for e in events for c in e.get("choices", []))
    assert events[-1]["choices"][0]["finish_reason"] == "length" and text

    messages = []
    for r in attacks:
        assert r.status_code == 400, r.text
        messages.append(r.json()["error"]["message"])
    assert messages[0] == messages[1], "the same grammar behaved differently the second time"
    assert "guided decoding failed" in messages[0] and "\n" not in messages[0] and "1003" not in messages[0]
    # the server is healthy and the grammar cache holds nothing poisoned: a good grammar still works
    ok = _post(server, {"prompt": "z", "max_tokens": 6, "guided_regex": "[a-z]{3}-[0-9]{2}"})
    assert ok.status_code == 200 and len(ok.json()["choices"][0]["text"]) == 6, ok.text


def test_too_many_choices_is_one_line_without_panic_text(server):
    r = _post(server, {"prompt": "x", "max_tokens": 2, "guided_choice": [f"c{i}" for i in range(20_000)]})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "panic" not in message.lower() and "\n" not in message and len(message) < 300, message
