"""The seed's 1024-device 671B layout (dp16 mp4 pp16 ep8, offset and recompute lists) built rank by
rank on the meta device under torch's fake process group, through the training build path
(`dsv3.tools.memory.rank_states`, what `dsv3 dryrun` builds each rank with): one rank
of every pipeline stage, whose stages together hold exactly the model's parameters (`dsv3 info`'s
671.0B + 11.6B MTP), none of it allocated. And `dsv3 train` of that YAML on this machine stops with
one line instead of trying to allocate it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = """
import json, sys
from dsv3.config.train import load_run_config
from dsv3.tools.memory import rank_states
cfg = load_run_config(sys.argv[1])
for r in range(0, 1024, 64):  # rank = (pp_rank x 16 + dp_rank) x 4 + tp_rank: one rank of each stage
    s = rank_states(cfg, r + 5)  # the fake group is re-created per rank
    print(json.dumps({k: s[k] for k in ("pp_stage", "layers", "mtp", "params", "param_bytes", "stage_params")}), flush=True)
"""


@pytest.fixture
def yaml_671b(data_dir):
    p = data_dir.parent / "mindformers-configs" / "pretrain_deepseek3_671b.yaml"
    if not p.is_file():
        pytest.skip(f"{p} not found")
    return p


def test_671b_layout_one_rank_per_stage(yaml_671b):
    from dsv3.config.layout import stage_layers
    from dsv3.config.train import load_run_config
    from dsv3.tools.info import account

    p = subprocess.run([sys.executable, "-c", SCRIPT, str(yaml_671b)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = [json.loads(line) for line in p.stdout.splitlines()]
    cfg = load_run_config(yaml_671b)
    assert [r["pp_stage"] for r in ranks] == list(range(16)) and cfg.layout().world_size == 1024
    assert [r["layers"] for r in ranks] == cfg.layout().stage_layers(cfg.model) == stage_layers(cfg.model, 16, [1] * 15 + [-1])
    assert [r["mtp"] for r in ranks] == [False] * 15 + [True]
    acc = account(cfg.model)
    assert sum(r["stage_params"] for r in ranks) == acc.total + acc.mtp  # 671.0B + 11.6B MTP, replicas counted once
    for r in ranks:  # each rank holds a shard of its stage: dense weights and shared experts split dp16 x tp4,
        # experts over ep8 x edp8, routers and MLA's low-rank down-projections over dp16 (replicated over tp)
        assert r["params"] < r["stage_params"] / 60
        assert r["param_bytes"] == 4 * r["params"]  # fp32 master weights


def test_train_671b_on_this_machine_says_how_many_processes(yaml_671b, tmp_path):
    p = subprocess.run([sys.executable, "-m", "dsv3", "train", "--config", str(yaml_671b), "--output-dir", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=300)
    lines = [line for line in p.stderr.strip().splitlines() if "ignored (MindSpore" not in line]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert "1024 processes" in lines[0] and "dsv3 dryrun" in lines[0] and "Traceback" not in p.stderr
