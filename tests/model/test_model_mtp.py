"""The MTP module against two references built from transformers' own modules (inference.md §d).

1. A hand-written reference from `DeepseekV3DecoderLayer` and `DeepseekV3RMSNorm` loaded with the
   MTP layer's weights: logits = head(norm(block(eh_proj([enorm(emb(t_{i+1})); hnorm(h_i)])))).
2. transformers 5.23's `MtpModel` (what `generate(use_mtp=True)` uses), loaded from the same files.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import dsv3
from hf_oracle import add_mtp_layer, make_hf_checkpoint

T = 72


def _setup(tmp_path):
    hf = make_hf_checkpoint(tmp_path)
    tensors = add_mtp_layer(tmp_path, hf)
    model = dsv3.from_pretrained(tmp_path, dtype=torch.float32)
    assert model.config.num_nextn_predict_layers == 1
    ids = torch.randint(0, hf.config.vocab_size, (2, T))
    return hf, tensors, model, ids


def test_mtp_matches_decoder_layer_reference(tmp_path):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm

    hf, tensors, model, ids = _setup(tmp_path)
    cfg, n = hf.config, hf.config.num_hidden_layers
    p = f"model.layers.{n}."
    block = DeepseekV3DecoderLayer(cfg, layer_idx=n).float().eval()
    own = {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}
    E = cfg.n_routed_experts
    own["mlp.experts.gate_up_proj"] = torch.stack(
        [torch.cat([own.pop(f"mlp.experts.{e}.gate_proj.weight"), own.pop(f"mlp.experts.{e}.up_proj.weight")]) for e in range(E)])
    own["mlp.experts.down_proj"] = torch.stack([own.pop(f"mlp.experts.{e}.down_proj.weight") for e in range(E)])
    block_sd = {k: own[k] for k in block.state_dict()}
    block.load_state_dict(block_sd, strict=True)
    norms = {}
    for key in ("enorm", "hnorm", "shared_head.norm"):
        norms[key] = DeepseekV3RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        norms[key].weight.data.copy_(own[f"{key}.weight"])
    eh = own["eh_proj.weight"]

    with torch.no_grad():
        out = hf(ids, output_hidden_states=True)
        h = out.hidden_states[-1]  # the main model's final (post-norm) hidden, as vLLM / SGLang feed it
        nxt = F.pad(ids[:, 1:], (0, 1), value=0)  # token i+1 at position i
        z = F.linear(torch.cat([norms["enorm"](hf.model.embed_tokens(nxt)), norms["hnorm"](h)], -1), eh)
        pos = torch.arange(T)[None].expand(2, -1)
        mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
        z = block(z, attention_mask=mask, position_ids=pos, position_embeddings=hf.model.rotary_emb(z, pos))
        ref = hf.lm_head(norms["shared_head.norm"](z))
        logits, (mtp,) = model(ids, return_mtp=True)
    assert (logits - out.logits).abs().max() <= 1e-4
    assert (mtp - ref).abs().max() <= 1e-4
    # the order of the concat matters: the swapped order gives different logits
    with torch.no_grad():
        mod = model.model.mtp[0]
        swapped = mod.eh_proj(torch.cat([mod.hnorm(h), mod.enorm(model.model.embed_tokens(nxt))], -1))
        assert (mod.block(swapped, *model.rope(torch.arange(T))) - mod.block(mod.eh_proj(torch.cat(
            [mod.enorm(model.model.embed_tokens(nxt)), mod.hnorm(h)], -1)), *model.rope(torch.arange(T)))).abs().max() > 1e-3


def test_mtp_matches_transformers_mtp_model(tmp_path):
    from transformers import DeepseekV3ForCausalLM
    from transformers.modeling_layers import MtpModel

    _, _, model, ids = _setup(tmp_path)
    main = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    # transformers finds MTP weights through this pattern, hard-wired to the 671B layer id 61
    main._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{main.config.num_hidden_layers}\..*"]
    mtp_model = MtpModel.from_pretrained(main).eval()
    with torch.no_grad():
        h = main(ids, output_hidden_states=True).hidden_states[-1]
        nxt = F.pad(ids[:, 1:], (0, 1), value=0)
        pos = torch.arange(T)[None].expand(2, -1)
        ref = mtp_model._project_to_logits(mtp_model.forward_layer(0, h, pos, None, input_ids=nxt))
        _, (mtp,) = model(ids, return_mtp=True)
    assert (mtp - ref).abs().max() <= 1e-4


def test_mtp_tied_to_main_embedding_and_head(tmp_path):
    _, _, model, _ = _setup(tmp_path)
    assert not any("embed_tokens" in k or "shared_head.head" in k for k, _ in model.model.mtp.named_parameters())
    # loading without MTP skips layer n (less memory), logits unchanged
    plain = dsv3.from_pretrained(tmp_path, dtype=torch.float32, mtp=False)
    assert plain.config.num_nextn_predict_layers == 0 and len(plain.model.mtp) == 0
