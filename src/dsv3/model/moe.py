"""DeepSeekMoE: router (gate), routed experts, shared experts.

Shape legend: N tokens (B·T flattened), D hidden, E routed experts, K experts per token,
G groups, I expert width.

Routing (all in fp32, `inference.md` §c / `training.md` §b.1):
    s = sigmoid(x W_gᵀ)                      affinities (softmax for V2 configs)
    c = s + bias                             bias (aux-loss-free balancing) only chooses experts
    group score = sum of top-2 of c per group (max per group when there is no bias)
    drop all but topk_group groups with -inf, take top-K of c (topk_method "greedy": no groups)
    w = s[idx] (unbiased), renormalised if norm_topk_prob, times routed_scaling_factor
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config.schema import ModelConfig
from dsv3.model.layers import MLP


class Gate(nn.Module):
    """Router: weight [E, D] and, for noaux_tc, the fp32 `e_score_correction_bias` buffer [E]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.n_experts = cfg.n_routed_experts
        self.n_group = 1 if cfg.topk_method == "greedy" else cfg.n_group  # V2's "greedy": top-k over all experts
        self.topk_group = cfg.topk_group
        self.scoring_func = cfg.scoring_func
        self.norm_topk_prob = cfg.norm_topk_prob
        self.route_scale = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if cfg.topk_method == "noaux_tc":
            # A buffer, not a parameter: the optimizer and weight decay never touch it.
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def _apply(self, fn, recurse=True):
        # Keep the bias in fp32 whatever dtype the model is cast to (model.to(bfloat16) etc.).
        bias = self.e_score_correction_bias
        out = super()._apply(fn, recurse)
        new = self.e_score_correction_bias
        if bias is not None and new is not None and new.dtype != torch.float32:
            # Re-derive from the fp32 original: casting the rounded bf16 copy back would lose bits.
            self.e_score_correction_bias = bias.to(device=new.device, dtype=torch.float32)
        return out

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x [N,D] -> affinities s [N,E] in fp32."""
        with torch.autocast(x.device.type, enabled=False):  # bf16 autocast would cast this matmul down
            logits = F.linear(x.float(), self.weight.float())
        return logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(-1)

    def select(self, s: torch.Tensor) -> torch.Tensor:
        """The router's own choice: affinities s [N,E] -> expert ids [N,K] int64 (bias, groups, top-K)."""
        bias = self.e_score_correction_bias
        choice = s + bias if bias is not None else s
        if self.n_group > 1:
            g = choice.view(-1, self.n_group, self.n_experts // self.n_group)  # [N,G,E/G]
            gscore = g.topk(2, dim=-1).values.sum(-1) if bias is not None else g.amax(-1)  # [N,G]
            keep = gscore.topk(self.topk_group, dim=-1).indices
            drop = torch.ones_like(gscore, dtype=torch.bool).scatter_(1, keep, False)  # [N,G]
            choice = g.masked_fill(drop[..., None], float("-inf")).flatten(1)
        return choice.topk(self.top_k, dim=-1).indices  # [N,K]

    def weights(self, s: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Combine weights [N,K] fp32 of experts idx [N,K] from the (unbiased) affinities s [N,E]."""
        w = s.gather(1, idx)
        if self.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * self.route_scale

    def forward(self, x: torch.Tensor, replay: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N,D] -> weights [N,K] fp32, expert ids [N,K] int64, affinities s [N,E] fp32.

        replay [N,K] int64 (routing replay, `dsv3.train.replay`): rows of expert ids to use instead of
        the router's own choice (a row of -1: route that token itself); the weights are recomputed from
        this forward's affinities at those ids, so the router still gets its gradient."""
        s = self.scores(x)
        idx = self.select(s)
        if replay is not None:
            idx = torch.where((replay >= 0).all(-1, keepdim=True), replay, idx)
        return self.weights(s, idx), idx, s


class Experts(nn.Module):
    """E SwiGLU experts stored stacked: gate_proj/up_proj [E,I,D], down_proj [E,D,I].

    Two paths: `forward_loop` (per-expert gather / compute / index_add, the reference) and
    `forward_grouped` (tokens sorted by expert once, contiguous slices per expert, `run_sorted`).
    """

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.n_experts = n_experts
        self.gate_proj = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.up_proj = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, inter_dim))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on x [n,D] -> [n,D]."""
        return F.linear(F.silu(F.linear(x, self.gate_proj[e])) * F.linear(x, self.up_proj[e]), self.down_proj[e])

    def forward_loop(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Reference: for each expert, gather its tokens, run it, scale in fp32, scatter-add."""
        out = torch.zeros_like(x, dtype=torch.float32)
        for e in range(self.n_experts):
            tok, slot = torch.where(idx == e)
            if tok.numel() == 0:
                continue
            y = self.expert(e, x[tok]).float() * w[tok, slot, None]
            out.index_add_(0, tok, y)
        return out.to(x.dtype)

    def forward_grouped(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Sort (token, slot) pairs by expert, run every expert on its contiguous slice, combine.
        (`dsv3.kernels.grouped.GroupedExperts`, swapped in by the trainer and the engine, runs the
        slices in fewer calls.)"""
        N, K = idx.shape
        flat = idx.flatten()  # [N·K]
        order = flat.argsort(stable=True)
        tok = order // K
        xs = x[tok]  # [N·K, D] sorted by expert
        counts = torch.bincount(flat, minlength=self.n_experts)  # [E]
        ys = self.run_sorted(xs, counts)  # [N·K, D]
        ys = ys.float() * w.flatten()[order, None]
        out = torch.zeros_like(x, dtype=torch.float32).index_add_(0, tok, ys)
        return out.to(x.dtype)

    def run_sorted(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Expert e on rows [Σ counts[:e], Σ counts[:e+1]) of xs [M,D] -> [M,D]: `expert(e, ·)` per slice."""
        ys = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts.tolist()):  # one host sync per layer
            if n:
                ys[start : start + n] = self.expert(e, xs[start : start + n])
                start += n
        return ys


class MoE(nn.Module):
    """Routed experts + shared experts. Keeps per-expert token counts for the balancing update.

    `tokens_per_expert` (fp32 buffer, not saved) accumulates routed counts of every forward run with
    grad enabled, so one optimizer step sees the counts of all its micro-batches; the trainer reads
    and zeroes it. `aux_loss` holds the sequence-wise balance loss of the last training forward.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.impl = cfg.moe_impl
        self.top_k = cfg.num_experts_per_tok
        self.aux_loss_alpha = cfg.aux_loss_alpha
        self.gate = Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts > 0 else None
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed_experts, dtype=torch.float32), persistent=False)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B,T,D] -> [B,T,D]."""
        y = self.routed(x)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y

    def routed(self, x: torch.Tensor) -> torch.Tensor:
        """The router and routed experts alone: x [B,T,D] -> [B,T,D]; accumulates the counts and sets `aux_loss`."""
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        w, idx, s = self.gate(xf)
        if torch.is_grad_enabled():
            with torch.no_grad():
                self.tokens_per_expert += torch.bincount(idx.flatten(), minlength=self.tokens_per_expert.numel()).float()
        if self.training and self.aux_loss_alpha > 0:
            self.aux_loss = self.balance_loss(s.view(*shape[:-1], -1))
        y = self.experts.forward_loop(xf, w, idx) if self.impl == "loop" else self.experts.forward_grouped(xf, w, idx)
        return y.view(shape)

    def balance_loss(self, s: torch.Tensor) -> torch.Tensor:
        """The sequence-wise balance loss of affinities s [B,T,E] (`sequence_balance_loss`)."""
        return sequence_balance_loss(s, self.top_k, self.aux_loss_alpha)


def sequence_balance_loss(s: torch.Tensor, top_k: int, alpha: float) -> torch.Tensor:
    """Complementary sequence-wise balance loss (V3 report eq. 17-20), averaged over sequences.

    s [B,T,E] affinities. f_i = E/(K·T) · #{t: i in plain top-K of s_t} (no grad),
    P_i = mean_t s_{i,t}/Σ_j s_{j,t}; loss = alpha · Σ_i f_i P_i.
    """
    B, T, E = s.shape
    with torch.no_grad():
        topk = s.topk(top_k, dim=-1).indices  # [B,T,K]
        counts = torch.zeros(B, E, device=s.device, dtype=torch.float32).scatter_add_(
            1, topk.flatten(1), torch.ones(B, T * top_k, device=s.device))
        f = counts * (E / (top_k * T))
    p = (s / s.sum(-1, keepdim=True)).mean(1)  # [B,E]
    return alpha * (f * p).sum(-1).mean()
