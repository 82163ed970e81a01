"""Worker script for test_parallel_launch: the seed's 8-device layout (dp2 mp2 pp2 ep2,
micro_batch_num 4) on the tiny model for STEPS steps, started by `dsv3 launch`. As in the seed, the
ranks of the last pipeline stage print the loss."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from dsv3.parallel import ParallelDims, build_meshes, build_optimizer, init_distributed, parallelize, train_step  # noqa: E402
from parallel_harness import GAMMA, LR, batches, make_model, tiny_cfg  # noqa: E402

SEED_LAYOUT = {"data_parallel": 2, "model_parallel": 2, "pipeline_stage": 2, "expert_parallel": 2, "micro_batch_num": 4,
               "use_seq_parallel": True}

if __name__ == "__main__":
    import faulthandler

    faulthandler.dump_traceback_later(float(os.environ.get("DSV3_TEST_HANG_S", "250")), exit=False)  # a hang prints stacks
    torch.set_num_threads(1)
    init_distributed("cpu")
    cfg = tiny_cfg()
    dims = ParallelDims.from_config(SEED_LAYOUT)
    meshes = build_meshes(dims, "cpu", cfg)
    dm = parallelize(make_model(cfg), dims, meshes)
    opt = build_optimizer(dm, lr=LR)
    last = meshes.pp_rank == dims.pp - 1
    for step, w in enumerate(batches(cfg), start=1):
        loss = train_step(dm, opt, w, bias_gamma=GAMMA)
        print(json.dumps({"step": step, "loss": loss if last else 0.0}), flush=True)
