"""The prefix cache over HTTP (issue 25, S1 and S6): a block is found only by a keyed cryptographic
digest of its whole prefix (two prompts whose first blocks collide under the old `hash((parent,
tuple(tokens)))` key never share latents), and `cache_salt` keeps requests of different salts from
sharing blocks, so `usage.prompt_tokens_details.cached_tokens` tells nothing about another salt's prompts."""

from __future__ import annotations

import builtins

import httpx
import pytest

from serve_helpers import API_KEY, MODEL_NAME

BLOCK = 16  # the engine fixture's block_size (LLMEngine's default)
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def _complete(server, prompt, **extra) -> dict:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True, **extra}
    r = httpx.post(f"{server.url}/completions", json=body, headers=HEADERS, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _cached(resp: dict) -> int:
    return resp["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_colliding_blocks_under_the_old_key_share_nothing(server, monkeypatch):
    from dsv3.infer import kv_cache

    tail = [200, 201, 202, 203]
    block_a, block_b = list(range(100, 100 + BLOCK)), list(range(300, 300 + BLOCK))
    colliding = {tuple(block_a), tuple(block_b)}

    def old_hash_with_collision(x):  # what a collision search finds for Python's hash, forced here
        if isinstance(x, tuple) and len(x) == 2 and x[1] in colliding:
            return 1234567
        return builtins.hash(x)

    # The old key function looked `hash` up in this module: with the patch its two blocks share one key.
    monkeypatch.setattr(kv_cache, "hash", old_hash_with_collision, raising=False)
    assert old_hash_with_collision((None, tuple(block_a))) == old_hash_with_collision((None, tuple(block_b)))

    first = _complete(server, block_a + tail)
    second = _complete(server, block_b + tail)
    assert _cached(second) == 0, "the second prompt was served the first prompt's cached block"
    # the reference: the same prompt computed whole (echo + logprobs computes every position, no cache)
    whole = _complete(server, block_b + tail, echo=True, logprobs=0)
    assert second["choices"][0]["text"] and whole["choices"][0]["text"].endswith(second["choices"][0]["text"])
    assert first["choices"][0]["text"] != "" and _cached(_complete(server, block_a + tail)) == BLOCK
    root = kv_cache.salt_digest(None)  # the new key separates the two blocks
    assert kv_cache.block_digest(root, block_a) != kv_cache.block_digest(root, block_b)


def test_cache_salt_separates_requests(server):
    prompt = list(range(500, 500 + 2 * BLOCK + 3))
    assert _cached(_complete(server, prompt, cache_salt="user-1")) == 0
    assert _cached(_complete(server, prompt, cache_salt="user-2")) == 0, "another salt saw user-1's blocks"
    assert _cached(_complete(server, prompt)) == 0, "an unsalted request saw a salted one's blocks"
    assert _cached(_complete(server, prompt, cache_salt="user-1")) == 2 * BLOCK
    assert _cached(_complete(server, prompt)) == 2 * BLOCK


def test_cache_salt_on_chat(server):
    messages = [{"role": "user", "content": "The secret PIN of the account is 4711, remember it well. " * 3}]

    def chat(**extra) -> dict:
        body = {"model": MODEL_NAME, "messages": messages, "max_tokens": 2, "temperature": 0, **extra}
        r = httpx.post(f"{server.url}/chat/completions", json=body, headers=HEADERS, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()

    assert _cached(chat(cache_salt="alice")) == 0
    assert _cached(chat(cache_salt="mallory")) == 0
    assert _cached(chat(cache_salt="alice")) >= BLOCK


@pytest.mark.parametrize("salt", ["", "x" * 1025])
def test_bad_cache_salt_is_a_400(server, salt):
    body = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 1, "cache_salt": salt}
    r = httpx.post(f"{server.url}/completions", json=body, headers=HEADERS, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt", r.text
