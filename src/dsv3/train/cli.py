"""`dsv3 train --config FILE.yaml [--set k=v ...] [--resume]`: pretraining, in one process or (under
torchrun / `dsv3 launch`, WORLD_SIZE > 1) as one rank of the `parallel` layout (docs/distributed.md).

FILE is our run YAML (`configs/pretrain_*.yaml`) or the seed's MindSpore YAML (translated by
`dsv3.config.mindspore`; keys that only mean something on Ascend are listed once as ignored). A YAML
with a `grpo:` section (`configs/grpo_tiny.yaml`) runs the GRPO recipe instead (`dsv3.rl`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from dsv3.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="run YAML: ours (configs/pretrain_*.yaml) or a MindSpore pretrain_*.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=10 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in checkpoint.output_dir")
    p.add_argument("--output-dir", default=None, help="shortcut for --set checkpoint.output_dir=DIR")
    p.add_argument("--dump-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (or its directory) for SFT .json/.jsonl data; "
                   "shortcut for --set data.tokenizer=PATH (default: the train.init_from directory's)")
    p.add_argument("--report-memory", metavar="DIR", default=None,
                   help="measure tensor memory (peak bytes alive, per device) and peak RSS of the run; each rank writes "
                        "DIR/memory-rank{RANK}.json (slows every operator: for checking `dsv3 dryrun`, not for long runs)")


def run(args: argparse.Namespace) -> int:
    from dsv3.config.load import read_yaml
    from dsv3.config.presets import resolve_preset
    from dsv3.config.train import load_run_config
    from dsv3.rl.config import is_grpo_yaml

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"checkpoint.output_dir={args.output_dir}")
    if args.resume:
        overrides.append("checkpoint.resume=true")
    if args.tokenizer:
        overrides.append(f"data.tokenizer={args.tokenizer}")
    path = resolve_preset(args.config)
    if is_grpo_yaml(read_yaml(path)):  # a GRPO run (`dsv3.rl`): its own loop, the same checkpoint and metrics formats
        from dsv3.rl.loop import run_grpo

        if args.report_memory:
            raise UserError("--report-memory measures pretraining runs, not a GRPO run")
        return run_grpo(path, overrides, args.dump_config)
    notes: list[str] = []
    cfg = load_run_config(args.config, overrides, notes)
    for line in notes:  # what reading a MindSpore YAML changed or skipped
        print(line, file=sys.stderr)
    if args.dump_config:
        import yaml

        from dsv3.config.load import to_dict

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    if args.report_memory:
        from dsv3.tools.memtrack import report_memory

        with report_memory(args.report_memory):
            return _train(cfg)
    return _train(cfg)


def _train(cfg) -> int:
    from dsv3.train.trainer import Trainer, check_fits_one_process, resolve_device

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not distributed:
        check_fits_one_process(cfg, resolve_device(cfg.train.device))  # before any allocation
        p = cfg.parallel
        if p.data_parallel > 1 or any(v > 1 for v in (p.model_parallel, p.pipeline_stage, p.expert_parallel)):
            print(f"dsv3 train: one process: parallel sizes (dp {p.data_parallel}, mp {p.model_parallel}, pp {p.pipeline_stage}, "
                  f"ep {p.expert_parallel}) are not applied; the global batch is kept by accumulating "
                  f"{cfg.micro_batches_per_step()} micro-batches per step (use `dsv3 launch` for several processes)", file=sys.stderr)
    trainer = None
    try:
        trainer = Trainer(cfg)
        summary = trainer.fit()
    except MemoryError:
        raise UserError("out of memory: lower train.batch_size or data.seq_length, or use a smaller model") from None
    finally:
        if trainer is not None:
            trainer.close()
    if trainer.strategy.is_main:
        print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, list)}))
    return 0
