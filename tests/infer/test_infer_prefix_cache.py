"""Automatic prefix caching: hashed full blocks, reference counts, LRU eviction; outputs never change."""

from __future__ import annotations

import itertools

import pytest
import torch
from infer_helpers import GREEDY, LLMEngine, SamplingParams, tiny_model

from dsv3.infer.kv_cache import BlockAllocator


@pytest.fixture(scope="module")
def model():
    return tiny_model(256)


_COUNT = itertools.count()


def _ids(n, seed):
    return torch.randint(2, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _run(engine, prompts, params):
    """Add all prompts at once, step to the end -> RequestOutputs in prompt order."""
    rids = [f"r{next(_COUNT)}" for _ in prompts]
    for rid, p, sp in zip(rids, prompts, params):
        engine.add_request(rid, None, p, sp)
    done = {}
    for _ in range(5000):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[r] for r in rids]


def _chat(engine, convs, turns, new_tokens=8, sp=None):
    """Multi-turn: each turn re-sends the whole conversation plus a new user message."""
    history = [list(c[0]) for c in convs]
    outs = []
    for t in range(turns):
        prompts = [h + (convs[i][t] if t else []) for i, h in enumerate(history)]
        res = _run(engine, prompts, [sp or GREEDY(new_tokens)] * len(prompts))
        for i, r in enumerate(res):
            history[i] = prompts[i] + r.outputs[0].token_ids
        outs.append(res)
    return outs


def test_allocator_refcounts_and_lru():
    a = BlockAllocator(4)
    x = a.allocate(2)
    a.register(x[0], 11), a.register(x[1], 22)
    assert a.lookup([11, 22, 33]) == x and a.num_free == 2
    a.share(x[:1])  # a second user of block x[0]
    a.free(x)
    assert a.num_free == 3 and a.refs[x[0]] == 1  # x[0] still used
    a.free(x[:1])
    assert a.num_free == 4 and a.lookup([11, 22]) == x  # free but still cached
    fresh = a.allocate(2)  # never-registered blocks go first
    assert not set(fresh) & set(x) and a.lookup([11]) == x[:1]
    a.allocate(1)  # evicts the least recently freed cached block: x[1] (a sequence's tail goes first)
    assert a.lookup([11, 22]) == x[:1]
    a.allocate(1)
    assert a.lookup([11]) == [] and a.num_free == 0 and not a.cached


def test_second_turn_hits_the_cache_and_outputs_match(model):
    convs = [[_ids(100, s), _ids(10, s + 50)] for s in range(3)]
    on = LLMEngine(model, None, num_gpu_blocks=256, block_size=4, max_num_seqs=4)
    off = LLMEngine(model, None, num_gpu_blocks=256, block_size=4, max_num_seqs=4, enable_prefix_caching=False)
    res_on, res_off = _chat(on, convs, 2), _chat(off, convs, 2)
    for a, b in zip(res_on, res_off):
        assert [r.outputs[0].token_ids for r in a] == [r.outputs[0].token_ids for r in b]
    for first, second in zip(*res_on):
        shared = len(first.prompt_token_ids) + len(first.outputs[0].token_ids)
        assert second.num_cached_tokens >= 0.9 * shared, (second.num_cached_tokens, shared)
        assert second.num_cached_tokens < len(second.prompt_token_ids)
    assert all(r.num_cached_tokens == 0 for r in res_off[1])
    st = on.stats()
    assert st["prefix_cache_hits"] == sum(r.num_cached_tokens for r in res_on[1])
    assert st["prefix_cache_queries"] == sum(len(r.prompt_token_ids) for t in res_on for r in t)
    assert on.cache_info()["used_blocks"] == 0 and off.stats()["prefix_cache_queries"] == 0


def test_sampled_n2_and_concurrent_shared_system_prompt(model):
    """Requests sharing a system prompt, sampled with seeds and n=2: identical with caching on and off."""
    system = _ids(40, 7)
    prompts = [system + _ids(5, 100 + i) for i in range(4)]
    sp = SamplingParams(temperature=0.8, top_p=0.9, seed=5, n=2, max_tokens=6)
    on = LLMEngine(model, None, num_gpu_blocks=128, block_size=4, max_num_seqs=8)
    off = LLMEngine(model, None, num_gpu_blocks=128, block_size=4, max_num_seqs=8, enable_prefix_caching=False)
    first = _run(on, prompts[:1], [sp])  # the system prompt enters the cache
    a, b = _run(on, prompts[1:], [sp] * 3), _run(off, prompts[1:], [sp] * 3)
    assert [[c.token_ids for c in r.outputs] for r in a] == [[c.token_ids for c in r.outputs] for r in b]
    assert all(r.num_cached_tokens == 40 for r in a) and first[0].num_cached_tokens == 0


def test_eviction_under_memory_pressure_keeps_outputs(model):
    """A 24-block pool for 4 conversations: cached prefixes are evicted (LRU) and recomputed."""
    convs = [[_ids(30, s), _ids(6, s + 9), _ids(6, s + 19)] for s in range(4)]
    on = LLMEngine(model, None, num_gpu_blocks=24, block_size=4, max_num_seqs=2)
    off = LLMEngine(model, None, num_gpu_blocks=24, block_size=4, max_num_seqs=2, enable_prefix_caching=False)
    res_on, res_off = _chat(on, convs, 3), _chat(off, convs, 3)
    for a, b in zip(res_on, res_off):
        assert [r.outputs[0].token_ids for r in a] == [r.outputs[0].token_ids for r in b]
    st = on.stats()
    assert 0 < st["prefix_cache_hits"] < sum(len(r.prompt_token_ids) - 1 for r in res_on[1] + res_on[2])  # some evicted
    assert st["prefix_cached_blocks"] <= 24 and on.cache_info()["used_blocks"] == 0


def test_preemption_with_caching(model):
    prompts = [_ids(n, 30 + n) for n in (9, 14, 11, 7)]
    big = LLMEngine(model, None, num_gpu_blocks=128, block_size=4, max_num_seqs=4, enable_prefix_caching=False)
    small = LLMEngine(model, None, num_gpu_blocks=14, block_size=4, max_num_seqs=4)
    want = [r.outputs[0].token_ids for r in _run(big, prompts, [GREEDY(20)] * 4)]
    got = _run(small, prompts, [GREEDY(20)] * 4)
    assert [r.outputs[0].token_ids for r in got] == want
    st = small.stats()
    assert st["num_preemptions"] > 0 and st["prefix_cache_hits"] > 0  # recompute reused cached blocks
    assert all(r.num_cached_tokens == 0 for r in got)  # reported for the first admission only


def test_prompt_logprobs_requests_compute_every_position(model):
    prompt = _ids(24, 3)
    sp = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=1)
    on = LLMEngine(model, None, num_gpu_blocks=64, block_size=4)
    off = LLMEngine(model, None, num_gpu_blocks=64, block_size=4, enable_prefix_caching=False)
    _run(on, [prompt], [GREEDY(2)])  # cache the prompt
    a, b = _run(on, [prompt], [sp])[0], _run(off, [prompt], [sp])[0]
    assert a.num_cached_tokens == 0 and len(a.prompt_logprobs) == 24
    for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
        assert x.keys() == y.keys()
        assert all(abs(x[k].logprob - y[k].logprob) < 1e-4 for k in x)
    again = _run(on, [prompt], [GREEDY(2)])[0]  # a plain request still hits (all but the last token)
    assert again.num_cached_tokens == 20
