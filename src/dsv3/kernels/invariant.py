"""Batch-invariant ("exact") execution: every token computed alone, with shapes that depend only on it.

The engine's default paths batch tokens: a packed prefill multiplies all new tokens at once, attends
in the naive form, and decode attends in the absorbed form over padded rows. Matrix kernels pick
their blocking (and so the order of a dot product's additions) from the number of rows, and
elementwise kernels split their work at sizes that depend on the whole batch, so the same token can
come out a few bits different depending on what shares its step, how its prompt was chunked, and
whether its prefix came from the cache.

Here each token runs through the model's own modules ON ITS OWN: `token_forward` feeds one token
([1, 1, D]) through every decoder layer, with an attention backend that attends that one query over
exactly its keys 0..pos in the absorbed form (`attend_one`, the engine's `absorbed_attention` with
one query and no padding). Norm, projections, RoPE, router (fp32), top-k, the experts and their
weighted combine, the head and the log-softmax (`row_log_softmax`) all see shapes that depend only
on the token and its position. Torch is deterministic for identical inputs, shapes, strides and
thread count, so a token's logits are the same bits whatever else is batched, however its prompt was
chunked, and whether its prefix latents came from the cache: they were computed the same way.

The engine (`dsv3.infer.exact.ExactRunner`, latents in the paged cache) and the trainer's scoring
(`dsv3.train.score`, latents in a list, differentiable) both call these functions, so a token scored
by the trainer and the same token sampled by the server see identical arithmetic.
Cost: one forward per token (no batching at all); docs/inference.md gives the figures.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from dsv3.model.mla import MLA, absorbed_attention
from dsv3.model.transformer import Transformer


class TokenLatents(Protocol):
    """Where one layer's latents live: store the new token's [C+R] latent, return keys 0..pos [1, S, C+R]."""

    def append(self, latent: torch.Tensor) -> torch.Tensor: ...


def absorbed_weights(attn: MLA) -> tuple[torch.Tensor, torch.Tensor]:
    """W_UK [H,P,C] and W_UV^T [H,C,V], contiguous (what `absorbed_attention` takes); differentiable."""
    w_uk, w_uv = attn.absorbed_weights()
    return w_uk.contiguous(), w_uv.transpose(1, 2).contiguous()


def attend_one(attn: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
               w_uk: torch.Tensor, w_uv_t: torch.Tensor) -> torch.Tensor:
    """One query (q_nope [1,1,H,P], q_pe [1,1,H,R]) over exactly its keys latent [1,S,C+R] -> [1,1,H*V]."""
    valid = torch.ones(1, 1, latent.shape[1], dtype=torch.bool, device=latent.device)
    return absorbed_attention(q_nope, q_pe, latent, valid, w_uk, w_uv_t, attn.softmax_scale)


class OneQuery:
    """Attention backend (`MLA.forward(..., kv_cache=backend)`) of one token: its latent goes to
    `latents`, then it attends over the keys `latents` returns."""

    def __init__(self, latents: TokenLatents, w_uk: torch.Tensor, w_uv_t: torch.Tensor):
        self.latents, self.w_uk, self.w_uv_t = latents, w_uk, w_uv_t

    def attend(self, attn: MLA, q_nope, q_pe, c_kv, k_pe, sparse=None) -> torch.Tensor:
        if sparse is not None:
            raise ValueError("batch-invariant mode does not cover DeepSeek Sparse Attention (index_topk > 0)")
        keys = self.latents.append(torch.cat([c_kv, k_pe], dim=-1)[0, 0])
        return attend_one(attn, q_nope, q_pe, keys, self.w_uk, self.w_uv_t)


def token_forward(model: Transformer, token: int, pos: int, backend: Callable[[int], OneQuery],
                  blocks: list | None = None, hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token at position `pos` through the decoder layers (or `blocks`, e.g. an MTP block, whose input
    `hidden` [1,1,D] then replaces the embedding); backend(i): layer i's `OneQuery`.
    -> (hidden before the final norm, after it), both [1,1,D]."""
    dev = model.lm_head.weight.device
    cos, sin = model.rope(torch.tensor([[pos]], device=dev))
    h = model.model.embed_tokens(torch.tensor([[token]], device=dev)) if hidden is None else hidden
    for i, block in enumerate(model.model.layers if blocks is None else blocks):
        h = block(h, cos, sin, None, backend(i))
    return h, model.model.norm(h)


def mtp_token(model: Transformer, hidden: torch.Tensor, next_token: int, pos: int, backend: OneQuery) -> torch.Tensor:
    """MTP depth 1 at position `pos`: (main hidden [1,1,D], the token at pos+1) -> un-normed MTP hidden [1,1,D]."""
    dev = hidden.device
    cos, sin = model.rope(torch.tensor([[pos]], device=dev))
    emb = model.model.embed_tokens(torch.tensor([[next_token]], device=dev))
    return model.model.mtp[0](hidden, emb, cos, sin, None, backend)


def head_row(model: Transformer, x: torch.Tensor) -> torch.Tensor:
    """The output head on one row x [1,1,D] or [1,D] -> fp32 logits [1,V] (the module's own forward)."""
    return model.lm_head(x.reshape(1, -1)).float()


def row_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dim, one row at a time (a [1,V] reduction per row whatever the batch)."""
    return torch.cat([logits[i : i + 1].log_softmax(-1) for i in range(logits.shape[0])]) if logits.shape[0] else logits
