"""Shared pieces of the batch-invariance tests: one torch thread while they run (the per-token path is
many small ops; a second thread only adds barrier waits on a loaded machine, and both sides of every
comparison run in this process under the same count), and a request runner with staggered arrivals."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "infer"))
from infer_helpers import tiny_model  # noqa: E402,F401  (tests/infer/infer_helpers.py)

from dsv3.infer.sampling import SamplingParams  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sampled(seed: int, max_tokens: int = 6, prompt_logprobs: bool = True) -> SamplingParams:
    """Seeded sampling at temperature 1 with the chosen and top-3 logprobs, and prompt logprobs (a request
    that asks for them computes its whole prompt: the prefix cache serves only requests without)."""
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens, ignore_eos=True, logprobs=3,
                          prompt_logprobs=2 if prompt_logprobs else None)


def run(engine, requests: list[tuple[str, list[int], SamplingParams, int]]) -> dict:
    """requests: (id, prompt ids, params, the engine step it arrives at) -> {id: final RequestOutput}."""
    done, step, pending = {}, 0, list(requests)
    while pending or engine.has_unfinished_requests():
        for r in [r for r in pending if r[3] <= step]:
            engine.add_request(r[0], None, r[1], r[2])
            pending.remove(r)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
    return done


def fingerprint(out) -> tuple:
    """Everything a request got back, as exact values: token ids, each token's logprob entries (id ->
    (logprob, rank)) and the prompt logprobs."""
    def entries(d):
        return None if d is None else {t: (lp.logprob, lp.rank) for t, lp in d.items()}

    c = out.outputs[0]
    return (c.token_ids, [entries(d) for d in c.logprobs], [entries(d) for d in out.prompt_logprobs or []])
