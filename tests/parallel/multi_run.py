"""Under torchrun: `multi_run.py OUT CONFIG.yaml ...` trains each config in turn with the shipped
trainer (`Trainer(load_run_config(path)).fit()`, what `dsv3 train` runs) in one process group, and
writes OUT/<config stem>.rank<R>.json with what this rank held (`held_parameters`) or the error."""

from __future__ import annotations

import json
import sys
from datetime import timedelta
import traceback
from pathlib import Path

import torch
import torch.distributed as dist


def main(out: Path, configs: list[str]) -> None:
    from dsv3.config.train import load_run_config
    from dsv3.parallel.build import held_parameters
    from dsv3.train.trainer import Trainer

    torch.set_num_threads(1)
    # created here, so each Trainer's strategy leaves it open; a rank left behind by another's error fails, not hangs
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank = dist.get_rank()
    for path in configs:
        try:
            trainer = Trainer(load_run_config(path))
            trainer.fit()
            held = held_parameters(trainer.strategy.dm)
            held.pop("names")
            result = {"ok": held}
            trainer.close()
        except Exception as e:  # recorded per config; the other configs still run
            result = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
        (out / f"{Path(path).stem}.rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
