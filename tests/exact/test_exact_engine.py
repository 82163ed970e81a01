"""Batch invariance of the engine (`LLMEngine(..., batch_invariant=True)`, through `LLM`): a request's
token ids, logprobs and prompt logprobs are the same bits alone and inside batches of 1 and 16 other
requests of other lengths, some sharing its prefix (prefix-cache hits), with its prompt chunked.
The default path fails the same comparison (checked below), so the check can fail."""

from __future__ import annotations

import random

import pytest

from dsv3 import LLM, SamplingParams

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


def speculative_pair(model, invariant: bool) -> tuple[list[int], list[int], int]:
    """A seeded sampled request (no logprobs: it speculates) with MTP speculation, alone and among 8 others
    (some with logprobs, which never speculate). -> (tokens alone, tokens in the batch, drafts verified)."""
    def eng():
        return LLM(model, batch_invariant=invariant, speculative=True, max_num_seqs=9, max_num_batched_tokens=7,
                   block_size=4, num_gpu_blocks=256).engine

    spec = SamplingParams(temperature=1.0, seed=3, max_tokens=10, ignore_eos=True)
    first = eng()
    alone = run(first, [("t", TARGET, spec, 0)])["t"].outputs[0].token_ids
    many = [(f"o{i}", p, sampled(50 + i) if i % 2 else SamplingParams(temperature=1.0, seed=50 + i, max_tokens=12, ignore_eos=True), 0)
            for i, p in enumerate(OTHERS[:8])]
    crowd = eng()
    batched = run(crowd, many + [("t", TARGET, spec, 1)])["t"].outputs[0].token_ids
    return alone, batched, first.stats()["spec_num_draft_tokens"] + crowd.stats()["spec_num_draft_tokens"]


def test_speculative_request_is_bit_identical_alone_and_in_a_batch(model):
    alone, batched, drafts = speculative_pair(model, True)
    assert drafts > 0
    assert batched == alone


def test_speculative_default_path_differs(model):
    alone, batched, _ = speculative_pair(model, False)
    assert batched != alone
