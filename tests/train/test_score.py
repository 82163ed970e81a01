"""Trainer = server, bit for bit: the real `Trainer`'s teacher-forced `logprobs` equal (`==`) the sampled
and prompt logprobs of a batch-invariant engine holding the same weights, with MTP speculative decoding
on (rows that speculate batched with rows that report logprobs), and they are differentiable. The
default engine path gives other floats for the same tokens (checked, so the comparison can fail)."""

from __future__ import annotations

import random

import pytest
import torch

from dsv3.infer.engine import LLMEngine
from dsv3.infer.sampling import SamplingParams
from dsv3.model.transformer import Transformer
from dsv3.train.trainer import Trainer

from run_config import small_run

VOCAB = 129280


def _engine_logprobs(model, invariant: bool, prompts: list[list[int]]) -> tuple[list[list[int]], list[list[float]], dict]:
    """Sample from each prompt (seeded, logprobs and prompt logprobs) beside two greedy rows that speculate.
    -> (prompt + completion ids, their logprobs from position 1 on, engine stats)."""
    served = Transformer(model.config)
    served.load_state_dict(model.state_dict())  # the trainer's weights, copied as a weight sync would
    eng = LLMEngine(served, speculative=True, batch_invariant=invariant, max_num_batched_tokens=5,
                    block_size=4, num_gpu_blocks=64)
    for i, p in enumerate(prompts):
        eng.add_request(f"s{i}", None, p, SamplingParams(temperature=1.0, seed=i, max_tokens=5, ignore_eos=True,
                                                        logprobs=0, prompt_logprobs=0))
    for i, p in enumerate(prompts):
        eng.add_request(f"g{i}", None, p[::-1], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    outs = {}
    while eng.has_unfinished_requests():
        outs.update({o.request_id: o for o in eng.step() if o.finished})
    seqs, lps = [], []
    for i in range(len(prompts)):
        o = outs[f"s{i}"]
        c = o.outputs[0]
        seqs.append(o.prompt_token_ids + c.token_ids)
        lps.append([d[t].logprob for d, t in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:])]
                   + [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)])
    return seqs, lps, eng.stats()


@pytest.fixture
def one_thread():
    """Many one-token ops: a second thread only waits at barriers on a loaded machine (both sides of the
    comparison run in this process under the same count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_trainer_logprobs_equal_engine(wiki_prefix, tmp_path, one_thread):
    t = Trainer(small_run(wiki_prefix, tmp_path, train={"threads": 1}), quiet=True)
    assert torch.get_num_threads() == 1
    t.train_step()  # trained weights and routing biases, not the initial ones
    rng = random.Random(0)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(n)] for n in (9, 14)]
    seqs, engine_lps, stats = _engine_logprobs(t.model, True, prompts)
    assert stats["spec_num_draft_tokens"] > 0  # MTP drafts were verified in these steps
    scored = t.logprobs({"input_ids": seqs})
    assert [s.tolist() for s in scored] == engine_lps
    loss = -torch.stack([s.sum() for s in scored]).sum()
    loss.backward()  # the policy-gradient path: gradients reach attention, experts and router
    layer = t.model.model.layers[1]
    for p in (layer.self_attn.kv_b_proj.weight, layer.mlp.experts.gate_proj, layer.mlp.gate.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    _, default_lps, _ = _engine_logprobs(t.model, False, prompts)
    assert default_lps != engine_lps  # the default engine path is not the trainer's arithmetic
