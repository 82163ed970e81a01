"""`dsv3 balance --config YAML --device-memory 64GB [--headroom 0.15] [--set ...] [--json FILE]`: per-stage
layer counts (MindSpore `offset`) and recompute counts (`recompute_config.recompute`) that minimise the
slowest pipeline stage with every stage fitting in device memory less the headroom (`dsv3 dryrun`'s
rule and defaults). Progress goes to stderr: one line per pipeline rank built and per kind of layer
profiled.

Costs of a stage holding layers [a, b) and recomputing its first r (the MTP block last, on the last
stage):
* time: forward FLOPs per token of each layer (`dsv3 info`'s accounting, `info.layer_flops`) x
  (1 forward + 2 backward + 1 more forward when recomputed in full), plus the head's on the last
  stage (the embedding is a lookup); per micro-batch per rank (tokens / tp);
* memory: the dry-run's (`dsv3.tools.memory`): each layer's parameters, gradients and optimizer state
  as this layout shards them (from the fake-process-group build of every pipeline rank), the
  activations of its kind of layer (dense or MoE, recomputed or not) measured on fake tensors, the
  schedule's micro-batches in flight for that stage, and the same transients as `dsv3 dryrun`.
The search is exact (`dsv3.tools.plan`): dynamic programming over contiguous cuts. Each stage's
recompute count is its smallest that fits; one line per stage says why it is enough: the stage's peak
with one layer fewer recomputed (over the usable memory) and with its count (within it, and by how much).
When no plan fits with FSDP's no-sync gradients under the pipeline (torch's default), it plans with
`parallel.reduce_grads_every_microbatch` on, says so and what the layout would need without it.
"""

from __future__ import annotations

import argparse
import copy

from dsv3.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dsv3.tools.dryrun import add_layout_arguments

    add_layout_arguments(p)
    p.add_argument("--json", metavar="FILE", help="also write the plan as JSON")


class StageCosts:
    """time(s, a, b, r) and mem(s, a, b, r) of one layout (see the module docstring)."""

    def __init__(self, cfg, imbalance: float = 1.5, log=None):
        from dsv3.tools.info import layer_flops
        from dsv3.tools.memory import DTYPE_BYTES, ActivationProfile, moe_dispatch_bytes, rank_states, representative_ranks

        cfg = copy.deepcopy(cfg)
        if cfg.train.recompute == "none":
            cfg.train.recompute = "full"  # the plan may recompute
        cfg.parallel.recompute_layers = None
        self.cfg, self.imbalance = cfg, imbalance
        self.dims = dims = cfg.layout()
        dims.validate(None, cfg.model, seq_len=cfg.data.seq_length)
        if dims.pp < 2 or dims.v != 1:
            raise UserError(f"dsv3 balance plans pipelines of one stage per rank: pipeline_stage {dims.pp}, schedule "
                            f"{dims.schedule} with {dims.v} stages per rank (use pipeline_stage >= 2 and GPipe or 1F1B)")
        mc = cfg.model
        self.L, self.D, self.S = mc.num_hidden_layers, mc.num_nextn_predict_layers, dims.pp
        self.layer: dict[int, tuple] = {}
        self.edge: dict[str, tuple] = {}
        for r in representative_ranks(dims):
            st = rank_states(cfg, r)
            per = st["layer_params"]
            self.layer.update(per)
            key = "first" if st["pp_stage"] == 0 else "last" if st["pp_stage"] == dims.pp - 1 else "middle"
            rest = st["params"] - sum(v[0] for v in per.values())
            linear_rest = st["linear_weight_bytes"] - sum(v[5] for v in per.values())
            gathered_rest = st["fsdp_gathered_all"] - sum(v[2] for v in per.values())
            self.edge[key] = (rest, linear_rest, gathered_rest, st["edge_largest_param_bytes"], st["edge_gathered_max"],
                              st["head_grad_bytes"], st["embed_grad_bytes"], st["embed_grad_extra_bytes"], st["edge_param_tensors"])
            if log:
                log(f"built pipeline rank {st['pp_stage'] + 1} of {dims.pp} (rank {r})")
        self.state_bytes = DTYPE_BYTES[cfg.optimizer.state_dtype]
        self.profile = ActivationProfile(cfg, log=log)
        self.dispatch = moe_dispatch_bytes(cfg, dims, imbalance)
        flops, self.head_flops = layer_flops(mc, cfg.data.seq_length)
        tokens = cfg.train.batch_size * cfg.data.seq_length / dims.tp
        self.fwd = [flops[i] * tokens for i in range(self.L + self.D)]
        self.head = self.head_flops * tokens
        self.rc_factor = 1.0 if cfg.train.recompute == "full" else 0.0  # selective reruns no matrix product
        self._mem: dict[tuple, float] = {}

    def reduce_every_microbatch(self) -> None:
        """Cost the layout with `parallel.reduce_grads_every_microbatch` on (the parameters and activations
        are the same; FSDP no longer keeps the stage's gradients unsharded under the pipeline)."""
        self.cfg.parallel.reduce_grads_every_microbatch = self.dims.reduce_every_microbatch = True
        self._mem.clear()

    def ids(self, s: int, a: int, b: int) -> list[int]:
        """Layer ids of stage s on [a, b): decoder layers, then the MTP layers on the last stage."""
        return list(range(a, b)) + (list(range(self.L, self.L + self.D)) if s == self.S - 1 else [])

    def max_r(self, s: int, a: int, b: int) -> int:
        return len(self.ids(s, a, b))

    def time(self, s: int, a: int, b: int, r: int) -> float:
        ids = self.ids(s, a, b)
        t = sum(3 * self.fwd[i] for i in ids) + sum(self.rc_factor * self.fwd[i] for i in ids[:r])
        return t + (3 * self.head if s == self.S - 1 else 0.0)

    def mem(self, s: int, a: int, b: int, r: int) -> float:
        key = (s, a, b, r)
        if key not in self._mem:
            self._mem[key] = self.report(s, a, b, r)["peak_bytes"]
        return self._mem[key]

    def report(self, s: int, a: int, b: int, r: int) -> dict:
        """`dsv3 dryrun`'s rank report of stage s holding [a, b) with r recomputed layers."""
        from dsv3.tools.memory import assemble, expert_copy_bytes, optimizer_bytes

        ids = self.ids(s, a, b)
        first, last = s == 0, s == self.S - 1
        edge = self.edge["first" if first else "last" if last else "middle"]
        numel = edge[0] + sum(self.layer[i][0] for i in ids)
        linear = edge[1] + sum(self.layer[i][5] for i in ids)
        gathered = [self.layer[i][2] for i in ids]
        states = {"pp_stage": s, "stages": [s], "layers": list(range(a, b)), "mtp": last and self.D > 0, "params": numel,
                  "param_bytes": 4 * numel, "grad_bytes": 4 * numel,
                  "optimizer_bytes": optimizer_bytes(numel, edge[8] + sum(self.layer[i][7] for i in ids), self.state_bytes),
                  "fsdp_gathered_all": sum(gathered) + edge[2], "fsdp_gathered_max": max(gathered + [edge[4]]),
                  "fsdp_expert_gathered_max": max([0] + [self.layer[i][4] for i in ids]),
                  "fsdp_expert_gathered_all": sum(self.layer[i][4] for i in ids), "head_grad_bytes": edge[5],
                  "embed_grad_bytes": edge[6], "embed_grad_extra_bytes": edge[7],
                  "largest_param_bytes": max([edge[3]] + [self.layer[i][3] for i in ids]), "linear_weight_bytes": linear,
                  "expert_weight_bytes": max([0] + [self.layer[i][6] for i in ids])}
        act = self.profile.stage(list(range(a, b)), first, last, set(ids[:r]), self.dispatch,
                                 expert_copy_bytes(self.cfg, states))
        return assemble(self.cfg, self.dims, states, [act], self.imbalance)


def to_lists(costs: StageCosts, bounds: list[int], rec: list[int]) -> tuple[list[int], list[int]]:
    """(MindSpore offset, recompute counts): stage i holds L // S + offset[i] layers, the last one's
    count including its MTP layers (the seed's convention: [1 x 15, -1] for 61 + 1 on 16 stages)."""
    base = costs.L // costs.S
    counts = [bounds[i + 1] - bounds[i] for i in range(costs.S)]
    counts[-1] += costs.D
    return [c - base for c in counts], list(rec)


def current(costs: StageCosts, cfg) -> tuple[list[int], list[int]]:
    """The config's own cuts and recompute counts."""
    from dsv3.config.layout import stage_layers

    per = stage_layers(cfg.model, costs.S, cfg.parallel.pp_layer_offset)
    bounds = [p[0] for p in per] + [costs.L]
    if cfg.train.recompute == "none":
        rec = [0] * costs.S
    elif cfg.parallel.recompute_layers is None:
        rec = [costs.max_r(s, bounds[s], bounds[s + 1]) for s in range(costs.S)]
    else:
        rec = list(cfg.parallel.recompute_layers)
    return bounds, rec


def run(args: argparse.Namespace) -> int:
    import torch

    from dsv3.tools.dryrun import gib, load_layout, needed, progress, usable, write_json
    from dsv3.tools.plan import min_budget, plan

    cfg, device_memory, source = load_layout(args)
    torch.set_num_threads(1)
    budget = usable(device_memory, args.headroom)
    log = lambda m: progress(f"balance: {m}")
    costs = StageCosts(cfg, args.imbalance, log)
    before_b, before_r = current(costs, cfg)
    before = [(costs.time(s, before_b[s], before_b[s + 1], before_r[s]), costs.mem(s, before_b[s], before_b[s + 1], before_r[s]))
              for s in range(costs.S)]
    log(f"searching cuts of {costs.L} layers into {costs.S} stages x recompute counts")
    best = plan(costs.L, costs.S, costs.time, costs.mem, budget, costs.max_r)
    limit = f"{gib(budget)} GiB usable = {gib(device_memory)} GiB ({source}) less {args.headroom:.0%} headroom"
    synced = None
    if best is None and costs.dims.fsdp_no_sync:
        # FSDP's no-sync under the pipeline holds the stage's gradients unsharded: plan with them reduced every micro-batch
        unsynced = min_budget(costs.L, costs.S, costs.mem, costs.max_r)
        log("no plan fits with FSDP's no-sync gradients under the pipeline; searching with parallel.reduce_grads_every_microbatch")
        costs.reduce_every_microbatch()
        before = [(t, costs.mem(s, before_b[s], before_b[s + 1], before_r[s])) for s, (t, _) in enumerate(before)]
        best = plan(costs.L, costs.S, costs.time, costs.mem, budget, costs.max_r)
        synced = needed(unsynced, args.headroom) if best is not None else None
    out = {"device_memory_bytes": device_memory, "device_memory_source": source, "headroom": args.headroom,
           "usable_bytes": int(budget), "stages": costs.S, "reduce_grads_every_microbatch": costs.dims.reduce_every_microbatch,
           "before": {
               "offset": to_lists(costs, before_b, before_r)[0], "recompute": before_r,
               "stage_tflop": [t / 1e12 for t, _ in before], "stage_peak_bytes": [m for _, m in before]}}
    if best is None:
        least = min_budget(costs.L, costs.S, costs.mem, costs.max_r)
        need = needed(least, args.headroom)
        out.update(fits=False, min_device_memory_bytes=need)
        print(f"no plan fits {limit}: this layout needs at least {gib(need)} GiB per device ({gib(least)} GiB peak with "
              f"every stage recomputing all its layers, cut to balance memory, plus the headroom); add devices "
              f"(pipeline_stage, expert_parallel, model_parallel), use optimizer.state_dtype bfloat16, or shorten data.seq_length")
    else:
        if synced is not None:
            out["min_device_memory_bytes_without_reduce_every_microbatch"] = synced
            print(f"no plan fits {limit} with FSDP's no-sync gradients under the pipeline (torch's default: every stage's "
                  f"gradients held unsharded until the step's last backward; that needs at least {gib(synced)} GiB per "
                  f"device); this plan reduce-scatters every micro-batch's gradients (parallel.reduce_grads_every_microbatch: "
                  f"true, micro_batch_num x the reduce-scatter traffic)")
        print_plan(costs, cfg, best, before_b, before_r, before, budget, limit, out)
    if args.json:
        write_json(args.json, out)
    return 0


def why(costs: StageCosts, s: int, a: int, b: int, r: int, budget: float) -> dict:
    """Why stage s on [a, b) recomputes r layers, from the dry-run's peaks at r and r - 1 (and 0)
    against the usable memory (the planner takes each stage's smallest r that fits): a dict with the
    figures and its one `line`."""
    from dsv3.tools.dryrun import gib

    at = lambda k: costs.mem(s, a, b, k)
    d = {"stage": s, "recompute": r, "peak_bytes": at(r), "fewer_peak_bytes": at(r - 1) if r else None,
         "none_peak_bytes": at(0), "usable_bytes": budget}
    spare = f"{gib(budget - at(r))} GiB to spare"
    if r == 0:
        d["line"] = (f"stage {s}: recompute 0 layers because without recompute its peak, {gib(at(0))} GiB, is within "
                     f"the {gib(budget)} GiB usable ({spare})")
    else:
        fewer = f"; with none {gib(at(0))} GiB" if r > 1 else ""
        d["line"] = (f"stage {s}: recompute {r} layer{'s' if r > 1 else ''} because with {r - 1} its peak would be "
                     f"{gib(at(r - 1))} GiB, over the {gib(budget)} GiB usable by {gib(at(r - 1) - budget)} GiB{fewer}; "
                     f"with {r} it is {gib(at(r))} GiB ({spare})")
    return d


def print_plan(costs: StageCosts, cfg, best, before_b, before_r, before, budget: float, limit: str, out: dict) -> None:
    from dsv3.tools.dryrun import gib

    offset, rec = to_lists(costs, best.bounds, best.recompute)
    mode = cfg.train.recompute if cfg.train.recompute != "none" else "full"
    out.update(fits=True, offset=offset, recompute=rec, train_recompute=mode if any(rec) else "none",
               stage_tflop=[t / 1e12 for t in best.times], stage_peak_bytes=best.mems)
    cols = f"{'stage':>5}  {'layers':>9}  {'rc':>3}  {'TFLOP/mb':>9}  {'peak GiB':>8}  |  {'before: layers':>14}  {'rc':>3}  {'TFLOP/mb':>9}  {'peak GiB':>8}"
    print(cols)
    for s in range(costs.S):
        lay = f"{best.bounds[s]}-{best.bounds[s + 1] - 1}"
        blay = f"{before_b[s]}-{before_b[s + 1] - 1}"
        print(f"{s:>5}  {lay:>9}  {rec[s]:>3}  {best.times[s] / 1e12:>9.3f}  {gib(best.mems[s]):>8}  |  {blay:>14}  "
              f"{before_r[s]:>3}  {before[s][0] / 1e12:>9.3f}  {gib(before[s][1]):>8}")
    print(f"(layers: the stage's decoder layers, the last stage also holds the MTP block; rc: how many of its first "
          f"layers (MTP last) are recomputed ({mode}) in backward, MindSpore recompute_config.recompute; TFLOP/mb: "
          f"forward + backward + recompute per micro-batch per rank; peak GiB: the dry-run's peak of the stage)")
    out["why"] = [why(costs, s, best.bounds[s], best.bounds[s + 1], rec[s], budget) for s in range(costs.S)]
    for w in out["why"]:
        print(w["line"])
    slow_before = max(t for t, _ in before)
    fits_before = all(m <= budget for _, m in before)
    print(f"slowest stage {best.slowest / 1e12:.3f} TFLOP per micro-batch (before {slow_before / 1e12:.3f}, "
          f"{'fits' if fits_before else 'does NOT fit'}); every planned stage fits {limit}")
    print(f"MindSpore:  model.model_config.offset: {offset}    recompute_config.recompute: {rec}")
    sync = costs.dims.reduce_every_microbatch and not (cfg.parallel.reduce_grads_every_microbatch is True)
    print(f"dsv3 YAML:  parallel.pp_layer_offset: {offset}    parallel.recompute_layers: {rec}    "
          f"train.recompute: {out['train_recompute']}" + ("    parallel.reduce_grads_every_microbatch: true" if sync else ""))
    lst = lambda xs: "[" + ",".join(map(str, xs)) + "]"
    print(f"  --set 'parallel.pp_layer_offset={lst(offset)}' --set 'parallel.recompute_layers={lst(rec)}' "
          f"--set train.recompute={out['train_recompute']}" + (" --set parallel.reduce_grads_every_microbatch=true" if sync else ""))
