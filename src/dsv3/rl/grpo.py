"""GRPO's pieces (DeepSeekMath, arXiv 2402.03300, section 4.1), as plain tensor functions.

For G completions o_1..o_G of one prompt with rewards r_i, every token of o_i gets the advantage
A_i = (r_i - mean(r)) / (std(r) + eps); a group whose rewards are all equal teaches nothing (A = 0).
The objective per token t of o_i, with ratio rho = pi(o_it) / pi_sampler(o_it):

    min(rho * A_i, clip(rho, 1 - eps, 1 + eps) * A_i) - beta * KL_t,   KL_t = e^(q - p) - (q - p) - 1

(p, q: the policy's and the frozen reference's token logprobs; Schulman's unbiased, non-negative k3
estimator), averaged over each completion's tokens, then over completions; the loss is its negative.
The ratio's denominator is the sampler's own logprob, so any difference between the engine's and the
trainer's numerics shows up in rho: `mismatch` measures it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ADV_EPS = 1e-6


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """rewards [P, G] -> advantages [P, G], standardised within each group (row); std is the sample std."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    return (rewards - mean) / (std + ADV_EPS)


@dataclass
class RolloutBatch:
    """Prompt + completion of every sample, right-padded: the trainer's inputs and the sampler's logprobs."""

    tokens: torch.Tensor
    """[N, T] inputs (the sequence without its last token)."""
    targets: torch.Tensor
    """[N, T] the next tokens."""
    mask: torch.Tensor
    """[N, T] 1.0 where the target is a completion token (sampled), else 0."""
    sampler_logprobs: torch.Tensor
    """[N, T] the sampler's logprob of each target (0 where mask is 0)."""
    advantages: torch.Tensor
    """[N] per completion."""
    sequences: list[list[int]]
    """The N unpadded sequences (prompt + completion)."""
    routed: torch.Tensor | None = None
    """[N, T, MoE layers, K] the engine's experts of every sampled token's position (-1: route itself), or None."""


def rollout_batch(prompts: list[list[int]], completions: list[list[int]], logprobs: list[list[float]],
                  advantages: torch.Tensor, pad_id: int, routed: list | None = None, top_k: int = 0) -> RolloutBatch:
    rows = [p + c for p, c in zip(prompts, completions)]
    n, width = len(rows), max(len(r) for r in rows) - 1
    tokens = torch.full((n, width), pad_id, dtype=torch.long)
    targets = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros(n, width)
    old = torch.zeros(n, width)
    for i, (row, p, lp) in enumerate(zip(rows, prompts, logprobs)):
        tokens[i, : len(row) - 1] = torch.tensor(row[:-1])
        targets[i, : len(row) - 1] = torch.tensor(row[1:])
        span = slice(len(p) - 1, len(row) - 1)
        mask[i, span] = 1.0
        old[i, span] = torch.tensor(lp, dtype=torch.float32)
    replay = None
    if routed is not None:  # `return_routed_experts` rows [n][L][K] -> positions P-1.. (`dsv3.train.replay`)
        from dsv3.train.replay import replay_rows

        layers = len(routed[0][0]) if routed[0] else 0
        replay = torch.stack([replay_rows(r, len(p), width, layers, top_k) for r, p in zip(routed, prompts)])
    return RolloutBatch(tokens, targets, mask, old, advantages.flatten().float(), rows, replay)


def token_logprobs(model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[N, T] log pi(target | prefix) of the model, differentiable (fp32 log-softmax of the head's logits)."""
    logits = model(tokens)
    return torch.gather(logits.float().log_softmax(-1), -1, targets.unsqueeze(-1)).squeeze(-1)


def batched_logprobs(model: torch.nn.Module, batch: RolloutBatch) -> tuple[torch.Tensor, list[float | None] | None]:
    """`token_logprobs` of the batch, routed through the engine's experts when it carries them (R3,
    `dsv3.train.replay`); -> (logprobs [N, T], per MoE layer the share of tokens the trainer's router put on the
    same experts, or None)."""
    from dsv3.train.replay import RoutingReplay

    device = next(model.parameters()).device
    tokens = batch.tokens.to(device)
    routed = batch.routed.to(device) if batch.routed is not None else None
    with RoutingReplay(model, routed, tokens) as replay:  # no recompute: backward needs no hook
        logp = token_logprobs(model, tokens, batch.targets.to(device)).cpu()
    return logp, replay.agreement()


def policy_logprobs(model: torch.nn.Module, batch: RolloutBatch, exact: bool,
                    exact_backward: bool = False) -> tuple[torch.Tensor, list[float | None] | None]:
    """[N, T] the policy's logprob of every target (differentiable under grad mode), and the routing agreement.

    exact False: one batched forward. exact True: the values are `dsv3.train.score`'s (each token alone through
    the batch-invariant ops: the same floats as a batch-invariant engine); the gradient flows through the batched
    forward (`values + (batched - batched.detach())`, the same function rounded in another order, routed as the
    engine routed), unless exact_backward, where it flows through the per-token path itself (about 4x the cost)."""
    if not exact:
        return batched_logprobs(model, batch)
    from dsv3.train.score import score_logprobs

    if exact_backward or not torch.is_grad_enabled():
        rows = score_logprobs(model, batch.sequences)
        return torch.nn.utils.rnn.pad_sequence([r.cpu() for r in rows], batch_first=True), None
    with torch.no_grad():
        values = torch.nn.utils.rnn.pad_sequence([r.cpu() for r in score_logprobs(model, batch.sequences)], batch_first=True)
    batched, agreement = batched_logprobs(model, batch)
    return values + (batched - batched.detach()), agreement  # adds exactly 0.0: the values stay the exact scorer's


def mismatch(logp: torch.Tensor, sampler: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """(max |trainer - sampler| logprob, number of sampled tokens whose logprobs are not bit-equal)."""
    sel = mask.bool()
    diff = (logp.detach() - sampler)[sel]
    if diff.numel() == 0:
        return 0.0, 0
    return float(diff.abs().max()), int((logp.detach()[sel] != sampler[sel]).sum())


def policy_loss(logp: torch.Tensor, batch: RolloutBatch, clip_eps: float, ref_logp: torch.Tensor | None = None,
                kl_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The negative clipped GRPO objective (per-completion token mean, then mean), and its statistics."""
    mask, adv = batch.mask, batch.advantages.unsqueeze(1)
    ratio = torch.exp(logp - batch.sampler_logprobs)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    per_token = surrogate
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_token = surrogate - kl_coef * kl
    lengths = mask.sum(dim=1).clamp(min=1)
    loss = -((per_token * mask).sum(dim=1) / lengths).mean()
    sel = mask.bool()
    clipped = ((ratio - 1).abs() > clip_eps) & sel
    stats = {"kl": float(((kl.detach() * mask).sum(dim=1) / lengths).mean()),
             "clip_frac": float(clipped.sum() / sel.sum().clamp(min=1)),
             "ratio_max": float(ratio.detach()[sel].max()) if sel.any() else 1.0}
    return loss, stats
