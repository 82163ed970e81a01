"""DeepSeek-V3.2 sparse attention (DSA) against transformers' `DeepseekV32ForCausalLM` (the oracle).

Tiny random models with `index_topk` 8 and sequences of 48-80 tokens, so most queries see far more
than 8 keys and the indexer's choice decides the logits. YaRN is on (original context 32).
"""

from __future__ import annotations

import json

import pytest
import torch

import dsv3
from dsv3.config.hf import from_hf_dict, load_hf_config
from dsv3.errors import UserError
from hf_oracle import BASE, make_hf_v32_checkpoint

VARIANTS = {
    "yarn_topk8": dict(),
    "topk16_heads4_dense0": dict(index_topk=16, index_n_heads=4, index_head_dim=24, first_k_dense_replace=0),
    "noyarn_topk8": dict(rope_scaling=None),
}


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("attn_impl", ["naive", "absorb"])
def test_logits_match_transformers_v32(tmp_path, name, attn_impl):
    hf = make_hf_v32_checkpoint(tmp_path, **VARIANTS[name])
    model = dsv3.from_pretrained(tmp_path, dtype=torch.float32, attn_impl=attn_impl)
    assert model.config.sparse_attention and model.model.layers[0].self_attn.indexer is not None
    ids = torch.randint(0, hf.config.vocab_size, (2, 72))
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids)
    assert (out - ref).abs().max().item() <= 1e-4
    # sparsity bites: the same weights attending densely give other logits past index_topk tokens
    dense = dsv3.from_pretrained(tmp_path, dtype=torch.float32, attn_impl=attn_impl)
    for layer in dense.model.layers:
        layer.self_attn.indexer.topk = 10_000
    with torch.no_grad():
        d = dense(ids)
    k = model.config.index_topk
    assert (d[:, :k] - out[:, :k]).abs().max().item() <= 1e-4  # fewer visible keys than top-k: identical
    assert (d[:, k + 8:] - out[:, k + 8:]).abs().max().item() > 1e-2


def test_selected_tokens_equal_transformers(tmp_path):
    """The indexer's top-k sets equal transformers' wherever the k-th and (k+1)-th scores are not tied."""
    hf = make_hf_v32_checkpoint(tmp_path)
    model = dsv3.from_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, hf.config.vocab_size, (1, 64))
    got_hf, got_ours = {}, {}
    hooks = [layer.self_attn.indexer.register_forward_hook(lambda m, a, o, i=i: got_hf.__setitem__(i, o))
             for i, layer in enumerate(hf.model.layers)]
    hooks += [layer.self_attn.indexer.register_forward_hook(lambda m, a, o, i=i: got_ours.__setitem__(i, (a, o)))
              for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        hf(ids), model(ids)
    for h in hooks:
        h.remove()
    k, compared = model.config.index_topk, 0
    for i, (args, chosen) in got_ours.items():
        ix = model.model.layers[i].self_attn.indexer
        x, q_lat, cos, sin, visible = args
        scores = ix.scores(x, q_lat, cos, sin, ix.keys(x, cos, sin)).masked_fill(~visible, float("-inf"))
        top = scores.topk(k + 1, dim=-1).values
        for t in range(k, ids.shape[1]):  # rows with more than k visible keys
            if top[0, t, k - 1] - top[0, t, k] < 1e-4:
                continue
            ours = set(chosen[0, t].nonzero().flatten().tolist())
            theirs = set(got_hf[i][0, t].tolist())
            assert ours == theirs, (i, t)
            compared += 1
    assert compared > 100


def test_save_pretrained_loads_in_transformers(tmp_path):
    from transformers import DeepseekV32ForCausalLM

    make_hf_v32_checkpoint(tmp_path / "src")
    model = dsv3.from_pretrained(tmp_path / "src", dtype=torch.float32)
    model.save_pretrained(tmp_path / "out", mtp_copies=False)
    conf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert conf["model_type"] == "deepseek_v32" and conf["architectures"] == ["DeepseekV32ForCausalLM"]
    assert conf["index_topk"] == 8
    back = DeepseekV32ForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = torch.randint(0, BASE["vocab_size"], (1, 56))
    with torch.no_grad():
        assert (back(ids).logits - model(ids)).abs().max().item() <= 1e-4


def _hf(**kw):
    base = {k: v for k, v in BASE.items() if k != "rope_scaling"}
    return {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], **base, **kw}


def test_config_family():
    v32 = from_hf_dict(_hf(model_type="deepseek_v32", architectures=["DeepseekV32ForCausalLM"]))
    assert (v32.index_topk, v32.index_n_heads, v32.index_head_dim) == (2048, 64, 128)  # transformers' defaults
    assert from_hf_dict(_hf()).index_topk == 0  # V3 / V3.1: dense MLA
    kimi = from_hf_dict(_hf(model_type="kimi_k2", n_routed_experts=384, n_group=1, topk_group=1, num_experts_per_tok=8))
    assert (kimi.n_routed_experts, kimi.n_group) == (384, 1)
    assert from_hf_dict(_hf(n_routed_experts=64, n_group=1, topk_group=1)).n_routed_experts == 64  # Moonlight-style
    from dsv3.tools.info import family

    greedy = from_hf_dict(_hf(topk_method="greedy", scoring_func="softmax", n_group=2, topk_group=1))
    assert "no group limit" in family(greedy)  # V2's greedy routes over all experts whatever n_group says
    assert "2 groups keep 1" in family(from_hf_dict(_hf(n_group=2, topk_group=1)))
    with pytest.raises(UserError, match="model_type 'llama'"):
        from_hf_dict(_hf(model_type="llama", architectures=["LlamaForCausalLM"]))
    with pytest.raises(UserError, match="index_topk is set but model_type is 'deepseek_v3'"):
        from_hf_dict(_hf(index_topk=16))
    with pytest.raises(UserError, match="mlp_layer_types"):
        from_hf_dict(_hf(model_type="deepseek_v32", mlp_layer_types=["sparse", "sparse", "sparse"]))
    with pytest.raises(UserError, match="needs q_lora_rank"):
        from_hf_dict(_hf(model_type="deepseek_v32", q_lora_rank=None))


def test_v32_config_json_of_transformers_round_trips(tmp_path):
    from transformers import DeepseekV32Config

    DeepseekV32Config(**{k: v for k, v in BASE.items() if k not in ("rope_scaling", "num_nextn_predict_layers")},
                      index_topk=8, index_n_heads=8, index_head_dim=16).save_pretrained(tmp_path)
    cfg = load_hf_config(tmp_path)
    assert (cfg.index_topk, cfg.index_n_heads, cfg.index_head_dim) == (8, 8, 16)


def test_info_reports_sparse_attention(tmp_path, capsys):
    from dsv3.cli import main

    make_hf_v32_checkpoint(tmp_path)
    assert main(["info", "--model", str(tmp_path), "--bandwidth", "10"]) == 0
    out = capsys.readouterr().out
    assert "DeepSeek-V3.2 sparse attention (indexer: 8 heads x 16, top-8 keys, plain fp32 scores)" in out
    assert "names and shapes match config.json" in out  # the indexer tensors are checked too
    # latent (24 + 8) + indexer key 16, for 3 layers
    assert "KV cache per token (absorbed latent + indexer key, all layers)" in out and "144 values" in out
    assert main(["info", "--config", "deepseek_v3_671b", "--set", "index_topk=2048", "--seq-len", "131072"]) == 0
    out = capsys.readouterr().out
    assert "at 131072 tokens: sparse vs dense MLA  1.24B vs 5.37B (4.3x fewer)" in out


def test_hadamard_is_an_orthonormal_rotation():
    from dsv3.model.qdq import hadamard

    x, y = torch.randn(5, 3, 128, dtype=torch.float64), torch.randn(5, 3, 128, dtype=torch.float64)
    assert torch.allclose(hadamard(hadamard(x)), x, atol=1e-5)  # computed in fp32
    assert torch.allclose((hadamard(x) * hadamard(y)).sum(-1), (x * y).sum(-1), atol=1e-4)
    h = hadamard(torch.eye(8, dtype=torch.float64))
    assert torch.allclose(h.abs(), torch.full((8, 8), 8 ** -0.5, dtype=torch.float64), atol=1e-7)
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(torch.randn(2, 24))


def test_hadamard_fp8_indexer_scores(tmp_path, capsys):
    """DeepSeek's reference precision: FP8 values of the rotated q and k; the same keys as the plain path
    except near-ties, logits close to transformers' (plain) ones, and `dsv3 info` says which path runs."""
    from dsv3.cli import main

    hf = make_hf_v32_checkpoint(tmp_path, index_head_dim=16)
    plain = dsv3.from_pretrained(tmp_path, dtype=torch.float32)
    fp8 = dsv3.from_pretrained(tmp_path, dtype=torch.float32, index_impl="hadamard_fp8")
    assert fp8.config.index_impl == "hadamard_fp8" and plain.config.index_impl == "plain"
    ids = torch.randint(0, hf.config.vocab_size, (2, 64))
    got = {}
    plain.model.layers[0].self_attn.indexer.register_forward_hook(lambda m, a, o: got.update(args=a))
    with torch.no_grad():
        assert (plain(ids) - hf(ids).logits).abs().max() <= 1e-4
        x, q_lat, cos, sin, visible = got["args"]  # layer 0's inputs: the same for both paths
        scores = {}
        for name, m in (("plain", plain), ("fp8", fp8)):
            ix = m.model.layers[0].self_attn.indexer
            scores[name] = ix.scores(x, q_lat, cos, sin, ix.keys(x, cos, sin)).masked_fill(~visible, 0.0)
            got[name] = ix.select(scores[name], visible)
    rel = ((scores["fp8"] - scores["plain"]).norm() / scores["plain"].norm()).item()
    overlap = ((got["fp8"] & got["plain"])[:, 8:].sum(-1).float() / 8).mean().item()  # rows with > 8 keys
    print(f"hadamard_fp8 vs plain: scores rel err {rel:.4f}, keys shared {overlap:.3f}")
    assert 0 < rel < 0.1 and 0.85 < overlap < 1.0  # FP8 values (not a no-op), most keys the same
    fp8.save_pretrained(tmp_path / "out", mtp_copies=False, tokenizer=None)
    assert "index_impl" not in json.loads((tmp_path / "out" / "config.json").read_text())  # a runtime switch
    capsys.readouterr()
    assert main(["info", "--model", str(tmp_path), "--bandwidth", "10"]) == 0
    assert "plain fp32 scores" in capsys.readouterr().out
