"""Training losses of DeepSeek-V3 (`training.md` §b.3, §c).

L = L_main + (λ/D)·Σ_k L_MTP^k + Σ_layers L_bal

* L_main: token-mean cross-entropy over loss_mask.
* L_MTP^k: depth k's logits at position i predict token i+k+1, i.e. labels[i+k]; the last k
  positions have no target. Each depth is averaged over ITS OWN valid tokens, then scaled by λ/D
  (the paper's form; Megatron #1532 shows what happens without the normalisation).
* L_bal: the sequence-wise balance loss each MoE layer computes when `aux_loss_alpha > 0`
  (`dsv3.model.moe.sequence_balance_loss`), summed over layers (MTP's MoE included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_ce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of fp32 cross-entropy over masked tokens, and the token count. logits [B,T,V], labels/mask [B,T]."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none")  # [B·T]
    m = mask.flatten().to(ce.dtype)
    return (ce * m).sum(), m.sum()


def mean_ce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean cross-entropy over `mask` (0 when no token is valid)."""
    total, count = masked_ce(logits, labels, mask)
    return total / count.clamp(min=1)


def mtp_loss(mtp_logits: list[torch.Tensor], labels: torch.Tensor, mask: torch.Tensor, factor: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(λ/D)·Σ_k L_k and the per-depth losses. mtp_logits[k-1] [B,T,V]; labels/mask [B,T] of the main head."""
    T = labels.shape[1]
    per_depth = []
    for k, logits in enumerate(mtp_logits, start=1):
        # position i < T-k predicts labels[i+k] (= token i+k+1 of the window)
        per_depth.append(mean_ce(logits[:, : T - k], labels[:, k:], mask[:, k:]))
    if not per_depth:
        return labels.new_zeros((), dtype=torch.float32), []
    return factor / len(per_depth) * torch.stack(per_depth).sum(), per_depth


def compute_loss(model, batch: dict[str, torch.Tensor], mtp_loss_factor: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward one micro-batch and return (total loss, detached parts {lm, mtp, aux})."""
    tokens, labels, mask, pos = batch["tokens"], batch["labels"], batch["loss_mask"], batch.get("position_ids")
    use_mtp = mtp_loss_factor > 0 and len(model.model.mtp) > 0
    for moe in model.moe_layers():
        moe.aux_loss = None  # only this forward's balance losses count
    out = model(tokens, positions=pos, return_mtp=use_mtp)
    logits, mtp_logits = out if use_mtp else (out, [])
    lm = mean_ce(logits, labels, mask)
    mtp, _ = mtp_loss(mtp_logits, labels, mask, mtp_loss_factor)
    aux = model.aux_loss() if model.training else None
    total = lm + mtp + (aux if aux is not None else 0.0)
    parts = {"lm": lm.detach(), "mtp": mtp.detach(), "aux": aux.detach() if aux is not None else torch.zeros((), device=lm.device)}
    return total, parts
