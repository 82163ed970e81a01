"""DeepSeek-V3.2 (sparse attention) through the engine against transformers' `DeepseekV32ForCausalLM.generate`:
greedy tokens over 64 new tokens, far past `index_topk` (8), through the paged cache with indexer keys,
chunked prefill, a batch of mixed lengths, a prefix-cache hit and MTP-free decode; TP 2 in one test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import dsv3
from infer_helpers import LLMEngine, engine_greedy, hf_greedy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from hf_oracle import make_hf_v32_checkpoint  # noqa: E402


def _prompts(lengths, seed=1, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("v32")
    hf = make_hf_v32_checkpoint(d)
    return hf, dsv3.from_pretrained(d, dtype=torch.float32), d


def test_greedy_64_tokens_match_transformers(pair):
    hf, ours, _ = pair
    prompt = _prompts([20])[0]
    engine = LLMEngine(ours, None, block_size=4, num_gpu_blocks=64, max_num_batched_tokens=8)  # chunked prefill
    want = hf_greedy(hf, prompt, 64)
    assert engine_greedy(engine, [prompt], 64)[0] == want
    assert engine.cache_info()["bytes_per_token_per_layer"] == (24 + 8 + 16) * 4  # latent + indexer key, fp32


def test_batch_and_prefix_cache_equal_transformers(pair):
    hf, ours, _ = pair
    prompts = _prompts([3, 29, 11, 17], seed=2)
    want = [hf_greedy(hf, p, 24) for p in prompts]
    engine = LLMEngine(ours, None, block_size=4, num_gpu_blocks=128, max_num_seqs=8, enable_prefix_caching=True)
    assert engine_greedy(engine, prompts, 24) == want
    again = engine_greedy(engine, [prompts[1]], 24)[0]  # its 28 full-block tokens come from the cache
    assert again == want[1] and engine.stats()["prefix_cache_hits"] >= 24


TP = """\
import json
from dsv3 import LLM, SamplingParams
sp = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
prompts = {prompts}
one = [o.outputs[0].token_ids for o in LLM("{model}", device="cpu", dtype="float32", block_size=4).generate(prompts, sp)]
with LLM("{model}", tensor_parallel_size=2, device="cpu", dtype="float32", block_size=4) as llm:
    two = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
print(json.dumps({{"one": one, "two": two}}))
"""


@pytest.mark.slow
def test_tensor_parallel_2_equals_one_process_and_transformers(pair, tmp_path):
    """Heads split over 2 ranks, the indexer (and its key cache) replicated: same tokens as one process."""
    import json
    import os
    import subprocess

    hf, _, d = pair
    prompts = _prompts([21, 9], seed=3)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(dsv3.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", TP.format(prompts=prompts, model=d)], capture_output=True, text=True,
                         timeout=600, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["one"] == res["two"] == [hf_greedy(hf, p, 40) for p in prompts]


def test_hadamard_fp8_indexer_in_the_engine_equals_its_full_forward(pair):
    """The engine caches the rotated, FP8-rounded keys: its greedy tokens equal a full-sequence greedy loop."""
    _, _, d = pair
    model = dsv3.from_pretrained(d, dtype=torch.float32, index_impl="hadamard_fp8")
    prompt = _prompts([15], seed=5)[0]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(24):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    engine = LLMEngine(model, None, block_size=4, num_gpu_blocks=64, max_num_batched_tokens=8)
    assert engine_greedy(engine, [prompt], 24)[0] == ids[len(prompt):]


def test_int8_weights_quantise_the_indexer_projections_and_decode(pair):
    """Quantised weights (int8 per channel): MLA, experts and the indexer's projections quantised, its
    per-head weights (weights_proj) left dense; the engine decodes with them and its first greedy tokens
    equal the quantised model's own full-sequence ones (later ones may differ by int8 rounding between
    a 1-row and a many-row product, as for V3)."""
    from dsv3.quant.modules import QuantLinear

    _, _, d = pair
    model = dsv3.from_pretrained(d, dtype=torch.float32, quantization="int8")
    attn = model.model.layers[1].self_attn
    assert isinstance(attn.q_b_proj, QuantLinear) and isinstance(attn.indexer.wq_b, QuantLinear)
    assert not isinstance(attn.indexer.weights_proj, QuantLinear)
    prompt = _prompts([13], seed=6)[0]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(4):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    engine = LLMEngine(model, None, block_size=4, num_gpu_blocks=64)
    out = engine_greedy(engine, [prompt], 20)[0]
    assert len(out) == 20 and out[:4] == ids[len(prompt):]
