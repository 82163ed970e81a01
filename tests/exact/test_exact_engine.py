"""Batch invariance of the engine (`LLMEngine(..., batch_invariant=True)`, through `LLM`): a request's
token ids, logprobs and prompt logprobs are the same bits alone and inside batches of 1 and 16 other
requests of other lengths, some sharing its prefix (prefix-cache hits), with its prompt chunked.
The default path fails the same comparison (checked below), so the check can fail."""

from __future__ import annotations

import random

import pytest

from dsv3 import LLM

from exact_helpers import fingerprint, one_thread, run, sampled, tiny_model  # noqa: F401 (one_thread: autouse fixture)

VOCAB = 512
rng = random.Random(0)
TARGET = [rng.randrange(2, VOCAB) for _ in range(22)]
SHARING = [TARGET[:12] + [rng.randrange(2, VOCAB) for _ in range(rng.randrange(1, 12))] for _ in range(4)]
OTHERS = SHARING + [[rng.randrange(2, VOCAB) for _ in range(rng.randrange(3, 40))] for _ in range(12)]


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab_size=VOCAB)


def engine(model, invariant: bool, chunk: int = 2048):
    return LLM(model, batch_invariant=invariant, max_num_seqs=17, max_num_batched_tokens=chunk, block_size=4,
               num_gpu_blocks=256).engine


def scenarios(model, invariant: bool) -> list:
    """Pairs (alone, batched) of the target request's fingerprint: with prompt logprobs, alone and beside 1
    other request; without them (so the prefix cache may serve it), alone and among 16 others (chunk 7,
    arriving after the prefix-sharing ones, so 12 of its tokens come from the cache)."""
    alone = run(engine(model, invariant), [("t", TARGET, sampled(7), 0)])["t"]
    pair = run(engine(model, invariant), [("t", TARGET, sampled(7), 0), ("o", OTHERS[5], sampled(1), 0)])["t"]
    alone_np = run(engine(model, invariant), [("t", TARGET, sampled(7, prompt_logprobs=False), 0)])["t"]
    many = [(f"o{i}", p, sampled(100 + i), 0) for i, p in enumerate(OTHERS)] + [("t", TARGET, sampled(7, prompt_logprobs=False), 3)]
    crowd = run(engine(model, invariant, chunk=7), many)["t"]
    assert crowd.num_cached_tokens >= 12  # its prefix came from the cache
    return [(fingerprint(alone), fingerprint(pair)), (fingerprint(alone_np), fingerprint(crowd))]


def test_request_is_bit_identical_alone_and_in_batches(model):
    (alone, pair), (alone_np, crowd) = scenarios(model, True)
    assert pair == alone
    assert crowd == alone_np
    assert crowd[:2] == alone[:2]  # prompt logprobs asked or not, the same tokens and logprobs


def test_default_path_differs(model):
    """The comparison above fails on the default (batched, naive-prefill) path: it does catch variance."""
    (alone, pair), (alone_np, crowd) = scenarios(model, False)
    assert pair != alone or crowd != alone_np
