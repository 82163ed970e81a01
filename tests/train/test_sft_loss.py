"""SFT losses: masked tokens give exactly zero gradient, the loss equals transformers' with -100 labels,
and a packed sequence (block-diagonal attention, per-sample positions, MTP targets kept inside each
sample) computes exactly what its samples compute one by one."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dsv3.config.schema import ModelConfig
from dsv3.data.sft_dataset import build_sft_dataset
from dsv3.model import Transformer
from dsv3.train.loss import compute_loss, document_mask, mean_ce, shifted_mask

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from hf_oracle import make_hf_checkpoint  # noqa: E402  (tests/model/hf_oracle.py)

SMALL = dict(vocab_size=300, hidden_size=48, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=2,
             first_k_dense_replace=1, num_attention_heads=2, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16,
             qk_rope_head_dim=8, v_head_dim=16, rope_scaling=None, max_position_embeddings=128, n_routed_experts=8,
             n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, num_nextn_predict_layers=1,
             torch_dtype="float32", initializer_range=0.05)


def _model(seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(**{**SMALL, **kw}))
    m.reset_parameters()
    return m


class _Samples:
    def __init__(self, seed=0, lens=(9, 7, 12), V=300):
        g = np.random.default_rng(seed)
        self._ids = [g.integers(2, V, n) for n in lens]
        self._mask = []
        for n in lens:
            m = np.zeros(n, np.uint8)
            m[n // 2:] = 1  # prompt, then the reply (+ EOS)
            self._mask.append(m)

    def ids(self, i):
        return self._ids[i]

    def mask(self, i):
        return self._mask[i]


def _batch(ds, k=0):
    return {key: v[None] for key, v in ds[k].items()}


@pytest.mark.parametrize("fused", [True, False])
def test_masked_tokens_have_exactly_zero_gradient(fused):
    model = _model()
    s = _Samples()
    batch = _batch(build_sft_dataset(s, np.arange(3), 32, 1, True, "truncate", None, "t"))

    def grads(labels):
        model.zero_grad()
        loss, _ = compute_loss(model, {**batch, "labels": labels}, 0.3, fused_ce=fused)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    a = grads(batch["labels"])
    other = batch["labels"].clone()
    masked = batch["loss_mask"] == 0
    other[masked] = (other[masked] + 17) % 300  # change every target the mask excludes
    b = grads(other)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    # and the targets that count do change the gradient
    other[~masked] = (other[~masked] + 17) % 300
    c = grads(other)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    # d loss / d logits is exactly 0 at masked positions
    logits = torch.randn(1, 32, 300, requires_grad=True)
    mean_ce(logits, batch["labels"], batch["loss_mask"]).backward()
    assert (logits.grad[masked] == 0).all() and (logits.grad[~masked] != 0).any()


def test_loss_equals_transformers_with_minus_100_labels(tmp_path):
    from dsv3.checkpoint.reader import load_dir_config
    from dsv3.train.init_from import load_init_weights

    hf = make_hf_checkpoint(tmp_path, rope_scaling=None)
    cfg = load_dir_config(tmp_path)[0]
    model = load_init_weights(cfg, tmp_path, "cpu")  # the trainer's train.init_from path
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, hf.config.vocab_size, (2, 40), generator=g)
    keep = torch.zeros(2, 40, dtype=torch.bool)
    keep[0, 15:] = True
    keep[1, 25:33] = True  # a reply in the middle: prompt before, unmasked context after
    hf_labels = torch.where(keep, ids, torch.full_like(ids, -100))
    with torch.no_grad():
        ref = hf(input_ids=ids, labels=hf_labels).loss.item()
        batch = {"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": keep[:, 1:].float()}
        for fused in (True, False):
            _, parts = compute_loss(model, batch, 0.0, fused_ce=fused)
            assert abs(parts["lm"].item() - ref) <= 1e-5, (fused, parts["lm"].item(), ref)


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_packed_equals_separate_samples(device):
    model = _model(aux_loss_alpha=0.0).eval().to(device)
    s = _Samples(seed=1)
    packed = build_sft_dataset(s, np.arange(3), 32, 1, True, "truncate", None, "t")
    assert len(packed) == 1
    b = {k: v.to(device) for k, v in _batch(packed).items()}
    with torch.no_grad():
        attn = document_mask(b["doc_ids"])
        logits, (mtp,) = model(b["tokens"], positions=b["position_ids"], mask=attn, return_mtp=True)
        _, parts = compute_loss(model, b, 0.3)
        p, lm_sum, lm_n, mtp_sum, mtp_n = 0, 0.0, 0.0, 0.0, 0.0
        for i in range(3):
            ids = torch.as_tensor(s.ids(i), device=device)[None]
            m = torch.as_tensor(s.mask(i)[1:], dtype=torch.float32, device=device)[None]
            n = ids.shape[1] - 1
            one_logits, (one_mtp,) = model(ids[:, :-1], return_mtp=True)
            torch.testing.assert_close(logits[:, p : p + n], one_logits, atol=2e-5, rtol=1e-4)
            # MTP: positions whose depth-1 target lies inside the sample
            torch.testing.assert_close(mtp[:, p : p + n - 1], one_mtp[:, : n - 1], atol=2e-5, rtol=1e-4)
            ce = torch.nn.functional.cross_entropy(one_logits[0], ids[0, 1:], reduction="none")
            lm_sum, lm_n = lm_sum + float((ce * m[0]).sum()), lm_n + float(m.sum())
            ce1 = torch.nn.functional.cross_entropy(one_mtp[0, : n - 1], ids[0, 2:], reduction="none")
            mtp_sum, mtp_n = mtp_sum + float((ce1 * m[0, 1:]).sum()), mtp_n + float(m[0, 1:].sum())
            p += n
    assert abs(parts["lm"].item() - lm_sum / lm_n) < 1e-5
    assert abs(parts["mtp"].item() - 0.3 * mtp_sum / mtp_n) < 1e-5


def test_unpacked_path_is_unchanged_and_mtp_mask_stops_at_boundaries():
    model = _model().eval()
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        same_doc = torch.zeros(2, 20, dtype=torch.long)
        torch.testing.assert_close(model(ids), model(ids, mask=document_mask(same_doc)), atol=1e-6, rtol=1e-6)  # one document == causal
    mask = torch.ones(1, 6)
    docs = torch.tensor([[0, 0, 0, 1, 1, 2]])
    assert shifted_mask(mask, 1, docs).tolist() == [[1, 1, 0, 1, 0]]
    assert shifted_mask(mask, 2, docs).tolist() == [[1, 0, 0, 0]]
    assert shifted_mask(mask, 1).tolist() == [[1, 1, 1, 1, 1]]
