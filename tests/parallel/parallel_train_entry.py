"""`python parallel_train_entry.py RUN.yaml [--resume]`: what `dsv3 train` runs under torchrun
(`dsv3.parallel.trainer.run_distributed`), started by `dsv3 launch` in test_parallel_train."""

import sys

from dsv3.config.train import load_run_config
from dsv3.parallel.trainer import run_distributed

if __name__ == "__main__":
    overrides = ["checkpoint.resume=true"] if "--resume" in sys.argv[2:] else []
    sys.exit(run_distributed(load_run_config(sys.argv[1], overrides)))
