"""Greedy engine output vs transformers `generate`, and batching / joining / preemption invariance.

The oracle is transformers' DeepseekV3ForCausalLM with every weight random (`tests/model/hf_oracle.py`,
weights N(0, 0.08) so logits have clear winners); our model is loaded from its saved checkpoint.
Prompts of 20 tokens + 64 new tokens run past YaRN's original context (32) in the YaRN variants.
"""

from __future__ import annotations

import pytest
import torch
from infer_helpers import LLMEngine, engine_greedy, hf_greedy, make_pair

VARIANTS = {
    "v3_like_yarn": dict(),
    "no_qlora_1group_dense0_shared2": dict(q_lora_rank=None, norm_topk_prob=False, n_group=1, topk_group=1,
                                           first_k_dense_replace=0, n_shared_experts=2),
    "top1_noyarn": dict(num_experts_per_tok=1, rope_scaling=None, q_lora_rank=None),
}


def _prompts(lengths, seed=1, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("ckpt"))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_greedy_64_tokens_match_transformers(tmp_path, name):
    hf, ours = make_pair(tmp_path, **VARIANTS[name])
    prompt = _prompts([20])[0]
    # small blocks and a small prefill chunk so the paged + chunked paths are the ones exercised
    engine = LLMEngine(ours, None, block_size=4, num_gpu_blocks=64, max_num_batched_tokens=8)
    assert engine_greedy(engine, [prompt], 64)[0] == hf_greedy(hf, prompt, 64)


def test_batch_of_different_lengths_equals_each_alone(pair):
    hf, ours = pair
    prompts = _prompts([3, 29, 11, 1, 17])
    alone = [engine_greedy(LLMEngine(ours, None, block_size=4, num_gpu_blocks=64), [p], 24)[0] for p in prompts]
    engine = LLMEngine(ours, None, block_size=4, num_gpu_blocks=128, max_num_seqs=8)
    assert engine_greedy(engine, prompts, 24) == alone
    assert engine.stats()["prefill_steps"] == 1  # the five prompts were packed into one prefill forward
    assert alone[1] == hf_greedy(hf, prompts[1], 24)
    assert engine.cache_info()["free_blocks"] == 128  # everything returned


def test_request_added_midway_equals_alone(pair):
    _, ours = pair
    prompts = _prompts([9, 14, 5], seed=2)
    alone = [engine_greedy(LLMEngine(ours, None, block_size=4, num_gpu_blocks=64), [p], 20)[0] for p in prompts]
    engine = LLMEngine(ours, None, block_size=4, num_gpu_blocks=128, max_num_seqs=4)
    # prompt 1 joins after 6 decode steps of prompt 0, prompt 2 after 13 (mid-way through both)
    assert engine_greedy(engine, prompts, 20, start_after={1: 6, 2: 13}) == alone


def test_cache_full_preempts_and_recomputes_without_changing_tokens(pair):
    _, ours = pair
    prompts = _prompts([10, 12, 8, 9], seed=3)
    alone = [engine_greedy(LLMEngine(ours, None, block_size=4, num_gpu_blocks=64), [p], 30)[0] for p in prompts]
    # 14 blocks x 4 = 56 token slots: not enough for 4 x ~40 tokens at once
    engine = LLMEngine(ours, None, block_size=4, num_gpu_blocks=14, max_num_seqs=4)
    assert engine.max_model_len == 56
    assert engine_greedy(engine, prompts, 30) == alone
    assert engine.scheduler.num_preemptions > 0
    assert engine.cache_info()["free_blocks"] == 14


def test_chunked_prefill_equals_one_shot(pair):
    _, ours = pair
    prompt = _prompts([37], seed=4)[0]
    one = engine_greedy(LLMEngine(ours, None, block_size=16, num_gpu_blocks=16), [prompt], 16)
    chunked = LLMEngine(ours, None, block_size=4, num_gpu_blocks=64, max_num_batched_tokens=5)
    assert engine_greedy(chunked, [prompt], 16) == one
    assert chunked.stats()["prefill_steps"] == 8  # ceil(37 / 5)
    # several prompts through a 6-token budget: chunks of different prompts share steps
    prompts = _prompts([13, 4, 9], seed=5)
    alone = [engine_greedy(LLMEngine(ours, None, block_size=4, num_gpu_blocks=64), [p], 10)[0] for p in prompts]
    packed = LLMEngine(ours, None, block_size=4, num_gpu_blocks=64, max_num_batched_tokens=6)
    assert engine_greedy(packed, prompts, 10) == alone
    # steps: [p0 6] [p0 6] [p1 4 + p2 2] [p2 6]; a prompt with one token left finishes in a decode step
    assert packed.stats()["prefill_steps"] == 4
