"""DualPipeV's compute / all-to-all overlap (`dsv3.parallel.overlap`) on 4 CPU processes (gloo), ep2 x pp2:
the shipped trainer with `parallel.dualpipe_overlap` off and on (the default) logs bit-identical losses,
and with it on every rank really ran its OVERLAP_F_B actions as two threads taking turns. Run under
torchrun, this file is the worker (`python -m torch.distributed.run --nproc-per-node 4 THIS OUT CFG...`)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
LAYOUT = {"data_parallel": 2, "expert_parallel": 2, "pipeline_stage": 2, "micro_batch_num": 4,
          "pipeline_schedule": "DualPipeV"}
STEPS = 3


def _worker(out: Path, configs: list[str]) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from dsv3.config.train import load_run_config
    from dsv3.parallel import overlap
    from dsv3.train.trainer import Trainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    for path in configs:
        before = dict(overlap.STATS)
        t0 = time.perf_counter()
        trainer = Trainer(load_run_config(path), quiet=True)
        trainer.fit()
        trainer.close()
        stats = {k: overlap.STATS[k] - before[k] for k in before}
        (out / f"{Path(path).stem}.rank{dist.get_rank()}.json").write_text(
            json.dumps({**stats, "seconds": time.perf_counter() - t0}))
        dist.barrier()
    dist.destroy_process_group()


def test_overlap_is_bit_identical_and_runs(tmp_path):
    sys.path.insert(0, str(HERE))
    from parallel_harness import _run, free_port, losses, run_cfg, write_dataset

    from dsv3.config.load import dump_yaml

    prefix = write_dataset(tmp_path)
    configs = []
    for name, switch in (("off", False), ("on", None)):
        cfg = run_cfg(prefix, tmp_path / name, {**LAYOUT, "dualpipe_overlap": switch}, steps=STEPS, batch_size=1,
                      save=False, eval_steps=STEPS, aux_loss_alpha=1e-3, num_hidden_layers=8)  # an MoE per stage
        configs.append(tmp_path / f"{name}.yaml")
        dump_yaml(cfg, configs[-1])
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port", str(free_port()),
          __file__, str(tmp_path), *map(str, configs)], "torchrun dualpipe")
    off, on = losses(tmp_path / "off"), losses(tmp_path / "on")
    assert len(off) == STEPS and on == off, (on, off)  # bit-identical, not merely close
    for r in range(4):
        s_off = json.loads((tmp_path / f"off.rank{r}.json").read_text())
        s_on = json.loads((tmp_path / f"on.rank{r}.json").read_text())
        assert s_off["actions"] == 0 and s_on["actions"] > 0 and s_on["turns"] > 0, (r, s_off, s_on)


@pytest.mark.parametrize("change, why", [
    ({"pipeline_schedule": "1F1B", "micro_batch_num": 2}, "only DualPipeV with expert_parallel > 1"),
    ({"expert_parallel": 1}, "only DualPipeV with expert_parallel > 1"),
    ({"model_parallel": 2, "data_parallel": 1}, "tensor parallelism runs its own collectives"),
    ({"data_parallel": 4}, "FSDP-sharded experts all-gather inside the chunks"),
    ({"dp_shard": "ddp"}, "DDP reduces gradients inside the last backward"),
])
def test_required_overlap_on_a_layout_without_it_is_one_line(change, why):
    """`dualpipe_overlap: true` where other collectives would share the chunks: refused before any process starts."""
    from dsv3.errors import UserError
    from dsv3.parallel.dims import ParallelDims

    layout = {**LAYOUT, **change, "dualpipe_overlap": True}
    dims = ParallelDims.from_config(layout)
    with pytest.raises(UserError, match=f"parallel.dualpipe_overlap = true: {why}"):
        dims.validate(dims.world_size)
    ParallelDims.from_config({**layout, "dualpipe_overlap": None}).validate(dims.world_size)  # the default: off there


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2:])
