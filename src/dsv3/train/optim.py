"""AdamW with the V3 report's settings and decay only on matrices.

Weight decay goes to every parameter with >= 2 dims (linear weights, embeddings, stacked experts);
1-D parameters (RMSNorm gains; DeepSeek-V3 has no linear biases) get none. The routing bias
`e_score_correction_bias` is a buffer, so the optimizer never sees it at all.

`optimizer.state_dtype: bfloat16` selects `AdamWBF16State`: the same AdamW with its two moments
stored in BF16, as DeepSeek-V3 keeps them (report §3.3.3), so the optimizer costs 4 instead of 8 bytes
per parameter; the 1B recipe needs this to fit a 24 GB machine in fp32 weights.

`build_optimizer` is the one builder every layout uses (`dsv3.train.strategy`): over one model or
a rank's parts (pipeline stages; FSDP / TP / EP parameters are DTensors, updated shard by shard),
wrapped in torch's ZeroRedundancyOptimizer for `parallel.dp_shard: zero1`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from dsv3.config.train import LRScheduleConfig, OptimizerConfig


def param_groups(model: nn.Module, weight_decay: float, trainable: Callable[[str], bool] | None = None) -> list[dict]:
    """Two groups: matrices (decayed) and 1-D parameters (not decayed); names kept for inspection.
    `trainable(name)` False leaves a parameter out (it keeps its value; e.g. DSA's dense warm-up)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or (trainable is not None and not trainable(name)):
            continue
        (decay if p.ndim >= 2 else no_decay).append((name, p))
    return [
        {"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "names": [n for n, _ in no_decay], "weight_decay": 0.0},
    ]


class AdamWBF16State(torch.optim.Optimizer):
    """torch AdamW (decoupled weight decay, bias-corrected moments) with exp_avg / exp_avg_sq in BF16.

    Reference semantics are torch.optim.AdamW's single-tensor path; per parameter the moments are
    upcast to fp32, updated with the fp32 gradient, used for the fp32 parameter update and rounded
    back to BF16 (round-to-nearest). Large parameters (the 129280-row embedding) are processed in
    flat chunks so the fp32 temporaries stay small instead of several copies of the largest matrix.
    The state_dict has torch AdamW's layout (step, exp_avg, exp_avg_sq), so checkpoints keep working.
    """

    CHUNK = 1 << 22  # elements per fp32 working chunk (16 MiB per temporary)
    state_dtype = torch.bfloat16  # of exp_avg / exp_avg_sq (a fresh state for a checkpoint to load into uses it)

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamWBF16State does not support sparse gradients")
                if not p.is_contiguous():  # the chunked update works on a flat view of p
                    raise RuntimeError("AdamWBF16State needs contiguous parameters")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.contiguous_format)
                state["step"] += 1
                step = state["step"].item()
                bias_correction1 = 1 - beta1 ** step
                bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
                step_size = lr / bias_correction1
                # DTensor parameters (FSDP / TP / EP shards) and their state: this rank's shard, elementwise
                p_flat, g_flat = _local(p).view(-1), _local(p.grad).reshape(-1)
                m_flat, v_flat = _local(state["exp_avg"]).view(-1), _local(state["exp_avg_sq"]).view(-1)
                for i in range(0, p_flat.numel(), self.CHUNK):
                    sl = slice(i, i + self.CHUNK)
                    g = g_flat[sl].float()
                    m, v, w = m_flat[sl].float(), v_flat[sl].float(), p_flat[sl].float()
                    w.mul_(1 - lr * wd)
                    m.lerp_(g, 1 - beta1)
                    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
                    w.addcdiv_(m, denom, value=-step_size)
                    m_flat[sl].copy_(m)
                    v_flat[sl].copy_(v)
                    if w.data_ptr() != p_flat[sl].data_ptr():  # p not fp32: round the update back
                        p_flat[sl].copy_(w)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts floating state to each parameter's dtype on load; put the moments back in BF16
        # (exact: they were saved as BF16 and the fp32 round trip is lossless).
        super().load_state_dict(state_dict)
        for st in self.state.values():
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    st[k] = st[k].to(torch.bfloat16)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def build_optimizer(model: nn.Module | list[nn.Module], cfg: OptimizerConfig, lr_cfg: LRScheduleConfig,
                    zero_group=None, trainable: Callable[[str], bool] | None = None) -> torch.optim.Optimizer:
    """AdamW over `param_groups` of `model` (or of a rank's model parts): torch's when
    `cfg.state_dtype` is float32 (fused kernels where torch has them, plain per-parameter updates
    over DTensors), `AdamWBF16State` when it is bfloat16. `zero_group`: the data-parallel group over
    which ZeroRedundancyOptimizer shards the state (ZeRO-1)."""
    module = nn.ModuleList(model) if isinstance(model, list) else model
    groups = param_groups(module, cfg.weight_decay, trainable)
    params = [p for g in groups for p in g["params"]]
    kw = dict(lr=lr_cfg.learning_rate, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.state_dtype == "bfloat16":
        cls = AdamWBF16State
    else:
        cls = torch.optim.AdamW
        sharded = any(isinstance(p, DTensor) for p in params)
        kw.update(fused=params[0].device.type in ("cuda", "cpu")) if not sharded else kw.update(foreach=False)
    if zero_group is None:
        return cls(groups, **kw)
    from torch.distributed.optim import ZeroRedundancyOptimizer

    opt = ZeroRedundancyOptimizer(groups[0]["params"], cls, process_group=zero_group, weight_decay=groups[0]["weight_decay"], **kw)
    opt.add_param_group({"params": groups[1]["params"], "weight_decay": 0.0})
    return opt



def clip_coefficient(norm: torch.Tensor, max_norm: float) -> float:
    """The factor global-norm clipping scales every gradient by (torch's `clip_grad_norm_` rule,
    `max_norm / (norm + 1e-6)` clamped to 1); 1.0 means no clipping."""
    return min(1.0, max_norm / (float(norm) + 1e-6))


def step_with_clip(optimizer: torch.optim.Optimizer, coef: float) -> None:
    """`optimizer.step()` on the gradients scaled by `coef` (`clip_coefficient`).

    Fast path: torch's fused AdamW divides each gradient by its `grad_scale` input inside the update
    kernel (the hook `torch.amp.GradScaler` uses), so clipping costs no extra pass over the gradients;
    the gradients are left scaled, as after `clip_grad_norm_`. Reference path (every other optimizer,
    DTensor shards, ZeRO-1): multiply the gradients in place, then step. `test_optim` compares them.
    """
    if coef >= 1.0:
        optimizer.step()
        return
    if isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults.get("fused"):
        dev = optimizer.param_groups[0]["params"][0].device
        optimizer.grad_scale = torch.tensor(1.0 / coef, dtype=torch.float32, device=dev)
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale
        return
    with torch.no_grad():
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(coef)
    optimizer.step()
