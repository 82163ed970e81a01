"""Engine pieces: cache sizes, absorbed decode vs the model's reference paths, logprobs, bad input, abort."""

from __future__ import annotations

import math

import pytest
import torch
from infer_helpers import GREEDY, LLMEngine, SamplingParams, engine_greedy

from dsv3.config.presets import load_model_config
from dsv3.model.mla import absorbed_attention as absorbed_decode
from dsv3.model.mla import causal_mask
from dsv3.model.transformer import Transformer


def small_model(tiny_config, dtype=torch.float32, **overrides):
    import dataclasses

    cfg = dataclasses.replace(tiny_config, vocab_size=1024, **overrides)
    torch.manual_seed(0)
    m = Transformer(cfg)
    m.reset_parameters(std=0.08)
    return m.to(dtype).eval()


@pytest.fixture(scope="module")
def model():
    from pathlib import Path

    return small_model(load_model_config(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"))


@pytest.mark.parametrize("dtype,size", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_cache_bytes_per_token_per_layer(tiny_config, dtype, size):
    m = small_model(tiny_config, dtype)
    eng = LLMEngine(m, None, num_gpu_blocks=10, block_size=8)
    cfg = m.config
    info = eng.cache_info()
    assert info["bytes_per_token_per_layer"] == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * size
    assert info["bytes_per_token"] == info["bytes_per_token_per_layer"] * cfg.num_hidden_layers
    # the cache tensor holds exactly that, nothing per head
    assert eng.cache.data.numel() * eng.cache.data.element_size() == info["bytes_per_token"] * 10 * 8
    assert (info["num_blocks"], info["free_blocks"], info["used_blocks"]) == (10, 10, 0)
    eng.add_request("a", None, list(range(2, 13)), GREEDY(3))
    eng.step()  # prefill: 11 tokens -> 2 blocks
    assert eng.cache_info()["used_blocks"] == 2


def test_absorbed_decode_matches_model_reference_paths(model):
    """Batched paged decode attention == MLA.attend_absorbed == expanded (naive) attention, per row."""
    attn = model.model.layers[0].self_attn
    cfg = model.config
    H, P, R, C = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    lens = [5, 1, 9]
    S = max(lens)
    q_nope, q_pe = torch.randn(3, 1, H, P), torch.randn(3, 1, H, R)
    lat = torch.randn(3, S, C + R)
    valid = (torch.arange(S)[None] < torch.tensor(lens)[:, None])[:, None]  # [B,1,S]
    w_uk, w_uv = attn.absorbed_weights()
    got = absorbed_decode(q_nope, q_pe, lat, valid, w_uk.contiguous(), w_uv.transpose(1, 2).contiguous(), attn.softmax_scale)
    for b, n in enumerate(lens):
        args = (q_nope[b : b + 1], q_pe[b : b + 1], lat[b : b + 1, :n, :C], lat[b : b + 1, :n, C:])
        ref_abs = attn.attend_absorbed(*args, mask=None)[0, 0]
        ref_naive = attn.attend_naive(*args, mask=None, reference=True)[0, 0]
        torch.testing.assert_close(got[b, 0], ref_abs, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[b, 0], ref_naive, rtol=1e-4, atol=1e-5)


def test_engine_logits_match_full_forward(model):
    """Prefill (naive) and paged decode (absorbed) logits equal the model's plain forward."""
    ids = list(range(3, 30))
    eng = LLMEngine(model, None, num_gpu_blocks=32, block_size=4)
    with torch.no_grad():
        full = model(torch.tensor([ids + [7]]))[0].float()
    lp_prefill = eng.runner.prefill([(ids, 0, list(range(7)))], [True])[0]
    torch.testing.assert_close(lp_prefill, full[:-1], rtol=1e-4, atol=1e-4)
    lp_decode = eng.runner.decode([[7]], [len(ids)], [list(range(7))])
    torch.testing.assert_close(lp_decode[0, 0], full[-1], rtol=1e-4, atol=1e-4)


def test_bf16_cpu_runs_and_tracks_fp32(tiny_config):
    m32 = small_model(tiny_config)
    m16 = small_model(tiny_config, torch.bfloat16)
    ids = list(range(3, 20))
    e16 = LLMEngine(m16, None, num_gpu_blocks=16, block_size=8)
    assert e16.cache.data.dtype == torch.bfloat16
    out = engine_greedy(e16, [ids], 8)[0]
    assert len(out) == 8
    with torch.no_grad():
        ref = m32(torch.tensor([ids]))[0, -1].float()
    got = e16.runner.prefill([(ids, 0, list(range(3)))])[0][0]
    assert torch.nn.functional.cosine_similarity(got, ref, dim=0) > 0.99


def test_logprobs_and_prompt_logprobs(model):
    ids = list(range(5, 17))
    eng = LLMEngine(model, None, num_gpu_blocks=32, block_size=4)
    sp = SamplingParams(temperature=0.0, max_tokens=4, min_tokens=4, logprobs=3, prompt_logprobs=2)
    eng.add_request("a", None, ids, sp)
    final = None
    while eng.has_unfinished_requests():
        for o in eng.step():
            final = o
    comp = final.outputs[0]
    with torch.no_grad():
        lsm = model(torch.tensor([ids + comp.token_ids]))[0].float().log_softmax(-1)
    # generated tokens: top-3 plus the chosen one (greedy: chosen = rank 1)
    assert len(comp.logprobs) == 4
    total = 0.0
    for i, (tok, entry) in enumerate(zip(comp.token_ids, comp.logprobs)):
        pos = len(ids) - 1 + i
        assert len(entry) == 3 and entry[tok].rank == 1
        assert math.isclose(entry[tok].logprob, lsm[pos, tok].item(), abs_tol=1e-4)
        top = lsm[pos].topk(3)
        assert list(entry) == top.indices.tolist()
        total += entry[tok].logprob
    assert math.isclose(comp.cumulative_logprob, total, abs_tol=1e-5)
    # prompt logprobs: None first, then one entry per prompt token with the actual token's logprob and rank
    plp = final.prompt_logprobs
    assert len(plp) == len(ids) and plp[0] is None
    for j in range(1, len(ids)):
        e = plp[j][ids[j]]
        assert math.isclose(e.logprob, lsm[j - 1, ids[j]].item(), abs_tol=1e-4)
        assert e.rank == int((lsm[j - 1] > lsm[j - 1, ids[j]]).sum()) + 1
        assert len(plp[j]) in (2, 3)


def test_bad_input_fails_that_request_only(model):
    eng = LLMEngine(model, None, num_gpu_blocks=8, block_size=4)  # capacity 32 tokens -> max_model_len 32
    good = list(range(3, 9))
    alone = engine_greedy(LLMEngine(model, None, num_gpu_blocks=8, block_size=4), [good], 10)[0]
    eng.add_request("good", None, good, GREEDY(10))
    eng.step()
    cases = {
        "too_long": (list(range(2, 40)), GREEDY(4), "max_model_len"),
        "neg_temp": (good, SamplingParams(temperature=-1.0), "temperature"),
        "top_p_zero": (good, SamplingParams(top_p=0.0), "top_p"),
        "top_p_big": (good, SamplingParams(top_p=1.5), "top_p"),
        "max_tokens_0": (good, SamplingParams(max_tokens=0), "max_tokens"),
        "bad_id": ([3, 5000], GREEDY(2), "prompt_token_ids"),
        "empty": ([], GREEDY(2), "empty"),
        "good": (good, GREEDY(2), "already in use"),
    }
    for rid, (ids, sp, word) in cases.items():
        with pytest.raises(ValueError, match=word):
            eng.add_request(rid, None, ids, sp)
    with pytest.raises(ValueError, match="tokenizer"):
        eng.add_request("text", "hello", None, GREEDY(2))
    out = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            out[o.request_id] = o
    assert list(out) == ["good"] and out["good"].outputs[0].token_ids == alone


def test_abort_frees_blocks_and_reports(model):
    eng = LLMEngine(model, None, num_gpu_blocks=16, block_size=4)
    eng.add_request("a", None, list(range(3, 12)), GREEDY(50))
    eng.add_request("b", None, list(range(3, 8)), GREEDY(5))
    for _ in range(4):
        eng.step()
    eng.abort_request("a")
    outs = eng.step()
    a = [o for o in outs if o.request_id == "a"][0]
    assert a.finished and a.outputs[0].finish_reason == "abort"
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.cache_info()["free_blocks"] == 16


def test_max_model_len_ends_with_length(model):
    eng = LLMEngine(model, None, num_gpu_blocks=4, block_size=4)  # 16 tokens
    eng.add_request("a", None, list(range(3, 13)), SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))
    last = None
    while eng.has_unfinished_requests():
        last = eng.step() or last
    c = last[0].outputs[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 16 - 10


def test_bf16_cast_keeps_rope_frequencies_fp32(tiny_config):
    """The engine casts the model to its dtype; RoPE inverse frequencies must stay exact fp32."""
    m = small_model(tiny_config)
    ref = m.rotary.inv_freq.clone()
    eng = LLMEngine(m, None, num_gpu_blocks=4, block_size=4, dtype=torch.bfloat16)
    assert eng.model.rotary.inv_freq.dtype == torch.float32 and torch.equal(eng.model.rotary.inv_freq, ref)


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 13])
def test_head_matmul_equals_linear(rows):
    from dsv3.kernels.head import head_matmul

    x, w = torch.randn(rows, 64), torch.randn(1000, 64)
    torch.testing.assert_close(head_matmul(x, w), torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)
