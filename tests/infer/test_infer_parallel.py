"""Tensor- and expert-parallel inference (`dsv3.infer.parallel`): greedy and seeded sampled tokens of
2- and 4-rank gloo layouts equal the single-process engine and transformers' `generate`; each rank
reads only its slices (FP8 dequantised per slice) and holds 1/N of the sharded weights; sizes that
do not divide give one line.

The oracle checkpoint is `tests/model/hf_oracle.py`'s tiny V3 (YaRN with original context 32, so
prompts of up to 20 tokens + 64 new ones run past it) with an MTP layer, which the speculative job uses.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
import tp_harness
from infer_helpers import LLMEngine, SamplingParams, hf_greedy, make_hf_checkpoint

import dsv3
from dsv3.errors import UserError
from dsv3.infer.parallel import ParallelContext, shard_model, weight_bytes
from dsv3.infer.parallel_load import load_sharded

from hf_oracle import add_mtp_layer  # noqa: E402  (tests/model, on the path through infer_helpers)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "checkpoint"))

N_NEW = 64


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp_ckpt")
    hf = make_hf_checkpoint(d)
    add_mtp_layer(d, hf)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 512, (n,), generator=g).tolist() for n in (20, 7, 13)]
    return d, hf, prompts


def test_tp_ep_layouts_equal_single_process_and_transformers(ckpt):
    d, hf, prompts = ckpt
    engine = LLMEngine.from_pretrained(d, dtype=torch.float32, device="cpu", block_size=4, num_gpu_blocks=96, max_num_batched_tokens=16)
    routes: dict = {}
    greedy = tp_harness.run(engine, {str(i): (p, tp_harness.greedy(N_NEW, routes=True)) for i, p in enumerate(prompts)}, routes)
    want = [greedy[str(i)][0] for i in range(len(prompts))]
    want_routes = [routes[str(i)] for i in range(len(prompts))]
    assert want == [hf_greedy(hf, p, N_NEW) for p in prompts]  # the single-process engine is right
    want_sampled = tp_harness.run(engine, {"s": (prompts[0], SamplingParams(**tp_harness.SAMPLED))})["s"]
    full = weight_bytes(engine.model, ParallelContext(rank=0, world=1))["total"]

    int8 = LLMEngine.from_pretrained(d, dtype=torch.float32, device="cpu", block_size=4, num_gpu_blocks=96, quantization="int8")
    want_int8 = tp_harness.run(int8, {"q": (prompts[0], tp_harness.greedy(16))})["q"][0]

    layouts = {2: [(2, 1, False), (1, 2, False), (2, 2, True)], 4: [(4, 2, False)]}  # (4, 2): tp 4, experts 2 x 2
    for world, jobs in layouts.items():
        quant_job = [(str(d), 2, 2, prompts[:1], 16, False, "int8")] if world == 2 else []
        results = tp_harness.spawn(world, [(str(d), tp, ep, prompts, N_NEW, spec) for tp, ep, spec in jobs] + quant_job)
        if quant_job:
            # each rank quantises its own shard (row-parallel layers' per-channel scales over the shard) and
            # its activations per 32-value block of its shard (the Q8 kernels): another quantisation than the
            # single-process int8 engine's, so on this random model (near-tied logits) only the first token
            # is asserted equal; the whole sequence is asserted for the unquantised layouts below
            assert "ok" in results[-1], results[-1].get("trace")
            got_int8 = results.pop()["ok"]["greedy"][0]
            assert len(got_int8) == len(want_int8) and got_int8[0] == want_int8[0], (got_int8, want_int8)
        for (tp, ep, spec), res in zip(jobs, results):
            assert "ok" in res, res.get("trace")
            got = res["ok"]
            label = f"world {world} tp {tp} ep {ep} speculative {spec}"
            assert got["greedy"] == want, label
            # return_routed_experts: global expert ids, the same on every rank and as in one process
            assert got["routes_every_rank_equal"] and got["routes"] == want_routes, label
            if not spec:  # speculation draws its random numbers differently (same distribution, other samples)
                assert got["sampled"] == want_sampled, label
            b = got["bytes"]
            assert b["sharded"] * world == b["sharded_full"], label  # exactly 1/N of every sharded tensor
            assert b["total"] < full * (0.75 if tp > 1 else 0.9), label
            # the latent cache is replicated per rank (it has no head axis): the whole latent per token and layer
            per_layer = engine.cache_info()["bytes_per_token_per_layer"]
            assert got["cache_bytes_per_token"] == per_layer * (engine.model_config.num_hidden_layers + spec), label


def test_sharded_fp8_load_reads_only_slices(ckpt, tmp_path, monkeypatch):
    from test_checkpoint_fp8_convert import make_fp8_checkpoint

    d, _, _ = ckpt
    make_fp8_checkpoint(d, tmp_path / "fp8")
    full = dsv3.from_pretrained(tmp_path / "fp8", dtype=torch.float32, quantization="none", mtp=True)
    sd_full = full.state_dict()
    from dsv3.checkpoint.reader import CheckpointReader

    def no_full_reads(self, name):
        raise AssertionError(f"read the whole of {name}")

    monkeypatch.setattr(CheckpointReader, "tensor", no_full_reads)
    file_bytes = (tmp_path / "fp8" / "model.safetensors").stat().st_size
    for rank in range(4):
        ctx = ParallelContext(rank=rank, world=4, tp_size=4, ep_size=2)
        part = load_sharded(tmp_path / "fp8", ctx, dtype=torch.float32, mtp=True)
        for name, t in part.state_dict().items():
            assert torch.equal(t, sd_full[name][ctx.local_index(name, tuple(sd_full[name].shape))]), (rank, name)
        assert part.bytes_read < 0.3 * file_bytes  # its slices (and the small replicated tensors) only
        attn = part.model.layers[0].self_attn
        assert attn.n_heads == 1 and attn.q_b_proj.weight.shape[0] == attn.qk_dim
        assert part.model.layers[1].mlp.experts.gate_proj.shape == (4, 16, 64)  # 8 experts / ep 2, width 32 / 2


def test_sizes_that_do_not_divide_are_one_line(tiny_config):
    cfg = dataclasses.replace(tiny_config, num_attention_heads=4)
    with pytest.raises(UserError, match=r"^num_attention_heads 4 is not divisible by tensor_parallel_size 3"):
        ParallelContext(rank=0, world=3, tp_size=3).validate(cfg)
    with pytest.raises(UserError, match=r"^n_routed_experts 6 is not divisible by the expert parallel size 4"):
        ParallelContext(rank=0, world=4, tp_size=1, ep_size=4).validate(dataclasses.replace(cfg, n_routed_experts=6, n_group=1, topk_group=1))
    with pytest.raises(UserError, match="must equal the number of ranks"):
        ParallelContext(rank=0, world=4, tp_size=2)
    with pytest.raises(UserError, match="does not divide the number of ranks"):
        ParallelContext(rank=0, world=4, tp_size=4, ep_size=3)
    m = shard_model  # the same check runs when a model is cut
    with torch.device("meta"):
        from dsv3.model.transformer import Transformer

        model = Transformer(cfg)
    with pytest.raises(UserError, match="tensor_parallel_size 3"):
        m(model, ParallelContext(rank=0, world=3, tp_size=3))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL, one per rank)")
def test_tp2_ep2_nccl_equals_single_process_on_cuda(ckpt, monkeypatch):
    d, _, prompts = ckpt
    engine = LLMEngine.from_pretrained(d, dtype=torch.float32, device="cuda", block_size=4, num_gpu_blocks=96, max_num_batched_tokens=16)
    want = tp_harness.run(engine, {str(i): (p, tp_harness.greedy(32)) for i, p in enumerate(prompts)})
    monkeypatch.setenv("DSV3_TEST_BACKEND", "nccl")
    res = tp_harness.spawn(2, [(str(d), 2, 2, prompts, 32, False, None, "cuda")])[0]
    assert "ok" in res, res.get("trace")
    assert res["ok"]["greedy"] == [want[str(i)][0] for i in range(len(prompts))]
