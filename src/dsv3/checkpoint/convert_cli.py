"""`dsv3 convert` command line: arguments only, so `--help` and argument errors never import torch.
The work is `dsv3.checkpoint.convert.convert` (module docstring there: layouts, FP8, quantisation)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", nargs="?", help="checkpoint directory (config.json + safetensors: HF hub, FP8, transformers v5 or dsv3 layout), or a training checkpoint OUTPUT/checkpoint/step-N (one process or DCP from dsv3 launch)")
    p.add_argument("dst", nargs="?", help="output directory (must not exist or be empty)")
    seed = p.add_argument_group("the seed's fp8_cast_bf16.py names (MindFormers research/deepseek3)")
    seed.add_argument("--input-fp8-hf-path", dest="src_alias", metavar="SRC", help="= SRC")
    seed.add_argument("--output-bf16-hf-path", dest="dst_alias", metavar="DST", help="= DST, written in bfloat16 (unless --dtype)")
    p.add_argument("--to", choices=["hf", "dsv3", "fp8"], default="hf",
                   help="output layout: HF hub per-expert names (default), dsv3 stacked, or fp8 (HF layout in DeepSeek's FP8 "
                        "format: e4m3 weights with 128x128 block scales, as the published checkpoints)")
    p.add_argument("--quantize", choices=["fp8", "w8a8", "int8"], default=None,
                   help="write quantised weights (HF layout): fp8 = --to fp8; w8a8 / int8: int8 per output channel")
    p.add_argument("--scale-fmt", choices=["float", "ue8m0"], default="float",
                   help="FP8 block scales: any fp32 value (V3, default) or ue8m0 = rounded up to powers of two "
                        "(DeepSeek-V3.1's quantization_config.scale_fmt)")
    p.add_argument("--dtype", default=None, help="output dtype: bfloat16 | float32 | float16 | keep (default: keep; FP8 -> bfloat16)")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB, 500MB (default 5GB)")


def _paths(args: argparse.Namespace) -> tuple[str, str, str | None]:
    """(src, dst, dtype) from the positionals or the seed's flag names (one of each, not both)."""
    from dsv3.errors import UserError

    out = []
    for pos, alias, flag, what in ((args.src, args.src_alias, "--input-fp8-hf-path", "SRC"),
                                   (args.dst, args.dst_alias, "--output-bf16-hf-path", "DST")):
        if pos is not None and alias is not None:
            raise UserError(f"{what} given twice: {pos!r} and {flag} {alias!r}; give one")
        if pos is None and alias is None:
            raise UserError(f"give {what} (dsv3 convert SRC DST, or the seed's --input-fp8-hf-path SRC --output-bf16-hf-path DST)")
        out.append(pos if pos is not None else alias)
    dtype = args.dtype if args.dtype is not None or args.dst_alias is None else "bfloat16"
    return out[0], out[1], dtype


def run(args: argparse.Namespace) -> int:
    from dsv3.checkpoint.convert import convert

    src, dst, dtype = _paths(args)
    result = convert(src, dst, to=args.to, dtype=dtype, max_shard_size=args.max_shard_size, quantize=args.quantize,
                     scale_fmt=None if args.scale_fmt == "float" else args.scale_fmt)
    print(result.describe())
    return 0
