"""Shared experts and the router are sharded in training, not replicated on every dp x tp rank.

Each rank's part is built by the trainer's build path (`build_parallel_model`) on the meta device
under torch's fake process group (as `dsv3.tools.memory.rank_states` builds it), in a subprocess, and every MoE
parameter's placement is read back: the shared experts split over tp like the dense MLP (gate/up
column-parallel, down row-parallel) and FSDP-sharded over dp, the router FSDP-sharded over dp in
fp32 with its `e_score_correction_bias` kept whole. On the seed's 671B layout the stage-1 rank's
four MoE layers shrink from 183.5M replicated parameters to their 1/64 (shared) and 1/16 (router)
shards. The losses of the same layouts equal one process's in `test_parallel_equivalence`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dsv3.config.load import dump_yaml
from parallel_harness import run_cfg

SCRIPT = """
import json, sys
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.testing._internal.distributed.fake_pg import FakeStore
from dsv3.config.train import load_run_config
from dsv3.parallel.build import build_parallel_model
from dsv3.parallel.dims import build_meshes
cfg = load_run_config(sys.argv[1])
dims = cfg.layout()
dist.init_process_group("fake", store=FakeStore(), rank=int(sys.argv[2]), world_size=dims.world_size)
meshes = build_meshes(dims, "cpu", cfg.model)
dm = build_parallel_model(cfg.model, dims, meshes, 0, device=None)
out = {}
for part in dm.parts:
    for name, t in [*part.named_parameters(), *part.named_buffers()]:
        if ".mlp." not in name or ".experts." in name:
            continue
        d = isinstance(t, DTensor)
        out[name] = {"shape": list(t.shape), "local": list(t.to_local().shape if d else t.shape), "dtype": str(t.dtype),
                     "mesh": list(t.device_mesh.mesh_dim_names) if d else None,
                     "placements": [repr(p) for p in t.placements] if d else None}
print(json.dumps(out))
"""

RANK_STATES = """
import json, sys
from dsv3.config.train import load_run_config
from dsv3.tools.memory import rank_states
s = rank_states(load_run_config(sys.argv[1]), int(sys.argv[2]))
print(json.dumps({k: s[k] for k in ("layers", "params", "stage_params")}))
"""


def moe_placements(cfg_path, rank: int) -> dict:
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(cfg_path), str(rank)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.splitlines()[-1])


def test_tp2_dp2_shared_experts_and_router_placements(tmp_path):
    """dp2 x tp2 (x ep2): the shared experts are [dp, tp] DTensors holding a quarter each, split as the
    dense MLP is; the router weight is Shard(0) over dp in fp32; the bias buffer stays whole."""
    cfg = run_cfg(str(tmp_path / "never_read"), tmp_path / "out",
                  {"data_parallel": 2, "model_parallel": 2, "expert_parallel": 2, "micro_batch_num": 2})
    dump_yaml(cfg, tmp_path / "c.yaml")
    got = moe_placements(tmp_path / "c.yaml", 3)
    mc = cfg.model
    moe_layers = [i for i in range(mc.num_hidden_layers) if mc.is_moe_layer(i)]
    E, D, I = mc.n_routed_experts, mc.hidden_size, mc.moe_intermediate_size * mc.n_shared_experts
    assert moe_layers and all(f"model.layers.{i}.mlp.gate.weight" in got for i in moe_layers)
    for i in moe_layers:
        pre = f"model.layers.{i}.mlp"
        for proj, split in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            w = got[f"{pre}.shared_experts.{proj}.weight"]
            assert w["mesh"] == ["dp", "tp"] and w["shape"] == ([I, D] if split == 0 else [D, I]), (proj, w)
            assert w["placements"][1] == f"Shard(dim={split})", (proj, w)  # column- / row-parallel over tp
            local = w["shape"].copy()
            local[split] //= 2  # tp
            local[0] //= 2  # FSDP's dim 0 over dp
            assert w["local"] == local, (proj, w)
        g = got[f"{pre}.gate.weight"]
        assert g == {"shape": [E, D], "local": [E // 2, D], "dtype": "torch.float32", "mesh": ["dp"],
                     "placements": ["Shard(dim=0)"]}, g
        b = got[f"{pre}.gate.e_score_correction_bias"]
        assert b["mesh"] is None and b["local"] == [E] and b["dtype"] == "torch.float32", b


def test_671b_stage1_rank_holds_shards_of_shared_experts_and_router(data_dir):
    """The seed's dp16 mp4 pp16 ep8 layout, a rank of pipeline stage 1 (layers 4-7, all MoE): its shared
    experts (4 x 44.0M) are 1/64 shards (dp16 x tp4), its routers (4 x 1.8M) 1/16 (dp16): 3.2M where
    183.5M were replicated, and `dsv3.tools.memory.rank_states`'s count of the rank drops by that."""
    yaml = data_dir.parent / "mindformers-configs" / "pretrain_deepseek3_671b.yaml"
    if not yaml.is_file():
        pytest.skip(f"{yaml} not found")
    rank = 64 + 5  # (pp 1 x dp16 + dp 1) x tp4 + tp 1
    got = moe_placements(yaml, rank)
    numel = lambda s: s[0] * s[1] if len(s) == 2 else s[0]
    full = {n: numel(v["shape"]) for n, v in got.items() if n.endswith(".weight")}
    held = {n: numel(v["local"]) for n, v in got.items() if n.endswith(".weight")}
    shared = [n for n in full if ".shared_experts." in n]
    router = [n for n in full if n.endswith(".gate.weight")]
    assert len(shared) == 12 and len(router) == 4 and len(full) == 16
    assert sum(full[n] for n in shared) + sum(full[n] for n in router) == 183_500_800  # 4 x (3 x 7168 x 2048 + 256 x 7168)
    assert all(held[n] * 64 == full[n] for n in shared) and all(held[n] * 16 == full[n] for n in router)
    assert all(got[n]["dtype"] == "torch.float32" for n in router)
    p = subprocess.run([sys.executable, "-c", RANK_STATES, str(yaml), str(rank)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.splitlines()[-1])
    assert r["layers"] == [4, 5, 6, 7]
    # every other parameter of the stage as before: split 64 ways, except the low-rank MLA down-projections
    # and norms, replicated over tp (FSDP over dp16 only)
    attn_rep = 4 * (7168 * 1536 + 7168 * 576 + 1536 + 512 + 2 * 7168)
    rest = r["stage_params"] - sum(full.values()) - attn_rep
    assert r["params"] == rest // 64 + attn_rep // 16 + sum(held.values()), r
