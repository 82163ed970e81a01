"""Multi-head Latent Attention (MLA) with two paths kept side by side.

Shape legend: B batch, T query tokens this call, S key tokens (cache + new), H heads,
P qk_nope_head_dim, R qk_rope_head_dim, V v_head_dim, C kv_lora_rank, D hidden, Q q_lora_rank.

* naive ("compute-friendly", prefill/training): expand the latent into per-head K/V with kv_b_proj
  and run ordinary attention over K = [k_nope | k_pe], V = v.
* absorb ("data-movement-friendly", decode): fold kv_b_proj's key half into the query and its value
  half into the output, and attend directly over the cached latent [c_kv | k_pe] (C + R values per
  token, shared by all heads).

Both use the same softmax scale: (P+R)^-0.5 times mscale² under YaRN. `MLA.attend_absorbed` is the
readable einsum form of the absorbed path; `absorbed_attention` is its batched-bmm fast form (what
the inference engine decodes with; tests/infer compare the two).

Attention backends: `MLA.forward(..., kv_cache=backend)` with an object that has
`attend(mla, q_nope, q_pe, c_kv, k_pe[, sparse]) -> [B,T,H*V]` hands the attention itself to the backend (the
inference engine's paged latent cache: it stores the new latents and attends over the sequence's
whole context). The projections, the RoPE and o_proj stay here, so the engine runs this module.
With DeepSeek Sparse Attention the backend also gets `sparse` (`SparseInputs`): it stores the new
tokens' indexer keys beside the latents and attends only to each query's selected keys.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config.schema import ModelConfig
from dsv3.model.dsa import Indexer, indexer_kl
from dsv3.model.layers import AttachLoss, RMSNorm
from dsv3.model.rope import apply_rope


def causal_mask(t: int, s: int, device: torch.device | None = None) -> torch.Tensor:
    """Bool [T, S], True where query t (at absolute position s - t + t) may see key s'."""
    q_pos = torch.arange(s - t, s, device=device)[:, None]
    k_pos = torch.arange(s, device=device)[None, :]
    return k_pos <= q_pos


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    """Plain masked softmax attention in fp32. q [B,H,T,E], k [B,H,S,E], v [B,H,S,V], mask bool [.., T, S]."""
    scores = torch.einsum("bhte,bhse->bhts", q.float(), k.float()) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    p = scores.softmax(-1)
    return torch.einsum("bhts,bhsv->bhtv", p, v.float()).to(q.dtype)


def absorbed_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, valid: torch.Tensor,
                       w_uk: torch.Tensor, w_uv_t: torch.Tensor, scale: float) -> torch.Tensor:
    """Fast absorbed attention: T queries per row over the row's latents, MQA-style with one 576-wide KV head.

    q_nope [B,T,H,P], q_pe [B,T,H,R], latent [B,S,C+R] = [c_kv | k_pe], valid [B,T,S] bool (False =
    padding or future), w_uk [H,P,C], w_uv_t [H,C,V] (contiguous, from `MLA.absorbed_weights`) ->
    [B,T,H*V]. Scores and softmax in fp32. Reference: `MLA.attend_absorbed`.
    """
    B, T, H, P = q_nope.shape
    C = w_uk.shape[-1]
    q_lat = torch.bmm(q_nope.reshape(B * T, H, P).transpose(0, 1), w_uk)  # [H,BT,C]: W_UK folded into the query
    q = torch.cat([q_lat.transpose(0, 1).reshape(B, T * H, C), q_pe.reshape(B, T * H, -1)], dim=-1).float()  # [B,TH,C+R]
    lat = latent.float()
    scores = torch.bmm(q, lat.transpose(1, 2)).mul_(scale)  # [B,TH,S]
    scores.masked_fill_(~valid[:, :, None, :].expand(B, T, H, -1).reshape(B, T * H, -1), float("-inf"))
    o_lat = torch.bmm(scores.softmax(-1), lat[..., :C])  # [B,TH,C]: values are the latent itself
    o = torch.bmm(o_lat.to(w_uv_t.dtype).view(B * T, H, C).transpose(0, 1), w_uv_t)  # [H,BT,V]: W_UV after the sum
    return o.transpose(0, 1).reshape(B, T, -1)


class SparseInputs(NamedTuple):
    """What an attention backend needs to run the DSA indexer of a layer: its input x [B,T,D], the
    query latent [B,T,Q] and the RoPE cos/sin of the new tokens."""

    x: torch.Tensor
    q_latent: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor


class MLA(nn.Module):
    """MLA block (HF module names, so checkpoints map one to one)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope_dim = cfg.qk_nope_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.qk_dim = cfg.qk_head_dim
        self.softmax_scale = cfg.softmax_scale
        self.impl = cfg.attn_impl
        D, H = cfg.hidden_size, self.n_heads
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, eps=1e-6)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps=1e-6)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, D, bias=False)
        self.indexer = Indexer(cfg) if cfg.index_topk > 0 else None
        """DeepSeek Sparse Attention (V3.2): picks the keys each query attends to; None for dense MLA."""
        self.indexer_stage: str | None = None
        """Training of the indexer (set from outside, `set_indexer_stage`): None (no indexer loss),
        'dense_warmup' (dense attention; the indexer learns the attention distribution) or 'sparse'."""
        self.indexer_loss: torch.Tensor | None = None
        """The indexer's KL loss of the last training forward (`dsv3.model.dsa.indexer_kl`)."""
        self.attach_indexer_loss = False
        """Pipeline parallel: the loss rides on this module's output's backward (`AttachLoss`)."""
        self.indexer_accum = 0.0
        """With `attach_indexer_loss`: the detached losses since the pipeline's last reset (for the log)."""

    # ---- projections shared by both paths
    def project_q(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  q_latent: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,T,D] -> q_nope [B,T,H,P], q_pe [B,T,H,R] (rotated). cos/sin [B or 1, T, R/2].
        `q_latent`: `q_a_layernorm(q_a_proj(x))` when the caller already has it (the DSA indexer reads it too)."""
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)) if q_latent is None else q_latent)
        q = q.view(*x.shape[:-1], self.n_heads, self.qk_dim)  # [B,T,H,P+R]
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos.unsqueeze(-2), sin.unsqueeze(-2))
        return q_nope, q_pe

    def project_latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,T,D] -> normalised latent c_kv [B,T,C] and rotated shared rope key k_pe [B,T,R] (what is cached)."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_a_layernorm(c_kv), apply_rope(k_pe, cos, sin)

    # ---- the two attention paths over (new queries, all keys)
    def attend_naive(self, q_nope, q_pe, c_kv, k_pe, mask: torch.Tensor | None, is_causal: bool = False, reference: bool = False) -> torch.Tensor:
        """Expanded K/V. q_* [B,T,H,*], c_kv [B,S,C], k_pe [B,S,R], mask bool broadcastable to [B,H,T,S]."""
        B, S, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(B, S, self.n_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)  # [B,S,H,P], [B,S,H,V]
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(-1, -1, self.n_heads, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B,H,T|S,*]
        if reference:
            if is_causal and mask is None:
                mask = causal_mask(q.shape[2], S, q.device)
            o = attention_reference(q, k, v, self.softmax_scale, mask)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None, scale=self.softmax_scale)
        return o.transpose(1, 2).flatten(2)  # [B,T,H*V]

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of kv_b_proj: W_UK [H,P,C] (key up-projection) and W_UV [H,V,C] (value up-projection).
        A quantised kv_b_proj (dsv3.quant, e.g. an FP8 checkpoint kept as FP8) is dequantised first."""
        w = self.kv_b_proj.weight
        if hasattr(self.kv_b_proj, "dequantized_weight"):
            w = self.kv_b_proj.dequantized_weight(self.kv_a_layernorm.weight.dtype)
        w = w.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    def attention_probs(self, q_nope, q_pe, c_kv, k_pe, mask: torch.Tensor | None, w_uk: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax attention weights [B,H,T,S] (fp32) in the absorbed form: (q_nope·W_UK)·c_kv + q_pe·k_pe."""
        if w_uk is None:
            w_uk = self.absorbed_weights()[0]
        q_lat = torch.einsum("bthp,hpc->bthc", q_nope, w_uk)  # [B,T,H,C]
        scores = (torch.einsum("bthc,bsc->bhts", q_lat.float(), c_kv.float())
                  + torch.einsum("bthr,bsr->bhts", q_pe.float(), k_pe.float())) * self.softmax_scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(-1)

    def attend_absorbed(self, q_nope, q_pe, c_kv, k_pe, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention over the latent cache: scores = (q_nope·W_UK)·c_kv + q_pe·k_pe; out = W_UV·(p·c_kv)."""
        w_uk, w_uv = self.absorbed_weights()
        p = self.attention_probs(q_nope, q_pe, c_kv, k_pe, mask, w_uk)  # [B,H,T,S] fp32
        o_lat = torch.einsum("bhts,bsc->bthc", p, c_kv.float()).to(q_nope.dtype)  # [B,T,H,C]
        o = torch.einsum("bthc,hvc->bthv", o_lat, w_uv)  # [B,T,H,V]
        return o.flatten(2)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None, kv_cache=None) -> torch.Tensor:
        """x [B,T,D] -> [B,T,D].

        Without `kv_cache`, attention is causal over x itself (or follows `mask`, bool, True = may
        attend). With `kv_cache`, the new latents are appended through `kv_cache.update(c_kv, k_pe)`,
        which returns the full latents [B,S,C], [B,S,R]; `mask` must then cover [T, S] (default:
        causal, the new tokens being the last T). A `kv_cache` with `attend` is an attention backend
        (module docstring): it does the attention, `mask` is then unused.
        """
        if self.indexer is not None:
            return self._forward_sparse(x, cos, sin, mask, kv_cache)
        q_nope, q_pe = self.project_q(x, cos, sin)
        c_kv, k_pe = self.project_latent(x, cos, sin)
        if hasattr(kv_cache, "attend"):
            return self.o_proj(kv_cache.attend(self, q_nope, q_pe, c_kv, k_pe))
        T = x.shape[1]
        if kv_cache is not None:
            c_kv, k_pe = kv_cache.update(c_kv, k_pe)
        S = c_kv.shape[1]
        if self.impl == "absorb":
            if mask is None and T > 1:
                mask = causal_mask(T, S, x.device)
            o = self.attend_absorbed(q_nope, q_pe, c_kv, k_pe, mask)
        else:
            causal = mask is None and T > 1
            if causal and S != T:
                mask, causal = causal_mask(T, S, x.device), False
            o = self.attend_naive(q_nope, q_pe, c_kv, k_pe, mask, is_causal=causal)
        return self.o_proj(o)

    @torch.no_grad()
    def indexer_target(self, q_nope, q_pe, c_kv, k_pe, keep: torch.Tensor) -> torch.Tensor:
        """The indexer's KL target: this layer's attention weights summed over ALL heads [B,T,S] (rows sum
        to H; no grad). Tensor parallelism overrides it (`dsv3.parallel.tp.TPMLA`: a sum over tp ranks)."""
        return self.attention_probs(q_nope, q_pe, c_kv, k_pe, keep).sum(1)

    def _forward_sparse(self, x, cos, sin, mask, kv_cache) -> torch.Tensor:
        """DSA (V3.2): the indexer narrows the causal (or given) mask to its top-k keys per query,
        then the configured path attends under that mask ('dense_warmup' keeps the full mask).

        Training (`indexer_stage` set, grad on): the indexer scores detached inputs, so its only
        gradient is its KL loss to this layer's attention distribution (`indexer_kl`), kept in
        `indexer_loss` (and attached to the output under pipeline parallelism)."""
        q_latent = self.q_a_layernorm(self.q_a_proj(x))
        q_nope, q_pe = self.project_q(x, cos, sin, q_latent)
        c_kv, k_pe = self.project_latent(x, cos, sin)
        if hasattr(kv_cache, "attend"):  # an attention backend (the engine's paged cache) selects over its keys
            return self.o_proj(kv_cache.attend(self, q_nope, q_pe, c_kv, k_pe, sparse=SparseInputs(x, q_latent, cos, sin)))
        if kv_cache is not None:
            raise NotImplementedError("DeepSeek Sparse Attention (index_topk > 0) with an `update` KV cache: use "
                                      "full-sequence forwards or the engine's paged cache")
        T = x.shape[1]
        visible = causal_mask(T, T, x.device) if mask is None else mask
        if visible.dim() == 4:  # [B|1, 1, T, S] as the callers pass head-broadcast masks
            visible = visible[:, 0]
        learn = self.training and self.indexer_stage is not None and torch.is_grad_enabled()
        if learn:
            xd, qd = x.detach(), q_latent.detach()
            scores = self.indexer.scores(xd, qd, cos, sin, self.indexer.keys(xd, cos, sin))
            chosen = self.indexer.select(scores.detach(), visible)
        else:
            chosen = self.indexer(x, q_latent, cos, sin, visible)
        keep = (visible.expand_as(chosen) if self.indexer_stage == "dense_warmup" else chosen)[:, None]  # [B,1,T,T]
        if self.impl == "absorb":
            o = self.attend_absorbed(q_nope, q_pe, c_kv, k_pe, keep)
        else:
            o = self.attend_naive(q_nope, q_pe, c_kv, k_pe, keep)
        out = self.o_proj(o)
        if learn:
            self.indexer_loss = indexer_kl(scores, self.indexer_target(q_nope, q_pe, c_kv, k_pe, keep), keep[:, 0])
            if self.attach_indexer_loss:
                out = AttachLoss.apply(out, self.indexer_loss)
                self.indexer_accum = self.indexer_accum + self.indexer_loss.detach()
        return out


def set_indexer_stage(module: nn.Module, stage: str | None, attach: bool = False) -> int:
    """Switch the DSA indexers' training in `module` (a model or a pipeline stage): None, 'dense_warmup'
    or 'sparse' (`MLA.indexer_stage`); `attach` under pipeline parallelism. Returns the layers switched."""
    n = 0
    for m in module.modules():
        if isinstance(m, MLA) and m.indexer is not None:
            m.indexer_stage, m.attach_indexer_loss, m.indexer_loss = stage, attach, None
            n += 1
    return n
