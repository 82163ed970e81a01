"""DeepSeek Sparse Attention (DSA, DeepSeek-V3.2): the lightning indexer that picks, for every query,
the `index_topk` past tokens MLA attends to.

Shape legend: B batch, T query tokens, S key tokens, G indexer heads, E index_head_dim,
R qk_rope_head_dim, Q q_lora_rank, D hidden.

The indexer has its own small projections (names as in the published checkpoints and transformers'
`DeepseekV32Indexer`):

* `wq_b` [G·E, Q]: indexer queries from MLA's normalised query latent (`q_a_layernorm(q_a_proj(x))`);
* `wk` [E, D] then `k_norm` (a LayerNorm with bias): ONE key per token, shared by all indexer heads
  (what an engine caches beside the latent);
* `weights_proj` [G, D]: a per-token weight for each head.

RoPE rotates the first R dims of queries and keys in the half-split (NOT interleaved) layout, unlike
MLA's interleaved pairs. The score of key s for query t is

    I[t, s] = sum_g w[t, g] · G^-1/2 · relu(q[t, g] · k[s]) · E^-1/2

and query t keeps the `index_topk` highest-scoring keys among those it may see (causal, plus any
caller mask). The choice is discrete, so the indexer takes no gradient from the language-model
loss (it is trained by its own loss; see the V3.2 report).

Training (V3.2 report): `indexer_kl` is the indexer's loss, the KL divergence from the main
attention's distribution (summed over heads, L1-normalised) to the softmax of the index scores.
In the dense warm-up stage attention stays dense and only the indexer learns; in the sparse stage
both are restricted to the selected keys, and the indexer reads detached inputs, so the language
model's loss and the indexer's loss train disjoint parameters (`dsv3.model.mla.MLA`).

Precision (`index_impl`): "plain" scores in fp32 (transformers' choice). "hadamard_fp8" computes the
scores as DeepSeek's reference kernel does: q and k rotated by a Hadamard transform (orthogonal, so
q·k is unchanged but outliers spread over all dims), then rounded to FP8 e4m3 per 128 values
(`dsv3.model.qdq`; the product itself runs in fp32 on the FP8 values). The two choose the same keys
except where FP8 rounding reorders near-ties.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3.config.schema import ModelConfig
from dsv3.model.qdq import hadamard, qdq_tiles


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the last dim of x [..., R] in the half-split layout (x[:R/2], x[R/2:] pair up, as
    transformers' `rotate_half`) with cos/sin broadcastable to [..., R/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class Indexer(nn.Module):
    """The lightning indexer of one DSA layer (module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.q_lora_rank is None:
            raise ValueError("DeepSeek Sparse Attention needs q_lora_rank (the indexer reads the query latent)")
        self.n_heads = cfg.index_n_heads
        self.head_dim = cfg.index_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.topk = cfg.index_topk
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)
        self.softmax_scale = self.head_dim ** -0.5
        self.fp8 = cfg.index_impl == "hadamard_fp8"
        if self.fp8 and self.head_dim & (self.head_dim - 1):
            raise ValueError(f"index_impl 'hadamard_fp8' needs a power-of-two index_head_dim, got {self.head_dim}")

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        x = torch.cat([apply_rope_half(rot, cos, sin), rest], dim=-1)
        return qdq_tiles(hadamard(x)) if self.fp8 else x

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B,T,D] -> the rotated indexer keys [B,T,E] (one per token; what a cache would store)."""
        return self._rope(self.k_norm(self.wk(x)), cos, sin)

    def scores(self, x: torch.Tensor, q_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               keys: torch.Tensor) -> torch.Tensor:
        """Index scores I [B,T,S] in fp32 for queries x [B,T,D] (q_latent [B,T,Q]) over keys [B,S,E]."""
        B, T, _ = x.shape
        q = self.wq_b(q_latent).view(B, T, self.n_heads, self.head_dim)
        q = self._rope(q, cos.unsqueeze(-2), sin.unsqueeze(-2))  # [B,T,G,E]
        s = torch.einsum("btge,bse->btgs", q.float(), keys.float()).mul_(self.softmax_scale).relu_()
        w = self.weights_proj(x).float() * self.n_heads ** -0.5  # [B,T,G]
        return torch.einsum("btg,btgs->bts", w, s)

    def select(self, scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Bool [B,T,S]: True at the top-k keys of each query among the `visible` ones (bool, broadcastable)."""
        scores = scores.masked_fill(~visible, float("-inf"))
        k = min(self.topk, scores.shape[-1])
        idx = scores.topk(k, dim=-1).indices
        chosen = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, idx, True)
        return chosen & visible  # a row with fewer than k visible keys keeps exactly its visible ones

    @torch.no_grad()
    def forward(self, x: torch.Tensor, q_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                visible: torch.Tensor) -> torch.Tensor:
        """Sparse attention mask over x itself: bool [B,T,T], True where query t attends key s.

        `visible` (bool, broadcastable to [B,T,T]) is what the query may see without sparsity
        (causal and padding); the result is a subset of it with at most `index_topk` keys per row.
        """
        return self.select(self.scores(x, q_latent, cos, sin, self.keys(x, cos, sin)), visible)


def indexer_kl(scores: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean over queries of KL(p_t || softmax(I_t)) over the keys in `keep`.

    scores I [B,T,S] (the indexer's, with grad), target [B,T,S] the main attention weights summed
    over heads (no grad; L1-normalised here), keep bool [B,T,S] (the keys attention used). Rows
    with no kept key add nothing.
    """
    keep = keep.expand_as(scores)
    p = target.float().masked_fill(~keep, 0.0)
    p = p / p.sum(-1, keepdim=True).clamp(min=1e-30)
    log_q = scores.float().masked_fill(~keep, float("-inf")).log_softmax(-1).masked_fill(~keep, 0.0)
    terms = torch.where(p > 0, p * (p.clamp(min=1e-30).log() - log_q), torch.zeros_like(p))
    rows = keep.any(-1)
    return terms.sum(-1).masked_fill(~rows, 0.0).sum() / rows.sum().clamp(min=1)
