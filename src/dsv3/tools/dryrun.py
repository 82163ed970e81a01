"""`dsv3 dryrun --config YAML [--set k=v ...] [--device-memory 64GB] [--json FILE]`: the memory of every
rank of a parallel layout, without devices or data.

Each pipeline rank's part is built by the trainer's own build path on the meta device under a fake
process group of the layout's size, and one micro-batch of its layers runs forward and backward on
fake tensors (`dsv3.tools.memory`). Printed per pipeline stage: parameters, fp32 weights and
gradients, AdamW state (in `optimizer.state_dtype`), activations of one micro-batch (configured
sequence length and recompute), micro-batches in flight for the schedule, MoE all-to-all buffers at a
stated imbalance, and the peak; then the largest rank and whether it fits `--device-memory`.
Exit 0 whether or not it fits; a layout that cannot exist is one line (exit 2).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from dsv3.errors import UserError

UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20,
         "G": 2**30, "GB": 2**30, "GIB": 2**30, "T": 2**40, "TB": 2**40, "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """'64GB' / '64GiB' / '80G' -> bytes (binary units: device memory is quoted so, a 64 GB HBM is 64 GiB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in UNITS:
        raise UserError(f"--device-memory {text!r}: expected a size such as 64GB, 80GiB or 24G")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="run YAML: ours or the seed's MindSpore pretrain_*.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set parallel.recompute_layers=[4,4,2,0] (repeatable)")
    p.add_argument("--device-memory", default="64GB", help="memory of one device (default 64GB, the seed's Ascend 910B)")
    p.add_argument("--imbalance", type=float, default=1.5,
                   help="MoE load on the busiest expert-parallel rank / the mean, for the all-to-all buffers (default 1.5)")
    p.add_argument("--cpu-attention", action="store_true",
                   help="attention as CPU kernels run it (scores kept when head sizes differ); default: a GPU's fused kernel")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON ('-' for stdout instead of the table)")


def report(cfg, device_memory: int, imbalance: float = 1.5, gpu_attention: bool = True) -> dict:
    """The dry-run report of `cfg` (the --json schema)."""
    from dsv3.parallel.dims import ParallelDims
    from dsv3.tools.memory import layout_memory

    dims = ParallelDims.from_config(cfg.parallel)
    ranks = layout_memory(cfg, imbalance, gpu_attention)
    peak = max(r["peak_bytes"] for r in ranks)
    return {"world_size": dims.world_size, "device_memory_bytes": device_memory, "micro_batch_num": dims.micro_batch_num,
            "schedule": dims.schedule if dims.pp > 1 else None, "seq_length": cfg.data.seq_length,
            "micro_batch_size": cfg.train.batch_size, "recompute": cfg.train.recompute,
            "recompute_layers": cfg.parallel.recompute_layers, "pp_layer_offset": cfg.parallel.pp_layer_offset,
            "optimizer_state_dtype": cfg.optimizer.state_dtype, "precision": cfg.train.precision,
            "model_params": sum(r["stage_params"] for r in ranks), "ranks": ranks, "max_peak_bytes": peak, "max_peak_rank": max(ranks, key=lambda r: r["peak_bytes"])["rank"],
            "fits": peak <= device_memory}


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
          f"recompute {rep['recompute']} {rep['recompute_layers'] or ''}; 'dispatch' MoE all-to-all at {rep['ranks'][0]['moe_imbalance']}x "
          f"the mean load; 'other' FSDP gathered weights, a gradient before its reduce, bf16 weight copies)", file=out)
    verdict = "fits" if rep["fits"] else "does NOT fit"
    print(f"largest rank {rep['max_peak_rank']}: peak {gib(rep['max_peak_bytes'])} GiB of {gib(rep['device_memory_bytes'])} GiB "
          f"-> {verdict} ({rep['world_size']} ranks; the stages hold {rep['model_params'] / 1e9:.1f}B parameters)", file=out)


def run(args: argparse.Namespace) -> int:
    import torch

    from dsv3.config.train import load_run_config

    cfg = load_run_config(args.config, args.overrides)
    torch.set_num_threads(1)
    if args.imbalance < 1:
        raise UserError(f"--imbalance {args.imbalance}: the busiest rank carries at least the mean load (>= 1)")
    rep = report(cfg, parse_bytes(args.device_memory), args.imbalance, not args.cpu_attention)
    if args.json == "-":
        print(json.dumps(rep, indent=1))
        return 0
    print_table(rep)
    if args.json:
        write_json(args.json, rep)
    return 0


def write_json(path: str, obj) -> None:
    """`--json FILE` of dryrun and balance: written under a temporary name, then renamed."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)
