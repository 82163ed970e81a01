"""The engine features of issue 16 on CUDA (fp32, so outputs compare exactly): prefix caching, sampled and
greedy MTP speculation with device generators, rejection sampling on the device."""

from __future__ import annotations

import pytest
import torch
from infer_helpers import LLMEngine, SamplingParams, engine_greedy, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _ids(n, seed):
    return torch.randint(2, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _engine(model, **kw):
    return LLMEngine(model, None, num_gpu_blocks=128, block_size=4, device="cuda", dtype="float32", **kw)


def test_prefix_caching_on_cuda_equals_off():
    model = tiny_model(256)
    prompts = [_ids(40, 1) + _ids(6, 10 + i) for i in range(3)]
    on, off = _engine(model), _engine(model, enable_prefix_caching=False)
    engine_greedy(on, prompts[:1], 4)  # the shared 40 tokens enter the cache
    assert engine_greedy(on, prompts, 8) == engine_greedy(off, prompts, 8)
    assert on.stats()["prefix_cache_hits"] >= 3 * 40


def test_speculative_on_cuda():
    model = tiny_model(256)
    prompts = [_ids(9, 3), _ids(5, 4)]
    assert engine_greedy(_engine(model, speculative=True), prompts, 12) == engine_greedy(_engine(model), prompts, 12)

    def sampled():
        eng = _engine(model, speculative=True)
        eng.add_request("s", None, prompts[0], SamplingParams(temperature=0.9, top_p=0.95, seed=3, n=4, max_tokens=10))
        out = None
        while eng.has_unfinished_requests():
            out = next((o for o in eng.step() if o.finished), out)
        assert eng.stats()["spec_steps"] > 0
        return [c.token_ids for c in out.outputs]

    assert sampled() == sampled()  # device generators reproduce


def test_rejection_sample_on_cuda():
    from dsv3.infer.sampling import race, rejection_sample

    N = 40_000
    p = torch.tensor([0.05, 0.4, 0.3, 0.0, 0.15, 0.1], device="cuda")
    q = torch.tensor([0.3, 0.1, 0.3, 0.2, 0.0, 0.1], device="cuda")
    P, Q = p.expand(N, -1).contiguous(), q.expand(N, -1).contiguous()
    _, tok = rejection_sample(P, Q, race(Q, [None] * N), [None] * N)
    assert (torch.bincount(tok, minlength=6).float() / N - p).abs().max() < 0.012
