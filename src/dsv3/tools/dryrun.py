"""`dsv3 dryrun --config YAML [--set k=v ...] [--device-memory 64GB] [--headroom 0.15] [--json FILE]`: the
memory of every rank of a parallel layout, without devices or data.

Each pipeline rank's part is built by the trainer's own build path on the meta device under a fake
process group of the layout's size, and one micro-batch of its layers runs forward and backward on
fake tensors (`dsv3.tools.memory`). Printed per pipeline stage: parameters, fp32 weights and
gradients, AdamW state (in `optimizer.state_dtype`), activations of one micro-batch (configured
sequence length and recompute), micro-batches in flight for the schedule, MoE all-to-all buffers at a
stated imbalance, and the peak; then the largest rank and whether it fits: within the device memory
less `--headroom` (default 15%: on the measured grid of `tests/tools/memory_cases.py`, tp / pp / ep / FSDP,
the 129k vocabulary, MTP, recompute on and off, the dry-run under-predicts a rank's peak by at most 8% (its
tested bound: 10%); the allocator's caching and communication buffers are not modelled). `--verbose`
prints what each stage's peak is made of (the JSON's `breakdown`, `peak_phase`). The device memory is `--device-memory`, else a
MindSpore YAML's `context.max_device_memory`, else 64 GB. Progress goes to stderr, one line per
pipeline rank. Exit 0 whether or not it fits; a layout that cannot exist is one line (exit 2).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

from dsv3.errors import UserError

UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20,
         "G": 2**30, "GB": 2**30, "GIB": 2**30, "T": 2**40, "TB": 2**40, "TIB": 2**40}


DEFAULT_DEVICE_MEMORY = "64GB"  # the seed's Ascend 910B
DEFAULT_HEADROOM = 0.15


def parse_bytes(text: str, what: str = "--device-memory") -> int:
    """'64GB' / '64GiB' / '80G' -> bytes (binary units: device memory is quoted so, a 64 GB HBM is 64 GiB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in UNITS:
        raise UserError(f"{what} {text!r}: expected a size such as 64GB, 80GiB or 24G")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def usable(device_memory: int, headroom: float) -> float:
    """Bytes a plan may use: the device memory less the headroom kept for what the dry-run misses."""
    return device_memory * (1 - headroom)


def needed(peak: float, headroom: float) -> int:
    """The smallest device memory whose usable part holds `peak` bytes."""
    n = math.ceil(peak / (1 - headroom))
    while usable(n, headroom) < peak:  # float rounding
        n += 1
    return n


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def add_layout_arguments(p: argparse.ArgumentParser) -> None:
    """The options dryrun and balance share."""
    p.add_argument("--config", required=True, help="run YAML: ours or the seed's MindSpore pretrain_*.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set parallel.recompute_layers=[4,4,2,0] (repeatable)")
    p.add_argument("--device-memory", default=None,
                   help=f"memory of one device (default: a MindSpore YAML's context.max_device_memory, else "
                        f"{DEFAULT_DEVICE_MEMORY}, the seed's Ascend 910B)")
    p.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM,
                   help=f"fraction of the device memory kept free (default {DEFAULT_HEADROOM}: the dry-run under-predicts "
                        f"measured peaks by up to 8%% (tested bound 10%%); allocator caching and communication buffers "
                        f"are not modelled)")
    p.add_argument("--imbalance", type=float, default=1.5,
                   help="MoE load on the busiest expert-parallel rank / the mean, for the all-to-all buffers (default 1.5)")
    p.add_argument("--verbose", action="store_true",
                   help="what each stage's peak is made of (dryrun), and every ignored MindSpore key (default: their count)")


def load_layout(args: argparse.Namespace):
    """(run config, device memory bytes, where that figure came from) of `--config`, `--set` and
    `--device-memory`; checks `--headroom` and `--imbalance`."""
    from dsv3.config.load import is_mindspore_yaml, read_yaml
    from dsv3.config.presets import resolve_preset
    from dsv3.config.train import run_config_from_dict

    if not 0 <= args.headroom < 1:
        raise UserError(f"--headroom {args.headroom}: expected a fraction of the device memory in [0, 1), e.g. 0.15")
    if args.imbalance < 1:
        raise UserError(f"--imbalance {args.imbalance}: the busiest rank carries at least the mean load (>= 1)")
    path = resolve_preset(args.config)
    data = read_yaml(path)
    memory, source = args.device_memory, "--device-memory"
    notes: list[str] = []
    if is_mindspore_yaml(data):
        from dsv3.config.mindspore import translate

        ctx = data.get("context")
        if memory is None and isinstance(ctx, dict) and ctx.get("max_device_memory") is not None:
            memory, source = ctx["max_device_memory"], "context.max_device_memory"
            memory = parse_bytes(memory, f"{path}: context.max_device_memory")
        data, notes = translate(data, str(path), list_ignored=args.verbose)
    if memory is None:
        memory, source = DEFAULT_DEVICE_MEMORY, "the default"
    cfg = run_config_from_dict(data, args.overrides, str(path), notes)
    for line in notes:
        print(line, file=sys.stderr)
    cfg.validate()
    return cfg, parse_bytes(memory) if isinstance(memory, str) else memory, source


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_layout_arguments(p)
    p.add_argument("--cpu-attention", action="store_true",
                   help="attention as CPU kernels run it (scores kept when head sizes differ); default: a GPU's fused kernel")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON ('-' for stdout instead of the table)")


def report(cfg, device_memory: int, imbalance: float = 1.5, gpu_attention: bool = True,
           headroom: float = DEFAULT_HEADROOM, log=None) -> dict:
    """The dry-run report of `cfg` (the --json schema); `log` gets one line per pipeline rank."""
    from dsv3.tools.memory import layout_memory

    dims = cfg.layout()
    ranks = layout_memory(cfg, imbalance, gpu_attention, log)
    peak = max(r["peak_bytes"] for r in ranks)
    return {"world_size": dims.world_size, "device_memory_bytes": device_memory, "micro_batch_num": dims.micro_batch_num,
            "schedule": dims.schedule if dims.pp > 1 else None, "seq_length": cfg.data.seq_length,
            "micro_batch_size": cfg.train.batch_size, "recompute": cfg.train.recompute,
            "recompute_layers": cfg.parallel.recompute_layers, "pp_layer_offset": cfg.parallel.pp_layer_offset,
            "optimizer_state_dtype": cfg.optimizer.state_dtype, "precision": cfg.train.precision,
            "reduce_grads_every_microbatch": dims.reduce_every_microbatch, "fsdp_no_sync": dims.fsdp_no_sync,
            "model_params": sum(r["stage_params"] for r in ranks), "ranks": ranks, "max_peak_bytes": peak, "max_peak_rank": max(ranks, key=lambda r: r["peak_bytes"])["rank"],
            "headroom": headroom, "usable_bytes": int(usable(device_memory, headroom)),
            "fits": peak <= usable(device_memory, headroom)}


def print_table(rep: dict, out=None) -> None:
    out = out or sys.stdout
    cols = ["stage", "ranks", "layers", "params", "weights", "grads", "optim", "act/mb", "mb", "dispatch", "other", "peak"]
    rows = []
    for r in rep["ranks"]:
        other = r["fsdp_buffer_bytes"] + r["grad_transient_bytes"] + r["autocast_cache_bytes"]
        lay = r["layers"]
        layers = (f"{lay[0]}-{lay[-1]}" if lay == list(range(lay[0], lay[-1] + 1)) else ",".join(map(str, lay))) if lay else "-"
        rows.append([",".join(map(str, r["stages"])), f"{r['rank']}+{r['represents']}", layers + ("+MTP" if r["mtp"] else ""),
                     f"{r['params'] / 1e9:.2f}B", gib(r["param_bytes"]), gib(r["grad_bytes"]), gib(r["optimizer_bytes"]),
                     gib(r["activation_bytes"]), str(r["micro_batches_in_flight"]), gib(r["moe_dispatch_bytes"]), gib(other),
                     gib(r["peak_bytes"])])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)), file=out)
    for row in rows:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)), file=out)
    print(f"(GiB; 'ranks' = first rank + how many ranks of that pipeline rank it stands for; 'mb' = micro-batches in flight "
          f"({rep['schedule'] or 'no pipeline'}); 'act/mb' one micro-batch, seq {rep['seq_length']} x {rep['micro_batch_size']}, "
          f"recompute {rep['recompute']} {rep['recompute_layers'] or ''}; 'dispatch' MoE all-to-all buffers at "
          f"{rep['ranks'][0]['moe_imbalance']}x the mean load when the peak is inside an MoE layer; 'other' FSDP gathered weights, "
          f"a gradient before its reduce, bf16 weight copies; the columns are not the whole peak: --verbose says what each "
          f"peak is made of{sync_note(rep)})", file=out)
    if rep["fits"]:
        verdict = "fits"
    elif rep["max_peak_bytes"] <= rep["device_memory_bytes"]:
        verdict = "does NOT fit within the headroom (use --headroom 0 to accept a plan without margin: the dry-run under-predicts by up to 10%)"
    else:
        verdict = "does NOT fit"
    print(f"largest rank {rep['max_peak_rank']}: peak {gib(rep['max_peak_bytes'])} GiB of {gib(rep['usable_bytes'])} GiB usable "
          f"= {gib(rep['device_memory_bytes'])} GiB ({rep.get('device_memory_source', '--device-memory')}) less "
          f"{rep['headroom']:.0%} headroom -> {verdict} ({rep['world_size']} ranks; the stages hold {rep['model_params'] / 1e9:.1f}B parameters)", file=out)


def sync_note(rep: dict) -> str:
    """How FSDP reduces gradients under the pipeline, for the table's legend."""
    if rep.get("fsdp_no_sync"):
        return ("; FSDP keeps the stage's gradients unsharded until the step's last backward (torch's no-sync under PP; "
                "parallel.reduce_grads_every_microbatch: true reduce-scatters every micro-batch instead)")
    if rep.get("reduce_grads_every_microbatch"):
        return "; FSDP reduce-scatters every micro-batch's gradients (parallel.reduce_grads_every_microbatch)"
    return ""


PARTS = {"weights": "fp32 weights", "optimizer": "AdamW moments", "fsdp_gathered_weights": "FSDP-gathered weights",
         "gradients": "gradients", "activations": "activations in flight", "logits": "logits + loss (whole on every tp rank)",
         "gradient_transient": "a gradient being formed", "autocast_cache": "bf16 weight copies",
         "moe_dispatch": "MoE all-to-all buffers", "unsharded_gradients": "unsharded gradients (FSDP no-sync under PP)",
         "sharded_gradients": "sharded gradients", "reduce_scatter_input": "one unit's reduce-scatter input"}


def print_breakdown(rep: dict, out=None) -> None:
    """`--verbose`: each stage's peak as the sum of what is alive at that moment (the JSON's `breakdown`)."""
    out = out or sys.stdout
    for r in rep["ranks"]:
        parts = " + ".join(f"{PARTS[k]} {gib(v)}" for k, v in r["breakdown"].items() if v)
        print(f"stage {','.join(map(str, r['stages']))} (rank {r['rank']}): peak {gib(r['peak_bytes'])} GiB during the "
              f"{r['peak_phase']} = {parts}", file=out)


def run(args: argparse.Namespace) -> int:
    import torch

    cfg, memory, source = load_layout(args)
    torch.set_num_threads(1)
    rep = report(cfg, memory, args.imbalance, not args.cpu_attention, args.headroom, lambda m: progress(f"dryrun: {m}"))
    rep["device_memory_source"] = source
    if args.json == "-":
        print(json.dumps(rep, indent=1))
        return 0
    print_table(rep)
    if args.verbose:
        print_breakdown(rep)
    if args.json:
        write_json(args.json, rep)
    return 0


def write_json(path: str, obj) -> None:
    """`--json FILE` of dryrun and balance: written under a temporary name, then renamed."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)
