"""Training losses of DeepSeek-V3 (`training.md` §b.3, §c).

L = L_main + (λ/D)·Σ_k L_MTP^k + Σ_layers L_bal

* L_main: token-mean cross-entropy over loss_mask.
* L_MTP^k: depth k's logits at position i predict token i+k+1, i.e. labels[i+k]; the last k
  positions have no target. Each depth is averaged over ITS OWN valid tokens, then scaled by λ/D
  (the paper's form; Megatron #1532 shows what happens without the normalisation).
* Packed SFT sequences (`doc_ids` in the batch, `dsv3.data.sft_dataset`): attention is causal
  within each document only (`document_mask`), and a depth-k MTP target counts only when position
  i and its target i+k lie in the same document (`shifted_mask`).
* L_bal: the sequence-wise balance loss each MoE layer computes when `aux_loss_alpha > 0`
  (`dsv3.model.moe.sequence_balance_loss`), summed over layers (MTP's MoE included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.kernels.onednn import mm_nt, uses_onednn
from dsv3.model.mla import MLA

Loss = torch.Tensor | float
"""A loss term: a tensor in the step, a float in the log."""

CE_CHUNK = 1024
"""Tokens per chunk of the fused head + cross-entropy (a [chunk, vocab] fp32 block at a time)."""


def masked_ce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of fp32 cross-entropy over masked tokens, and the token count. logits [B,T,V], labels/mask [B,T]."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none")  # [B·T]
    m = mask.flatten().to(ce.dtype)
    return (ce * m).sum(), m.sum()


def mean_ce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean cross-entropy over `mask` (0 when no token is valid)."""
    total, count = masked_ce(logits, labels, mask)
    return total / count.clamp(min=1)


class LinearCrossEntropy(torch.autograd.Function):
    """Σ_t mask_t · CE(h_t Wᵀ, y_t) without materialising the [tokens, vocab] logits.

    Fast path of `masked_ce(h @ W.T, ...)`: chunk by chunk, the logits are formed, turned into
    their own gradient in place (softmax − one-hot, times the mask) and multiplied straight into
    dL/dh and dL/dW, all during the forward. Same matmuls as the plain path (one forward, two
    backward; `mm_nt`: oneDNN on CPU fp32), a fraction of its memory traffic; the backward only
    scales the saved gradients by the incoming one.
    Matmuls follow autocast (bf16 on request); softmax and accumulation are fp32.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        N = h.shape[0]
        need = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device) if need else None
        grad_w = None  # fp32 [V, D], the first chunk's product (no zero-filled buffer)
        for s in range(0, N, CE_CHUNK):
            hc, yc, mc = h[s : s + CE_CHUNK], labels[s : s + CE_CHUNK], mask[s : s + CE_CHUNK].float()
            logits = mm_nt(hc, w).float()  # [n, V]
            target = logits.gather(1, yc[:, None]).squeeze(1)  # [n]
            # log-sum-exp with the exponentials kept: they become the softmax (5 passes over [n, V])
            mx = logits.amax(dim=-1)  # [n]
            p = logits.sub_(mx[:, None]).exp_()  # [n, V] unnormalised softmax, in place
            se = p.sum(dim=-1)  # [n]
            total += ((mx + se.log() - target) * mc).sum()
            if need:
                g = p.mul_((mc / se)[:, None])  # mask · softmax
                g[torch.arange(g.shape[0], device=g.device), yc] -= mc  # − mask · one-hot: dL/dlogits [n, V]
                grad_h[s : s + CE_CHUNK] = mm_nt(g, w.t()).float()
                grad_w = accumulate_mm(grad_w, g.t(), hc)
        if need and grad_w is None:  # no tokens at all
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h.dtype, w.dtype)
        ctx.done = False
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.done:  # the saved gradients were scaled in place by the first call
            raise RuntimeError("LinearCrossEntropy: backward ran twice through the same graph (retain_graph is not supported)")
        ctx.done = True
        grad_h, grad_w = ctx.saved_tensors
        # in place: the [V, D] head gradient is the largest tensor of the step; no second copy
        return grad_h.mul_(grad_out).to(ctx.dtypes[0]), grad_w.mul_(grad_out).to(ctx.dtypes[1]), None, None


def accumulate_mm(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc + a @ b in fp32 (the product itself when acc is None). In place with one GEMM when the
    product is fp32 anyway; under autocast the product is formed in the autocast dtype, then added."""
    if uses_onednn(a, b):  # oneDNN reads both transposed views; faster than MKL's in-place addmm_ even with the add
        prod = mm_nt(a, b.t())
        return prod if acc is None else acc.add_(prod)
    if acc is None:
        return (a @ b).float()
    if not torch.is_autocast_enabled(acc.device.type) and a.dtype == b.dtype == acc.dtype:
        return acc.addmm_(a, b)
    return acc.add_((a @ b).float())


def linear_ce(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """Token-mean cross-entropy of the head `w` [V,D] over hidden h [B,T,D]; fused or plain (reference)."""
    if not fused:
        return mean_ce(F.linear(h, w), labels, mask)
    total = LinearCrossEntropy.apply(h.flatten(0, 1), w, labels.flatten(), mask.flatten())
    return total / mask.sum().float().clamp(min=1)


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """doc_ids [B,T] -> bool [B,1,T,T]: query t sees key s iff s <= t and both lie in the same document."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return (causal & (doc_ids[:, :, None] == doc_ids[:, None, :]))[:, None]


def attention_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The model's attention mask for a batch: block-diagonal causal for packed data, else None (causal)."""
    return document_mask(batch["doc_ids"]) if "doc_ids" in batch else None


def shifted_mask(mask: torch.Tensor, k: int, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Loss mask of MTP depth k for positions 0..T-k-1 (target labels[i+k]); 0 where i+k is in another document."""
    m = mask[:, k:]
    if doc_ids is not None:
        m = m * (doc_ids[:, k:] == doc_ids[:, :-k]).to(m.dtype)
    return m


def mtp_loss(mtp_logits: list[torch.Tensor], labels: torch.Tensor, mask: torch.Tensor, factor: float,
             doc_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(λ/D)·Σ_k L_k and the per-depth losses. mtp_logits[k-1] [B,T,V]; labels/mask [B,T] of the main head."""
    T = labels.shape[1]
    per_depth = []
    for k, logits in enumerate(mtp_logits, start=1):
        # position i < T-k predicts labels[i+k] (= token i+k+1 of the window)
        per_depth.append(mean_ce(logits[:, : T - k], labels[:, k:], shifted_mask(mask, k, doc_ids)))
    if not per_depth:
        return labels.new_zeros((), dtype=torch.float32), []
    return factor / len(per_depth) * torch.stack(per_depth).sum(), per_depth


def logits_losses(logits: torch.Tensor, mtp_logits: list[torch.Tensor], labels: torch.Tensor, mask: torch.Tensor,
                  factor: float, doc_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_main, (λ/D)·Σ_k L_MTP^k) from the heads' logits: the plain path of `compute_loss` and the
    pipeline's last stage (`dsv3.train.pipeline`)."""
    lm = mean_ce(logits, labels, mask)
    mtp = mtp_loss(mtp_logits, labels, mask, factor, doc_ids)[0] if mtp_logits else torch.zeros((), device=lm.device)
    return lm, mtp


def combine(lm: Loss, mtp: Loss, aux: Loss | None, indexer: Loss | None, main_weight: float = 1.0) -> Loss:
    """The objective, composed here only (the step's tensors, and the trainer's logged total from the
    step's mean parts): main_weight·(L_main + L_MTP + L_bal) + the DSA indexers' KL losses. `aux` /
    `indexer` None where they are not in this graph (under pipeline parallelism they ride on the
    activations' backward instead); main_weight 0 in the dense warm-up, where only the indexers learn."""
    main = lm + mtp if aux is None else lm + mtp + aux
    return main_weight * main if indexer is None else main_weight * main + indexer


def compute_loss(model, batch: dict[str, torch.Tensor], mtp_loss_factor: float, fused_ce: bool = True,
                 main_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward one micro-batch and return (total loss, detached parts {lm, mtp, aux, indexer}).

    The model's pieces are called directly (hidden states, MTP chain, shared head norm) so the head
    and the loss can be fused; `fused_ce=False` is the plain logits path (`model(..., return_mtp=True)`).
    total = main_weight·(lm + mtp + aux) + indexer (the DSA indexers' KL losses; main_weight 0 in
    the dense warm-up stage, where only the indexers learn).
    """
    tokens, labels, mask, pos = batch["tokens"], batch["labels"], batch["loss_mask"], batch.get("position_ids")
    docs, attn = batch.get("doc_ids"), attention_mask(batch)
    use_mtp = mtp_loss_factor > 0 and len(model.model.mtp) > 0
    for moe in model.moe_layers():
        moe.aux_loss = None  # only this forward's balance losses count
    if model.config.sparse_attention:  # nor do only this forward's indexer losses
        for m in model.modules():
            if isinstance(m, MLA):
                m.indexer_loss = None
    if not fused_ce:
        out = model(tokens, positions=pos, mask=attn, return_mtp=use_mtp)
        logits, mtp_logits = out if use_mtp else (out, [])
        lm, mtp = logits_losses(logits, mtp_logits, labels, mask, mtp_loss_factor, docs)
    else:
        pre, post = model.hidden_states(tokens, pos, attn)
        w, T = model.lm_head.weight, tokens.shape[1]
        lm = linear_ce(post, w, labels, mask)
        mtp = torch.zeros((), device=lm.device)
        if use_mtp:
            h0 = post if model.config.mtp_hidden == "post_norm" else pre
            hs = model.mtp_hidden(h0, tokens, pos, attn)
            # depth k at position i predicts labels[i+k]; each depth is a mean over its own tokens
            per_depth = [linear_ce(mod.shared_head.norm(h)[:, : T - k], w, labels[:, k:], shifted_mask(mask, k, docs))
                         for k, (mod, h) in enumerate(zip(model.model.mtp, hs), start=1)]
            mtp = mtp_loss_factor / len(per_depth) * torch.stack(per_depth).sum()
    aux = model.aux_loss() if model.training else None
    idx = model.indexer_loss() if model.training and model.config.sparse_attention else None
    zero = torch.zeros((), device=lm.device)
    total = combine(lm, mtp, aux, idx, main_weight)
    parts = {"lm": lm.detach(), "mtp": mtp.detach(), "aux": aux.detach() if aux is not None else zero,
             "indexer": idx.detach() if idx is not None else zero}
    return total, parts
