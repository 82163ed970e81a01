"""Teacher-forced scoring that equals the server bit for bit: `score_logprobs(model, sequences)`.

Each sequence's tokens run one at a time through the model's own modules with the batch-invariant
ops of `dsv3.kernels.invariant` (absorbed attention of one query over its keys, one-row head and
log-softmax), exactly as `LLMEngine(..., batch_invariant=True)` runs them over its paged cache. So
the logprob of a token here is the same float as the engine's sampled or prompt logprob of that
token, for the same weights in the same dtype. The result is differentiable (plain torch ops under
autograd; each layer's latents are kept in a list), so a policy loss can backpropagate through it.

Cost: one forward per token, and per layer the keys of every position are kept for the backward
(O(T²) latent copies per layer): meant for RL-sized completions on models this process can train.
"""

from __future__ import annotations

from typing import Sequence

import torch

from dsv3.kernels import apply_fast_paths
from dsv3.kernels.invariant import OneQuery, absorbed_weights, head_row, row_log_softmax, token_forward
from dsv3.model.transformer import Transformer


class ListLatents:
    """One layer's latents of one sequence, kept in a list (`invariant.TokenLatents`; autograd sees them)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype, self.rows = dtype, []

    def append(self, latent: torch.Tensor) -> torch.Tensor:
        self.rows.append(latent.to(self.dtype))
        return torch.stack(self.rows)[None]  # [1,S,C+R]


def check_ids(ids: Sequence[int], vocab: int, where: str) -> list[int]:
    """A list of token ids in [0, vocab), at least two (one to predict); ValueError naming `where` otherwise."""
    ids = [int(t) for t in ids] if isinstance(ids, torch.Tensor) else list(ids)
    if len(ids) < 2:
        raise ValueError(f"{where}: needs at least 2 tokens (a context and a token to score), got {len(ids)}")
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
        raise ValueError(f"{where}: token ids must be integers in [0, {vocab})")
    return ids


def score_sequence(model: Transformer, ids: list[int], weights: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """logprobs [T-1] of ids[1:], each given the tokens before it (fp32; differentiable when grad is on)."""
    dtype = model.lm_head.weight.dtype
    latents = [ListLatents(dtype) for _ in model.model.layers]
    out = []
    for pos, (tok, nxt) in enumerate(zip(ids[:-1], ids[1:])):
        _, post = token_forward(model, tok, pos, lambda i: OneQuery(latents[i], *weights[i]))
        out.append(row_log_softmax(head_row(model, post))[0, nxt])
    return torch.stack(out)


def score_logprobs(model: Transformer, sequences: Sequence[Sequence[int]] | torch.Tensor) -> list[torch.Tensor]:
    """Per sequence (token ids, prompt + completion), the logprobs [T-1] of its tokens 1..T-1 under
    teacher forcing, equal (`==`) to what a batch-invariant engine reports for those tokens (prompt
    logprobs and sampled logprobs) on the same weights and dtype. The model gets the engine's fast
    paths (`apply_fast_paths`, in place, as `LLMEngine` does to its model) so both run the same kernels.
    A [B,T] tensor is B sequences of T tokens. Grad follows the caller's mode (`torch.no_grad()` to score only)."""
    cfg = model.config
    if cfg.index_topk > 0:
        raise ValueError("exact scoring does not cover DeepSeek Sparse Attention (index_topk > 0)")
    apply_fast_paths(model)
    seqs = [check_ids(s, cfg.vocab_size, f"sequence {i}") for i, s in enumerate(sequences)]
    weights = [absorbed_weights(layer.self_attn) for layer in model.model.layers]
    return [score_sequence(model, ids, weights) for ids in seqs]
