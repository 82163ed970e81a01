"""Tensor- and expert-parallel inference inside one rank (vLLM's layout for DeepSeek), on plain
torch.distributed: gloo on CPU, NCCL on GPU. The model stays single-device maths; this module cuts
its weights to one rank's slices and adds the collectives from outside.

The seam for launchers (`LLM(tensor_parallel_size=N)`, `dsv3 serve --tensor-parallel-size N`):

    ctx = ParallelContext(group, tp_size=N, ep_size=N if enable_expert_parallel else 1)
    model = load_sharded(model_dir, ctx, dtype, device)     # dsv3.infer.parallel_load: reads only its slices
    # (or, given a full model in memory: shard_model(model, ctx))
    engine = LLMEngine(model, tokenizer, parallel=ctx, num_gpu_blocks=SAME_ON_EVERY_RANK, ...)

Every rank holds the same latent cache layout and block tables; `engine.runner.prefill(...)`,
`.decode(...)`, `.mtp_prefill(...)`, `.mtp_decode(...)` called on every rank with the SAME arguments
return the SAME full fp32 logits on every rank (the vocab-parallel head is gathered). A launcher
therefore only has to broadcast each step's runner inputs from rank 0; or, as the tests do, every
rank runs the same `LLMEngine` in lockstep (same requests, same seeds: the scheduler and the samplers
are deterministic, so they stay identical without any broadcast).

Layout over the W ranks of `group` (all ranks see the same tokens; no data parallelism):
* attention (tp = W, or 1 to replicate it): q_proj / q_b_proj and kv_b_proj column-parallel by head
  (W/tp heads per rank ... H/tp), o_proj row-parallel + all-reduce. q_a_proj / kv_a_proj_with_mqa
  and their norms are replicated, so every rank computes, and caches, the whole latent [c_kv | k_pe]
  (576 values per token per layer): the latent has no head axis to split, and the absorbed decode
  needs all of it for each local head. That is vLLM's choice under TP; DP-attention (SGLang) would
  avoid the copy but needs a data-parallel scheduler, which this engine does not have.
* embedding and lm_head vocab-parallel over tp (masked lookup + all-reduce; logits all-gathered).
* dense MLP and shared experts over all W ranks: gate/up column-parallel, down row-parallel.
* routed experts: ep groups of W/ep ranks; each group holds E/ep whole experts (expert parallel),
  each expert's intermediate dim split over the W/ep ranks of the group. Tokens are not moved: every
  rank routes all tokens (replicated router), runs the (token, expert) pairs of its local experts,
  and one all-reduce per MoE layer sums routed + shared partial outputs (the all-gather/all-reduce
  dispatch vLLM uses for small batches; all-to-all pays off only when ranks hold different tokens).
* MTP blocks are decoder layers and shard the same way; eh_proj and the MTP norms are replicated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dsv3.checkpoint import hf_map
from dsv3.config.layout import indivisible
from dsv3.config.schema import ModelConfig
from dsv3.errors import UserError
from dsv3.model.layers import MLP
from dsv3.model.moe import MoE

ATTN_HEAD_SPLIT = ("q_proj", "q_b_proj", "kv_b_proj", "o_proj")
"""Attention matrices split by head over tp (split dim from `hf_map.SHARD_DIMS`)."""
VOCAB_SPLIT = ("embed_tokens", "lm_head")
"""Vocab-parallel over tp (rows)."""


@dataclass
class ParallelContext:
    """One rank's view of the inference group.

    group: the torch.distributed process group (None: the default group). tp_size: W (heads and
    vocab split over all ranks) or 1 (attention replicated). ep_size: expert-parallel groups, dividing
    W (1: every expert split over all W ranks; W: whole experts placed one rank each).
    """

    group: Any = None
    tp_size: int = 1
    ep_size: int = 1
    rank: int | None = None
    world: int | None = None
    """rank / world: taken from `group` when None; given explicitly, the context only slices (no collectives
    run), e.g. to plan or check one rank's shard from a single process."""

    def __post_init__(self):
        if self.world is None:
            self.world = dist.get_world_size(self.group) if dist.is_initialized() else 1
        if self.rank is None:
            self.rank = dist.get_rank(self.group) if dist.is_initialized() else 0
        if self.tp_size not in (1, self.world):
            raise UserError(f"tensor_parallel_size {self.tp_size}: must equal the number of ranks ({self.world}) or be 1")
        if self.ep_size < 1 or self.world % self.ep_size:
            raise UserError(f"expert parallel size {self.ep_size} does not divide the number of ranks ({self.world})")

    # ---- who holds what
    @property
    def tp_rank(self) -> int:
        return self.rank if self.tp_size > 1 else 0

    @property
    def expert_tp(self) -> int:
        """Ranks one expert's intermediate dim is split over."""
        return self.world // self.ep_size

    def validate(self, cfg: ModelConfig) -> None:
        """One UserError line for a layout the model's sizes do not allow."""
        ranks = ("the number of ranks", self.world)
        bad = indivisible(cfg, {"num_attention_heads": ("tensor_parallel_size", self.tp_size), "intermediate_size": ranks,
                                "shared_width": ranks, "n_routed_experts": ("the expert parallel size", self.ep_size),
                                "moe_intermediate_size": ("ranks per expert (ranks / ep)", self.expert_tp)})
        if bad:
            (by, parts), name, value = bad
            what = "the shared experts' width" if name == "shared_width" else name
            raise UserError(f"{what} {value} is not divisible by {by} {parts}: choose a size that divides it")

    # ---- slicing: (dim, index, parts) per cut of one state-dict tensor
    def cuts(self, name: str) -> list[tuple[int, int, int]]:
        """How this rank cuts our state-dict tensor `name`: [(dim, index, parts), ...] ([] = replicated)."""
        parts = name.split(".")
        module = parts[-2] if len(parts) >= 2 else parts[-1]
        if parts[-3:-1] == ["mlp", "experts"]:
            leaf = parts[-1]  # stacked routed experts [E, I, D] / [E, D, I]
            out = [(0, self.rank // self.expert_tp, self.ep_size)]
            out.append((1 if leaf.startswith(("gate_proj", "up_proj")) else 2, self.rank % self.expert_tp, self.expert_tp))
            return [c for c in out if c[2] > 1]
        dim = hf_map.SHARD_DIMS.get(module)
        if dim is None or not parts[-1].startswith("weight"):
            return []
        if module in ATTN_HEAD_SPLIT or module in VOCAB_SPLIT:
            return [(dim, self.tp_rank, self.tp_size)] if self.tp_size > 1 else []
        if module in ("gate_proj", "up_proj", "down_proj"):  # dense MLP / shared experts
            return [(dim, self.rank, self.world)] if self.world > 1 else []
        return []

    def local_index(self, name: str, shape: tuple[int, ...]) -> tuple[slice, ...]:
        """The slice of a full tensor of `shape` this rank keeps (the last ranks' part of a vocabulary
        that tp does not divide is short, or empty: `local_shape` pads it)."""
        idx = [slice(None)] * len(shape)
        for dim, i, n in self.cuts(name):
            step = -(-shape[dim] // n)
            idx[dim] = slice(min(i * step, shape[dim]), min((i + 1) * step, shape[dim]))
        return tuple(idx)

    def local_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """This rank's shape of a full tensor of `shape`: every part ceil(size / parts) long. Only the
        vocabulary may not divide (`validate`): as in vLLM, it is padded to a multiple of tp with zero
        rows (ids past the vocabulary never occur; `gather_vocab` drops their logits)."""
        out = list(shape)
        for dim, _, n in self.cuts(name):
            out[dim] = -(-shape[dim] // n)
        return tuple(out)

    # ---- collectives
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def gather_vocab(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """[..., ceil(V/tp)] on each rank -> [..., V] on every rank (the padding rows' logits dropped)."""
        if self.tp_size == 1:
            return logits
        parts = [torch.empty_like(logits) for _ in range(self.tp_size)]
        dist.all_gather(parts, logits.contiguous(), group=self.group)
        full = torch.cat(parts, dim=-1)
        return full if full.shape[-1] == vocab_size else full[..., :vocab_size].contiguous()

    # ---- the model
    def install(self, model: nn.Module) -> None:
        """Add the collectives to a sharded model (the runner calls this after any quantisation)."""
        if self.world == 1 or getattr(model, "_parallel_installed", False):
            return
        for mod in model.modules():
            if isinstance(mod, MoE):
                mod.experts = LocalExperts(mod.experts, (self.rank // self.expert_tp) * mod.experts.n_experts)
                mod.register_forward_hook(self._reduce_hook)
            elif isinstance(mod, MLP) and not _is_shared_expert(model, mod):
                mod.register_forward_hook(self._reduce_hook)
        if self.tp_size > 1:
            for block in _blocks(model):
                block.self_attn.o_proj.register_forward_hook(self._reduce_hook)
            emb = model.model.embed_tokens
            emb.__class__ = VocabParallelEmbedding
            emb.parallel = self
        model._parallel_installed = True

    def _reduce_hook(self, module, inputs, output):
        return self.all_reduce(output)


def _blocks(model) -> list[nn.Module]:
    return list(model.model.layers) + [m.block for m in model.model.mtp]


def _is_shared_expert(model, mlp: MLP) -> bool:
    return any(isinstance(m, MoE) and m.shared_experts is mlp for m in model.modules())


class VocabParallelEmbedding(nn.Embedding):
    """This rank's rows [lo, lo + V/tp) of the embedding; other ids give zeros, the all-reduce fills them in."""

    parallel: ParallelContext

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        lo = self.parallel.tp_rank * self.num_embeddings
        local = ids - lo
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.parallel.all_reduce(out.masked_fill(outside[..., None], 0))


class LocalExperts(nn.Module):
    """This rank's experts [lo, lo + L) of the routed experts (`Experts` or a quantised `QuantExperts`,
    each possibly holding a slice of the intermediate dim). The model's own `forward_grouped` /
    `forward_loop` run the (token, expert) pairs routed here; pairs routed to other ranks' experts
    contribute zero here and are added by the MoE's all-reduce."""

    def __init__(self, inner: nn.Module, lo: int):
        super().__init__()
        self.inner, self.lo = inner, lo

    def _run(self, fn, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        local = idx - self.lo
        keep = (local >= 0) & (local < self.inner.n_experts)
        tok, slot = keep.nonzero(as_tuple=True)  # [M] pairs routed to this rank
        out = torch.zeros_like(x, dtype=torch.float32)
        if tok.numel():
            y = fn(x[tok], w[tok, slot][:, None], local[tok, slot][:, None])
            out.index_add_(0, tok, y.float())
        return out.to(x.dtype)

    def forward_grouped(self, x, w, idx):
        return self._run(self.inner.forward_grouped, x, w, idx)

    def forward_loop(self, x, w, idx):
        return self._run(self.inner.forward_loop, x, w, idx)


# ----------------------------------------------------------------------------------------- sharding
@torch.no_grad()
def shard_model(model: nn.Module, ctx: ParallelContext) -> nn.Module:
    """Cut a full (dense, not yet quantised) model in memory down to this rank's slices, in place.

    Works on the meta device too (shapes only). Head counts of every MLA become the local count.
    """
    cfg: ModelConfig = model.config
    ctx.validate(cfg)
    if ctx.world == 1:
        return model
    if cfg.tie_word_embeddings and ctx.tp_size > 1:
        raise UserError("tie_word_embeddings with tensor parallelism is not supported (DeepSeek-V3 unties them)")
    for name, p in list(model.named_parameters()):
        if ctx.cuts(name):
            mod_name, _, attr = name.rpartition(".")
            mod = model.get_submodule(mod_name)
            local = pad_local(p.data[ctx.local_index(name, tuple(p.shape))], ctx.local_shape(name, tuple(p.shape)))
            mod._parameters[attr] = nn.Parameter(local.clone() if local.device.type != "meta" else local,
                                                 requires_grad=p.requires_grad)
    for block in _blocks(model):
        block.self_attn.n_heads = cfg.num_attention_heads // ctx.tp_size
    for mod in model.modules():
        if isinstance(mod, MoE):
            mod.experts.n_experts = cfg.n_routed_experts // ctx.ep_size
        if isinstance(mod, nn.Embedding):
            mod.num_embeddings = mod.weight.shape[0]
        if isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape
    model.parallel = ctx
    return model


def pad_local(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """`t` (a rank's slice) zero-padded at the end of each dim to `shape` (ParallelContext.local_shape)."""
    if tuple(t.shape) == tuple(shape):
        return t
    out = torch.zeros(shape, dtype=t.dtype, device=t.device)
    if t.device.type != "meta":
        out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def weight_bytes(model: nn.Module, ctx: ParallelContext) -> dict[str, int]:
    """This rank's weight bytes: {'sharded': its slices of the tensors the layout cuts, 'replicated': the
    rest, 'total', 'sharded_full': the full size of those cut tensors (= sharded x ranks for an even layout)}."""
    sharded = replicated = full = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith(("inv_freq", "tokens_per_expert")):
            continue
        n = t.numel() * t.element_size()
        cuts = ctx.cuts(name.replace(".experts.inner.", ".experts."))
        if cuts:
            sharded += n
            full += n * math.prod(parts for _, _, parts in cuts)
        else:
            replicated += n
    return {"sharded": sharded, "replicated": replicated, "total": sharded + replicated, "sharded_full": full}
