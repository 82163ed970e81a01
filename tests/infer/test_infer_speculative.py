"""Greedy MTP speculative decoding: token-identical to plain greedy; MTP drafts equal the model's MTP head."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from infer_helpers import GREEDY, LLMEngine, SamplingParams, engine_greedy, tiny_model

from dsv3.config.presets import load_model_config
from dsv3.model.mla import absorbed_attention as absorbed_decode
from dsv3.model.transformer import Transformer


@pytest.fixture(scope="module")
def model():
    cfg = load_model_config(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
    cfg = dataclasses.replace(cfg, vocab_size=256)
    assert cfg.num_nextn_predict_layers == 1
    torch.manual_seed(0)
    m = Transformer(cfg)
    m.reset_parameters(std=0.08)
    return m.eval()


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 256, (n,), generator=g).tolist() for n in lengths]


def test_two_query_rows_match_masked_reference(model):
    """absorbed_decode with T=2 queries per row (the verify step) == MLA.attend_absorbed with a causal mask."""
    attn = model.model.layers[1].self_attn
    cfg = model.config
    H, C, R = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    q_nope, q_pe = torch.randn(2, 2, H, cfg.qk_nope_head_dim), torch.randn(2, 2, H, R)
    lat = torch.randn(2, 7, C + R)
    last = torch.tensor([6, 3])  # row 0 queries at positions 5,6; row 1 at 2,3 (keys 4..6 are padding)
    pos = last[:, None] + torch.tensor([-1, 0])
    valid = torch.arange(7)[None, None, :] <= pos[:, :, None]
    w_uk, w_uv = attn.absorbed_weights()
    got = absorbed_decode(q_nope, q_pe, lat, valid, w_uk.contiguous(), w_uv.transpose(1, 2).contiguous(), attn.softmax_scale)
    for b in range(2):
        n = int(last[b]) + 1
        ref = attn.attend_absorbed(q_nope[b : b + 1], q_pe[b : b + 1], lat[b : b + 1, :n, :C], lat[b : b + 1, :n, C:],
                                   valid[b, :, :n])
        torch.testing.assert_close(got[b], ref[0], rtol=1e-4, atol=1e-5)


def test_speculative_equals_plain_greedy(model):
    prompts = _prompts([7, 19, 3])
    plain = engine_greedy(LLMEngine(model, None, num_gpu_blocks=64, block_size=4), prompts, 16)
    spec = LLMEngine(model, None, num_gpu_blocks=64, block_size=4, speculative=True, max_num_batched_tokens=8)
    assert engine_greedy(spec, prompts, 16, start_after={2: 5}) == plain
    assert spec.stats()["spec_steps"] > 0
    assert spec.cache_info()["free_blocks"] == 64


def test_mtp_drafts_equal_model_mtp_head(model):
    """After every step the draft is the argmax of the model's own MTP head (full forward) at the last
    computed position: the MTP cache is advanced correctly through prefill, verify and plain steps."""
    prompt = _prompts([9], seed=3)[0]
    eng = LLMEngine(model, None, num_gpu_blocks=32, block_size=4, speculative=True, max_num_batched_tokens=4)
    eng.add_request("a", None, prompt, GREEDY(12))
    seen = []  # (tokens so far, draft)
    while eng.has_unfinished_requests():
        eng.step()
        req = eng._requests.get("a")
        if req is not None and req.seqs[0].draft is not None:
            seen.append((len(req.seqs[0].token_ids), req.seqs[0].draft))
    final = prompt + engine_greedy(LLMEngine(model, None, num_gpu_blocks=32, block_size=4), [prompt], 12)[0]
    with torch.no_grad():
        _, (mtp,) = model(torch.tensor([final]), return_mtp=True)
    ref = mtp[0].argmax(-1).tolist()  # ref[i]: depth-1 MTP at position i (h_i, token i+1) predicts token i+2
    assert len(seen) >= 5
    assert [d for _, d in seen] == [ref[n - 2] for n, _ in seen]


def test_accept_branch_with_oracle_drafts(model, monkeypatch):
    """Drafts forced right (mostly) or wrong: both branches run and the output stays plain greedy."""
    prompts = _prompts([6, 11], seed=4)
    plain = engine_greedy(LLMEngine(model, None, num_gpu_blocks=64, block_size=4), prompts, 20)
    truth = [p + o for p, o in zip(prompts, plain)]
    eng = LLMEngine(model, None, num_gpu_blocks=64, block_size=4, speculative=True)
    runner = eng.runner
    real_prefill, real_decode = runner.mtp_prefill, runner.mtp_decode
    V = model.config.vocab_size

    def oracle(seq_truth, pos):  # the draft for token pos+2: right unless pos % 4 == 0
        tok = seq_truth[pos + 2] if pos + 2 < len(seq_truth) else 0
        return tok if pos % 4 else (tok + 1) % V

    def onehot(tokens):
        return torch.nn.functional.one_hot(torch.tensor(tokens), V).float()

    def mtp_prefill(pk, hidden, next_ids):
        real_prefill(pk, hidden, next_ids)  # keeps the MTP cache filled
        last = [int(pk.q_pos[rs[-1]]) for rs in pk.rows]
        return onehot([oracle(next(t for t in truth if len(t) - 20 == p + 1), p) for p in last])

    def mtp_decode(hidden, next_ids, positions, tables):
        real_decode(hidden, next_ids, positions, tables)
        seqs = {id(s.block_table): s for r in eng._requests.values() for s in r.seqs}
        rows = []
        for p, t in zip(positions, tables):
            seq_truth = truth[prompts.index(seqs[id(t)].token_ids[: seqs[id(t)].num_prompt_tokens])]
            rows.append([oracle(seq_truth, p + k) for k in range(len(next_ids[0]))])
        return torch.stack([onehot(r) for r in rows])

    monkeypatch.setattr(runner, "mtp_prefill", mtp_prefill)
    monkeypatch.setattr(runner, "mtp_decode", mtp_decode)
    assert engine_greedy(eng, prompts, 20) == plain
    assert eng.stats()["spec_num_accepted_tokens"] > 5 and eng.stats()["spec_num_draft_tokens"] > eng.stats()["spec_num_accepted_tokens"]  # both branches ran


# ---- sampled speculative decoding: rejection sampling keeps the target distribution exactly
def _chi2_ok(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    """Pearson chi-square of counts vs probs (cells with expected < 5 pooled) -> (statistic, a bound
    ~5 standard deviations above its mean, df + 5 sqrt(2 df))."""
    n = counts.sum()
    exp = probs * n
    small = exp < 5
    obs_c = torch.cat([counts[~small], counts[small].sum()[None]])
    exp_c = torch.cat([exp[~small], exp[small].sum()[None]])
    keep = exp_c > 0
    stat = float(((obs_c[keep] - exp_c[keep]) ** 2 / exp_c[keep]).sum())
    df = int(keep.sum()) - 1
    return stat, df + 5 * (2 * df) ** 0.5


def test_rejection_sample_is_exact():
    from dsv3.infer.sampling import race, rejection_sample

    N = 40_000
    p = torch.tensor([0.05, 0.4, 0.3, 0.0, 0.15, 0.1])
    q = torch.tensor([0.3, 0.1, 0.3, 0.2, 0.0, 0.1])
    torch.manual_seed(0)
    P, Q = p.expand(N, -1).clone(), q.expand(N, -1).clone()
    draft = race(Q, [None] * N)
    accepted, tok = rejection_sample(P, Q, draft, [None] * N)
    emp = torch.bincount(tok, minlength=6).float() / N
    assert (emp - p).abs().max() < 0.012, emp
    assert abs(accepted.float().mean() - torch.minimum(p, q).sum()) < 0.012  # the acceptance rate is sum min(p, q)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]  # seeded rows reproduce
    one = rejection_sample(P[:4], Q[:4], draft[:4], gens)[1]
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    assert torch.equal(one, rejection_sample(P[:4], Q[:4], draft[:4], gens)[1])


def _exact_second_token(model, prompt, sp):
    """Exact distribution of the second generated token: sum over t0 of p(t0) p(t1 | t0), each processed
    as the engine does (penalties on generated tokens, temperature, top-k/p)."""
    from dsv3.infer.sampling import add_penalties, apply_penalties, distribution, make_batch, token_counts

    V = model.config.vocab_size

    def probs(rows, outputs):
        with torch.no_grad():
            logits = model(torch.tensor(rows))[:, -1].float()
        b = make_batch([sp] * len(rows), [None] * len(rows), V, torch.device("cpu"))
        if add_penalties(b, [sp] * len(rows), torch.device("cpu")):
            logits = apply_penalties(logits, b, token_counts([prompt] * len(rows), V, logits.device), token_counts(outputs, V, logits.device))
        return distribution(logits, b)

    p0 = probs([prompt], [[]])[0]
    firsts = p0.nonzero()[:, 0].tolist()
    p1 = probs([prompt + [t] for t in firsts], [[t] for t in firsts])
    return (p0[firsts, None] * p1).sum(0)


@pytest.mark.parametrize("sp", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_k=6, top_p=0.9, presence_penalty=1.0)])
def test_sampled_speculative_matches_target_distribution(sp):
    model = tiny_model(64, seed=2, std=0.12)
    prompt = _prompts([6], seed=5)[0]
    prompt = [t % 64 for t in prompt]
    N = 1500
    sp = dataclasses.replace(sp, n=N, max_tokens=2, seed=11, ignore_eos=True)
    eng = LLMEngine(model, None, num_gpu_blocks=4 * N, block_size=4, speculative=True, max_num_seqs=N,
                    max_num_batched_tokens=1024)
    eng.add_request("s", None, prompt, sp)
    out = None
    while eng.has_unfinished_requests():
        for o in eng.step():
            out = o
    second = torch.tensor([c.token_ids[1] for c in out.outputs])
    stat, bound = _chi2_ok(torch.bincount(second, minlength=64).float(), _exact_second_token(model, prompt, sp))
    assert stat < bound, (stat, bound)
    st = eng.stats()
    assert st["spec_num_draft_tokens"] == N == out.metrics.spec_num_draft_tokens
    assert st["spec_num_accepted_tokens"] == out.metrics.spec_num_accepted_tokens
    assert 0 < st["spec_num_accepted_tokens"] < N  # both branches (accept / residual) ran


def test_mixed_greedy_and_sampled_batch(model):
    """Greedy rows verified beside sampled rows stay plain greedy; seeded sampled rows reproduce."""
    prompts = _prompts([7, 9])
    plain = engine_greedy(LLMEngine(model, None, num_gpu_blocks=64, block_size=4), prompts[:1], 12)[0]

    def run():
        eng = LLMEngine(model, None, num_gpu_blocks=64, block_size=4, speculative=True)
        eng.add_request("g", None, prompts[0], GREEDY(12))
        eng.add_request("s", None, prompts[1], SamplingParams(temperature=1.0, seed=4, max_tokens=12, repetition_penalty=1.3))
        done = {}
        while eng.has_unfinished_requests():
            done.update({o.request_id: o for o in eng.step() if o.finished})
        assert eng.stats()["spec_steps"] > 0
        return done["g"].outputs[0].token_ids, done["s"].outputs[0].token_ids

    g1, s1 = run()
    g2, s2 = run()
    assert g1 == plain and (g2, s2) == (g1, s1) and len(s1) == 12
