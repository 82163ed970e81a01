"""Export one training checkpoint (`RUN/checkpoint/step-N/`) as an HF model folder with the run's
tokenizer, e.g. to benchmark a run that is still going (a finished run exports `RUN/hf` itself).

    python bench/export_step.py runs/mtp/run1/checkpoint/step-150 /tmp/mtp-model
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step_dir", help="RUN/checkpoint/step-N (holds model.safetensors and config.resolved.yaml)")
    ap.add_argument("out", help="HF folder to write (config.json, model.safetensors, tokenizer files)")
    args = ap.parse_args(argv)
    from dsv3.checkpoint.save import save_pretrained
    from dsv3.config.train import load_run_config
    from dsv3.data.tokenizer import export_tokenizer
    from dsv3.model.transformer import Transformer
    from dsv3.train.checkpoint import load_checkpoint

    step = Path(args.step_dir)
    cfg = load_run_config(step / "config.resolved.yaml")
    model = Transformer(cfg.model)
    state = load_checkpoint(step, model)
    out = save_pretrained(model.eval(), args.out)
    print(export_tokenizer(out, cfg.data.tokenizer, cfg.model.vocab_size))
    print(f"step {state.get('step')} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
