"""Per-rank memory of a parallel layout, from the code that would run (`dsv3 dryrun`, `dsv3 balance`).

Two measurements, no devices:

* **Model states** (`rank_states`): the rank's part is built by the trainer's build path
  (`dsv3.parallel.build.build_parallel_model`: PP stages, EP, TP, recompute, FSDP) on the meta device
  under torch's fake process group of the layout's size; its parameters are counted as allocated
  (storage bytes: FSDP's padded shards). Gradients have the parameters' shapes and dtype (fp32);
  AdamW keeps two moments per parameter in `optimizer.state_dtype`.
* **Activations** (`dsv3.tools.activations`): one micro-batch of the stage's own modules (the
  model's layers, the pipeline stage, the configured recompute wrappers, the trainer's loss) runs
  forward and backward on fake tensors under `memtrack.TensorMemory`, which charges every tensor by
  its storage's lifetime.

Assembled per rank (`rank_memory`, `assemble`): the peak is the larger of two moments,
    backward = params + optimizer + fsdp_buffers + grads + in-flight activations (moe_dispatch
               included when the peak is inside an MoE layer) + a gradient being formed + autocast_cache
    reduce   = params + optimizer + fsdp_buffers + unsharded grads + sharded grads + one unit's
               reduce-scatter input                                  (FSDP no-sync under PP only)
and `breakdown` names the parts of the larger one (they add up to `peak_bytes`). Activations are per
tensor-parallel rank (`ActivationProfile`, `memory_tp`: 1/tp of what the TP plan splits, whole what
it replicates: latents, gathered inputs, the gathered logits of every head); `in_flight` is the
schedule's micro-batches alive at once on the rank (1F1B: pp - p, GPipe: M), their logits named
apart. `grads` are all of them when micro-batches run forward after a backward, else what exceeds the
one micro-batch's activations they replace; under PP, FSDP's no-sync keeps every FSDP unit's gradient
unsharded (fp32) until the final reduce-scatter; under TP the vocab-parallel embedding's gradient is
whole [vocab, hidden] (measured). `fsdp_buffers` are the all-gathered dense weights (the whole stage
under PP, where FSDP keeps them between forward and backward; two layers otherwise) plus, when the
routed experts are FSDP-sharded over edp (`ParallelDims.shard_experts`), two MoE layers' experts
gathered over edp (resharded after forward, also under PP); the gradient being formed is one FSDP
unit's unsharded fp32 gradient (without PP with FSDP's reduce-scatter copy of it), or the largest
local gradient, the head's summed over the MTP heads, or, at the end of a micro-batch's backward, the
embedding's (a DTensor's accumulating out of place outside FSDP); `autocast_cache` one bf16 copy of
every linear's weight (`linear_bytes`; not the embedding's) under `train.precision: bf16`, whose
routed-expert copies are activations of their layer (`expert_copy_bytes`), and `moe_dispatch` the all-to-all row buffers of one MoE layer at `imbalance`
times the mean tokens per rank, alive only while that layer's forward (or its recompute) runs
(`ActivationProfile.stage`). Every term is checked against measured runs (`tests/tools/memory_cases.py`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from dsv3.parallel.dims import ParallelDims
from dsv3.tools.activations import ActivationProfile, StageActivation, compute_dtype

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


@contextlib.contextmanager
def fake_world(world: int, rank: int):
    """torch's fake process group (collectives are no-ops) of `world` ranks, as `rank`."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    if dist.is_initialized():
        raise RuntimeError("a fake process group needs a process without one (it is process-global)")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        if id(st) not in seen:
            seen.add(id(st))
            total += st.nbytes()
    return total


def _local(p: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return p.to_local() if isinstance(p, DTensor) else p


def _fsdp_units(part: nn.Module) -> list[nn.Module]:
    m = part.model
    layers = list(m.layers.values()) if isinstance(m.layers, nn.ModuleDict) else list(m.layers)
    units = [u for u in [getattr(m, "embed_tokens", None), *layers, *(getattr(m, "mtp", None) or [])] if u is not None]
    if getattr(part, "lm_head", None) is not None:
        units.append(nn.ModuleList([m.norm, part.lm_head]))
    return units


def _is_dp_sharded(p: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor) and bool({"dp", "dp_shard"} & set(p.device_mesh.mesh_dim_names or ()))


def _gathered_bytes(unit: nn.Module, dp: int) -> int:
    """Bytes of `unit`'s FSDP-managed weights once all-gathered over its `dp` shards (fp32 masters)."""
    return sum(p.to_local().numel() * dp * p.element_size() for p in unit.parameters() if _is_dp_sharded(p))


def linear_bytes(mod: nn.Module, dims: ParallelDims) -> int:
    """Bytes of `mod`'s nn.Linear weights as their matmuls see them (gathered where FSDP shards them).
    Under bf16 autocast each is cast once per step (autocast caches the cast of a leaf parameter until
    the step's autocast region ends: recompute does not drop it); the embedding (a lookup) and the
    norms (elementwise) are not cast."""
    fsdp = dims.fsdp
    return sum(_local(m.weight).numel() * m.weight.element_size() * (dims.fsdp_size if fsdp and _is_dp_sharded(m.weight) else 1)
               for m in mod.modules() if isinstance(m, nn.Linear))


def rank_states(cfg, rank: int) -> dict:
    """Build `rank`'s part of `cfg`'s layout (meta device, fake process group) and count its model states."""
    from dsv3.parallel.build import build_parallel_model, held_parameters
    from dsv3.parallel.dims import build_meshes
    from dsv3.parallel.fsdp import moe_params

    dims = cfg.layout()
    with fake_world(dims.world_size, rank):
        meshes = build_meshes(dims, "cpu", cfg.model)
        dm = build_parallel_model(cfg.model, dims, meshes, cfg.train.seed, device=None)
        params = list(dm.parameters())
        local = [_local(p) for p in params]
        numel = sum(t.numel() for t in local)
        param_bytes = _storage_bytes(local)
        fsdp = dims.fsdp
        units = [u for part in dm.parts for u in _fsdp_units(part)]
        gathered = [_gathered_bytes(u, dims.fsdp_size) for u in units] if fsdp else [0]
        expert_ids = {id(p) for part in dm.parts for p in moe_params(part)[1]}
        layers = sorted({int(k) for part in dm.parts for k in _layer_keys(part)})
        layer_mods = {id(mod) for part in dm.parts for _, mod in _layer_modules(part)}
        in_layers = {id(p) for part in dm.parts for _, mod in _layer_modules(part) for p in mod.parameters()}
        # decoder / MTP layer id -> (local parameters, of which dense, dense bytes all-gathered by FSDP,
        # largest local tensor's bytes, routed-expert bytes all-gathered over edp, linear weight bytes,
        # routed-expert weight bytes as the grouped matmuls see them, parameter tensors)
        per_layer = {}
        for part in dm.parts:
            for idx, mod in _layer_modules(part):
                expert = sum(_local(p).numel() * p.element_size() for p in mod.parameters() if id(p) in expert_ids)
                per_layer[idx] = (sum(_local(p).numel() for p in mod.parameters()),
                                  sum(_local(p).numel() for p in mod.parameters() if id(p) not in expert_ids),
                                  _gathered_bytes(mod, dims.fsdp_size) if fsdp else 0,
                                  max(_local(p).numel() * p.element_size() for p in mod.parameters()),
                                  dims.edp * expert if dims.shard_experts else 0,
                                  linear_bytes(mod, dims), (dims.edp if dims.shard_experts else 1) * expert,
                                  sum(1 for _ in mod.parameters()))
        heads = [part.lm_head for part in dm.parts if getattr(part, "lm_head", None) is not None]
        head_grad = max([_gathered_bytes(h, dims.fsdp_size) if fsdp else _storage_bytes(_local(p) for p in h.parameters())
                         for h in heads] or [0])
        # under TP the vocab-parallel embedding's weight gradient is formed whole ([vocab, hidden], fp32) on
        # every tp rank (measured: `tests/tools/memory_cases.py`), where its weight is 1/tp of the rows
        embeds = [part.model.embed_tokens for part in dm.parts if getattr(part.model, "embed_tokens", None) is not None]
        whole = cfg.model.vocab_size * cfg.model.hidden_size * 4 if dims.tp > 1 and embeds else 0
        held = max([_gathered_bytes(e, dims.fsdp_size) if fsdp else _storage_bytes(_local(p) for p in e.parameters())
                    for e in embeds] or [0])
        out = {"rank": rank, "pp_stage": meshes.pp_rank, "tp_rank": meshes.tp_rank, "dp_rank": meshes.dp_rank,
               "ep_rank": meshes.sparse.get_local_rank("ep"), "stages": [getattr(p, "stage_index", 0) for p in dm.parts],
               "layers": layers, "mtp": any(len(getattr(p.model, "mtp", None) or []) for p in dm.parts),
               "params": numel, "stage_params": held_parameters(dm)["stage_params"], "param_bytes": param_bytes, "grad_bytes": param_bytes,
               "fsdp_gathered_max": max(gathered), "fsdp_gathered_all": sum(gathered),
               "fsdp_expert_gathered_max": max([v[4] for v in per_layer.values()] or [0]),
               "fsdp_expert_gathered_all": sum(v[4] for v in per_layer.values()), "head_grad_bytes": head_grad,
               "embed_grad_bytes": whole, "embed_grad_extra_bytes": max(0, whole - held),
               "largest_param_bytes": max(t.numel() * t.element_size() for t in local), "linear_weight_bytes": sum(linear_bytes(part, dims) for part in dm.parts),
               "expert_weight_bytes": max([v[6] for v in per_layer.values()] or [0]),
               "layer_params": per_layer, "edge_param_tensors": len(params) - sum(v[7] for v in per_layer.values()),
               "edge_gathered_max": max([g for u, g in zip(units, gathered) if id(u) not in layer_mods] or [0]),
               "edge_largest_param_bytes": max([t.numel() * t.element_size() for p, t in zip(params, local) if id(p) not in in_layers] or [0])}
    state_bytes = DTYPE_BYTES[cfg.optimizer.state_dtype]
    out["optimizer_bytes"] = optimizer_bytes(numel, len(params), state_bytes)
    return out


def optimizer_bytes(numel: int, tensors: int, state_bytes: int) -> int:
    """AdamW's state of `tensors` parameter tensors of `numel` elements: exp_avg, exp_avg_sq, a fp32 step scalar each."""
    return 2 * numel * state_bytes + 4 * tensors


def _layer_modules(part: nn.Module) -> list[tuple[int, nn.Module]]:
    """(layer id, module) of a part's decoder layers (under any recompute wrapper) and whole MTP modules."""
    m = part.model
    unwrap = lambda mod: getattr(mod, "_checkpoint_wrapped_module", mod)
    layers = list(m.layers.values()) if isinstance(m.layers, nn.ModuleDict) else list(m.layers)
    return [(unwrap(l).layer_idx, l) for l in layers] + [(unwrap(mod.block).layer_idx, mod) for mod in getattr(m, "mtp", None) or []]


def _layer_keys(part: nn.Module) -> list[str]:
    layers = part.model.layers
    if isinstance(layers, nn.ModuleDict):
        return list(layers.keys())
    return [str(m.layer_idx if hasattr(m, "layer_idx") else i) for i, m in enumerate(layers)]


def in_flight(dims: ParallelDims, pp_rank: int) -> int:
    """Micro-batches whose activations a pipeline rank holds at once, per stage it holds (the
    warm-up depth of the schedule): 1F1B pp - p, GPipe and LoopedBFS all M, interleaved
    (v stages per rank, torch's Interleaved1F1B warm-up) ((v-1)·pp + 2(pp-1-p) + 1) / v,
    V-shaped (ZBV, DualPipeV: ranks hold stages p and 2pp-1-p) pp + 1 (DualPipe's README)."""
    M, pp, v = dims.micro_batch_num, dims.pp, dims.v
    if pp == 1:
        return 1
    s = dims.schedule
    if s in ("GPipe", "LoopedBFS"):
        return M
    if s == "1F1B":
        return min(M, pp - pp_rank)
    if s in ("ZBVZeroBubble", "DualPipeV"):
        return min(M, pp + 1)
    return min(M, -(-((v - 1) * pp + 2 * (pp - 1 - pp_rank) + 1) // v))


def rank_memory(cfg, states: dict, profile: ActivationProfile, imbalance: float = 1.5) -> dict:
    """The rank's memory report: `states` (from `rank_states`) plus activations, transients and the peak."""
    from dsv3.config.layout import recompute_layer_ids, stage_layers

    dims = ParallelDims.from_config(cfg.parallel)
    mc = cfg.model
    per_stage = stage_layers(mc, dims.n_stages, cfg.parallel.pp_layer_offset)
    rc_ids = recompute_layer_ids(mc, cfg.train.recompute, per_stage, cfg.parallel.recompute_layers)
    dispatch, copies = moe_dispatch_bytes(cfg, dims, imbalance), expert_copy_bytes(cfg, states)
    if dims.pp == 1:
        loss = "fused" if dims.world_size == 1 and cfg.train.fused_ce else "logits"
        acts = [profile.whole(rc_ids, loss, dispatch, copies)]
    else:
        acts = [profile.stage(per_stage[s], s == 0, s == dims.n_stages - 1, rc_ids, dispatch, copies) for s in states["stages"]]
    return assemble(cfg, dims, states, acts, imbalance)


def expert_copy_bytes(cfg, states: dict) -> int:
    """Under bf16 autocast the grouped experts cast one MoE layer's routed-expert weights (as gathered)
    to bf16 on every call, explicitly (not autocast's cache) and save them for backward: activations of
    that layer, per micro-batch, dropped by recompute until it reruns (`ActivationProfile.stage`)."""
    return states["expert_weight_bytes"] // 2 if cfg.train.precision == "bf16" else 0


def moe_dispatch_bytes(cfg, dims: ParallelDims, imbalance: float) -> int:
    """The row buffers an MoE layer holds under expert parallelism beyond the single-device layer's
    (`ParallelExperts.forward_grouped`, alive together when its routed experts return): the received
    rows, their expert-sorted copy, the experts' output and its unsorted copy sent back, each at
    `imbalance` x the mean load per rank (measured: 4 x 2.07 MiB at 1.035 x, `memory_cases`)."""
    if dims.ep == 1:
        return 0
    rows = cfg.train.batch_size * cfg.data.seq_length // dims.tp * cfg.model.num_experts_per_tok
    return int(4 * imbalance * rows * cfg.model.hidden_size * compute_dtype(cfg).itemsize)


def assemble(cfg, dims: ParallelDims, states: dict, acts_of: list[StageActivation], imbalance: float) -> dict:
    """Model states + activations of the rank's stages (per tp rank: `ActivationProfile`) -> the peak."""
    n = in_flight(dims, states["pp_stage"])
    act_mb = sum(a.act_bytes for a in acts_of)
    top = max(acts_of, key=lambda a: a.fwd_bwd_peak - a.act_bytes)  # the stage whose transient is the largest
    act_total = sum(n * a.act_bytes for a in acts_of) + top.fwd_bwd_peak - top.act_bytes
    fsdp, nosync = dims.fsdp, dims.fsdp_no_sync
    fsdp_buffers = (states["fsdp_gathered_all"] if dims.pp > 1 else 2 * states["fsdp_gathered_max"]) if fsdp else 0
    # one FSDP unit's unsharded fp32 gradient and, where every backward reduces (no pipeline, or
    # reduce_grads_every_microbatch), FSDP's reduce-scatter input, a copy of it (foreach_reduce); under
    # PP's no-sync the copy comes at the final reduce. Reducing every micro-batch under PP the peak is a
    # unit's reduce-scatter (the activations of the micro-batches in flight beside it): its output shard
    # too and, on CPU, gloo's own copy of the input (measured, `memory_cases`)
    copies = 1 if nosync else 3 if dims.reduce_every_microbatch and cfg.train.device == "cpu" else 2
    shard = dims.fsdp_size if dims.reduce_every_microbatch else 0
    unit = states["fsdp_gathered_max"]
    grad_transient = copies * unit + (unit // shard if shard else 0) if fsdp else states["largest_param_bytes"]
    # bf16 autocast: one bf16 copy of every linear's weight for the step (`linear_bytes`); the routed
    # experts' copies are activations of their layer (`expert_copy_bytes`)
    autocast = states["linear_weight_bytes"] // 2 if cfg.train.precision == "bf16" else 0
    experts = states["fsdp_expert_gathered_max"]  # one MoE's routed experts gathered over edp
    # resharded after forward also under PP: one layer's in use and the next one's prefetched
    fsdp_buffers += 2 * experts
    grad_transient = max(grad_transient, copies * experts + (experts // dims.edp if shard else 0))
    # The embedding's gradient is formed at the end of a micro-batch's backward, its activations gone
    # (the other micro-batches in flight keep theirs); a DTensor's gradient accumulates out of place
    # (the new one and the sum) where FSDP does not hold it (FSDP adds in place).
    accumulates = dims.micro_batch_num > 1 and dims.tp > 1 and not fsdp
    embed_transient = (2 if accumulates else 1) * states["embed_grad_bytes"]
    if states["mtp"]:  # the head's weight gradient: the main and the MTP heads' parts formed apart, then summed
        grad_transient = max(grad_transient, 2 * states["head_grad_bytes"])
    # Gradients of this step are absent while the first micro-batches run forward (zero_grad sets them
    # to None) and grow while the first backward frees its activations: all of them are alive at the
    # activation peak only when later micro-batches run forward after a backward (more micro-batches
    # than in flight), else they add what exceeds the one micro-batch's activations they replace.
    held = states["grad_bytes"] + states["embed_grad_extra_bytes"]
    unsharded = reduce = 0
    if nosync:
        # torch's pipeline schedules run every backward under FSDP's no-sync: each unit's gradient stays
        # unsharded (fp32, accumulated over the micro-batches) until the schedule's final reduce-scatter,
        # where the sharded gradients appear beside them and one unit's reduce-scatter input.
        unsharded = states["fsdp_gathered_all"] + states["fsdp_expert_gathered_all"]
        held = max(0, held - unsharded // dims.fsdp_size) + unsharded  # the unsharded replace the FSDP shards
        reduce = unsharded + states["grad_bytes"] + max(states["fsdp_gathered_max"], experts)
    grads = held if dims.micro_batch_num > n else max(0, held - act_mb)
    base = states["param_bytes"] + states["optimizer_bytes"] + fsdp_buffers
    at_act_peak = act_total + grad_transient >= (n - 1) * act_mb + embed_transient
    acts, transient = (act_total, grad_transient) if at_act_peak else ((n - 1) * act_mb, embed_transient)
    logits = min(acts, sum(a.logits_bytes for a in acts_of) * (n if at_act_peak else n - 1))
    dispatch = top.dispatch_bytes if at_act_peak else 0  # the MoE layer running at the activation peak
    backward = grads + acts + transient + autocast
    peak = base + max(backward, reduce)
    common = {"weights": states["param_bytes"], "optimizer": states["optimizer_bytes"], "fsdp_gathered_weights": fsdp_buffers}
    if backward >= reduce:
        phase = "backward" + ("" if at_act_peak else " (embedding gradient)")
        parts = {**common, "gradients": grads, "activations": acts - logits - dispatch, "logits": logits, "gradient_transient": transient,
                 "autocast_cache": autocast, "moe_dispatch": dispatch}
    else:
        phase = "final gradient reduce-scatter"
        parts = {**common, "unsharded_gradients": unsharded, "sharded_gradients": states["grad_bytes"],
                 "reduce_scatter_input": reduce - unsharded - states["grad_bytes"]}
    return {**{k: v for k, v in states.items() if not k.startswith(("fsdp_", "largest_", "dense_", "layer_", "edge_", "head_", "embed_"))},
            "activation_bytes": act_mb, "micro_batches_in_flight": n, "activation_in_flight_bytes": act_total,
            "fsdp_buffer_bytes": fsdp_buffers, "grad_transient_bytes": grad_transient,
            "embed_grad_transient_bytes": embed_transient, "autocast_cache_bytes": autocast,
            "moe_dispatch_bytes": dispatch, "moe_imbalance": imbalance, "unsharded_grad_bytes": unsharded,
            "grad_reduce_bytes": reduce, "peak_bytes": peak, "peak_phase": phase, "breakdown": parts}


def representative_ranks(dims: ParallelDims) -> list[int]:
    """One rank per pipeline rank: (dp 0, tp 0) of it. Ranks of one pipeline rank hold equal-sized
    pieces (tp and ep divide the split dimensions exactly, `ParallelDims.validate`; FSDP2 pads every
    shard to the same size) and see the same activation shapes, so one stands for all dp x tp."""
    return [p * dims.dp * dims.tp for p in range(dims.pp)]


def layout_memory(cfg, imbalance: float = 1.5, gpu_attention: bool = True, log=None) -> list[dict]:
    """`rank_memory` of every representative rank of `cfg`'s layout."""
    dims = ParallelDims.from_config(cfg.parallel)
    dims.validate(None, cfg.model, seq_len=cfg.data.seq_length)
    profile = ActivationProfile(cfg, gpu_attention)
    out = []
    for r in representative_ranks(dims):
        states = rank_states(cfg, r)
        out.append(rank_memory(cfg, states, profile, imbalance))
        out[-1]["represents"] = dims.dp * dims.tp
        if log:
            lay = states["layers"]
            log(f"pipeline rank {states['pp_stage'] + 1} of {dims.pp} measured (rank {r}, "
                f"layers {f'{lay[0]}-{lay[-1]}' if lay else 'none'}{' + MTP' if states['mtp'] else ''})")
    return out
