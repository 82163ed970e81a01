"""`dsv3 dryrun` and `dsv3 balance` through the CLI, on a small layout built under the fake process
group (no data files, no devices), and on the seed's 671B YAML (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dsv3.cli import main
from memory_cases import MODEL

SEED_YAML = Path(__file__).resolve().parents[2].parent / "shared" / "mindformers-configs" / "pretrain_deepseek3_671b.yaml"
KEYS = {"rank", "pp_stage", "tp_rank", "ep_rank", "dp_rank", "layers", "params", "param_bytes", "grad_bytes",
        "optimizer_bytes", "activation_bytes", "peak_bytes"}


def write_cfg(tmp: Path, **parallel) -> Path:
    par = {"data_parallel": 2, "pipeline_stage": 4, "expert_parallel": 2, "micro_batch_num": 8, **parallel}
    model = {**MODEL, "num_hidden_layers": 8}
    d = {"model": model, "data": {"data_path": ["/nonexistent/never_read_text_document"], "seq_length": 128},
         "train": {"batch_size": 2, "recompute": "full"}, "optimizer": {"state_dtype": "bfloat16"}, "parallel": par}
    p = tmp / "layout.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def dryrun(capsys, *args) -> tuple[int, str, str]:
    rc = main(["dryrun", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_dryrun_table_json_and_parameter_total(tmp_path, capsys):
    from dsv3.config.train import load_run_config
    from dsv3.tools.info import account

    cfg_path = write_cfg(tmp_path)
    rc, out, _ = dryrun(capsys, "--config", str(cfg_path), "--json", str(tmp_path / "r.json"), "--device-memory", "1GB")
    assert rc == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["world_size"] == 8 and len(rep["ranks"]) == 4 and isinstance(rep["fits"], bool)
    for r in rep["ranks"]:
        assert KEYS <= set(r), KEYS - set(r)
        assert 0 <= r["optimizer_bytes"] - 2 * 2 * r["params"] < 4 * 1000  # two bf16 moments (+ a step scalar per tensor)
        assert r["peak_bytes"] > r["param_bytes"] + r["optimizer_bytes"]
    assert rep["max_peak_bytes"] == max(r["peak_bytes"] for r in rep["ranks"])
    acc = account(load_run_config(str(cfg_path)).model, 128)
    assert rep["model_params"] == acc.total + acc.mtp  # every stage's parameters, counted once
    assert [r["micro_batches_in_flight"] for r in rep["ranks"]] == [4, 3, 2, 1]  # 1F1B
    assert "stage" in out and ("fits" in out.splitlines()[-1])
    # recompute off: every stage keeps more activations
    rc, _, _ = dryrun(capsys, "--config", str(cfg_path), "--set", "train.recompute=none", "--json", str(tmp_path / "n.json"))
    none = json.loads((tmp_path / "n.json").read_text())
    assert all(a["activation_bytes"] > b["activation_bytes"] for a, b in zip(none["ranks"], rep["ranks"]))


def test_impossible_layout_is_one_line(tmp_path):
    cfg_path = write_cfg(tmp_path, expert_parallel=3)
    proc = subprocess.run([sys.executable, "-m", "dsv3", "dryrun", "--config", str(cfg_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "expert_parallel" in proc.stderr


def test_reduce_every_microbatch_drops_the_unsharded_gradients(tmp_path, capsys):
    """parallel.reduce_grads_every_microbatch (FSDP under PP): no stage holds its unsharded gradients
    (no final reduce-scatter moment) and the last stage, whose gradients are the most units (its
    layers, MTP, head), peaks lower (131.3 -> 125.4 MiB; a stage of few units can peak higher: its
    largest unit's reduce-scatter copies come at every micro-batch, as measured in `memory_cases`);
    the JSON says which; the key on a layout without a pipeline, or with a split-backward schedule, is
    one line."""
    cfg_path = str(write_cfg(tmp_path, pipeline_stage=2, micro_batch_num=4))
    on = ["--set", "parallel.reduce_grads_every_microbatch=true"]
    reps = []
    for extra in ([], on):
        assert dryrun(capsys, "--config", cfg_path, "--json", str(tmp_path / "r.json"), *extra)[0] == 0
        reps.append(json.loads((tmp_path / "r.json").read_text()))
    nosync, sync = reps
    assert nosync["fsdp_no_sync"] and not nosync["reduce_grads_every_microbatch"]
    assert sync["reduce_grads_every_microbatch"] and not sync["fsdp_no_sync"]
    for a, b in zip(nosync["ranks"], sync["ranks"]):
        assert b["unsharded_grad_bytes"] == 0 < a["unsharded_grad_bytes"] and "unsharded_gradients" not in b["breakdown"]
        assert sum(b["breakdown"].values()) == b["peak_bytes"]
    assert sync["ranks"][-1]["peak_bytes"] < nosync["ranks"][-1]["peak_bytes"]
    for bad, word in ((["parallel.pipeline_stage=1", "parallel.micro_batch_num=1"], "pipeline_stage"),
                      (["parallel.pipeline_schedule=ZBVZeroBubble"], "ZBVZeroBubble")):
        rc, _, err = dryrun(capsys, "--config", cfg_path, *on, *[a for b in bad for a in ("--set", b)])
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert "reduce_grads_every_microbatch" in err and word in err


def test_stage_pieces_add_up_to_the_stage_run(tmp_path):
    """The per-piece profile (what balance sums) equals one forward/backward of the whole stage."""
    from dsv3.config.train import load_run_config
    from dsv3.tools.activations import ActivationProfile, stage_activation

    cfg = load_run_config(str(write_cfg(tmp_path)))
    prof = ActivationProfile(cfg)
    for ids, first, last, rc in (([0, 1, 2], True, False, {0}), ([3, 4], False, False, {3}), ([6, 7], False, True, {6, 8})):
        whole = stage_activation(cfg, ids, first, last, rc, "logits")
        parts = prof.stage(ids, first, last, rc)
        assert abs(parts.act_bytes - whole.act_bytes) <= 0.02 * whole.act_bytes, (ids, parts, whole)
        assert abs(parts.fwd_bwd_peak - whole.fwd_bwd_peak) <= 0.1 * whole.fwd_bwd_peak, (ids, parts, whole)


def test_balance_plan_is_confirmed_by_dryrun(tmp_path, capsys):
    from dsv3.config.train import load_run_config
    from dsv3.tools.dryrun import report

    cfg_path = write_cfg(tmp_path, pp_layer_offset=[1, 0, 0, -1], recompute_layers=[3, 2, 2, 0])
    rc = main(["balance", "--config", str(cfg_path), "--device-memory", "1GB", "--json", str(tmp_path / "plan.json")])
    out = capsys.readouterr().out
    assert rc == 0 and "recompute_config.recompute" in out
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["fits"] and max(plan["stage_tflop"]) <= max(plan["before"]["stage_tflop"]) + 1e-12
    cfg = load_run_config(str(cfg_path), [f"parallel.pp_layer_offset={plan['offset']}",
                                          f"parallel.recompute_layers={plan['recompute']}", f"train.recompute={plan['train_recompute']}"])
    rep = report(cfg, plan["device_memory_bytes"])
    assert rep["fits"]
    for r, m in zip(rep["ranks"], plan["stage_peak_bytes"]):
        assert abs(r["peak_bytes"] - m) <= 0.01 * m
    # a budget below the least any plan needs: the answer names it
    rc = main(["balance", "--config", str(cfg_path), "--device-memory", "1MB", "--json", str(tmp_path / "no.json")])
    out = capsys.readouterr().out
    no = json.loads((tmp_path / "no.json").read_text())
    assert rc == 0 and not no["fits"] and "needs at least" in out and no["min_device_memory_bytes"] > 2**20
    rc = main(["balance", "--config", str(cfg_path), "--device-memory", f"{no['min_device_memory_bytes']}B", "--json", str(tmp_path / "ok.json")])
    capsys.readouterr()
    assert json.loads((tmp_path / "ok.json").read_text())["fits"]


@pytest.mark.slow
@pytest.mark.extended  # ~2 min; tests/tools/test_headroom.py dry-runs the seed YAML in the default run
def test_seed_671b_dryrun_and_balance(tmp_path, capsys):
    if not SEED_YAML.is_file():
        pytest.skip(f"{SEED_YAML} not found")
    rc, out, _ = dryrun(capsys, "--config", str(SEED_YAML), "--json", str(tmp_path / "seed.json"))
    rep = json.loads((tmp_path / "seed.json").read_text())
    assert rc == 0 and rep["world_size"] == 1024 and len(rep["ranks"]) == 16
    assert rep["device_memory_bytes"] == 55 * 2**30  # the YAML's context.max_device_memory
    assert abs(rep["model_params"] / 1e9 - (671.0 + 11.6)) < 0.6
    assert rep["recompute_layers"] == [3, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 3, 2, 0]
    # routed experts FSDP-sharded over edp = 8, shared experts over dp16 x tp4 and routers over dp16: a
    # 4-MoE-layer rank holds 0.72B parameters (0.90B with them replicated). Under torch's pipeline
    # schedules FSDP keeps every gradient unsharded until the step's last backward (no-sync: 23 GiB on a
    # 4-MoE-layer rank), so the seed's own lists do not fit its 55 GB with the dry-run's headroom
    assert not rep["fits"]
    stage1 = rep["ranks"][1]
    assert 50 * 2**30 < stage1["peak_bytes"] < 56 * 2**30 and stage1["unsharded_grad_bytes"] > 20 * 2**30
    assert max(r["params"] for r in rep["ranks"]) < 0.75e9
    # reduce-scattering every micro-batch's gradients (MindSpore's and Megatron's way) shrinks that rank by > 14 GiB
    on = ["--set", "parallel.reduce_grads_every_microbatch=true"]
    dryrun(capsys, "--config", str(SEED_YAML), *on, "--json", str(tmp_path / "sync.json"))
    sync1 = json.loads((tmp_path / "sync.json").read_text())["ranks"][1]
    assert sync1["unsharded_grad_bytes"] == 0 and stage1["peak_bytes"] - sync1["peak_bytes"] > 14 * 2**30
    # balance at the YAML's 55 GB: no plan without it, a plan with it, which dryrun confirms
    rc = main(["balance", "--config", str(SEED_YAML), "--json", str(tmp_path / "b.json")])
    out = capsys.readouterr().out
    b = json.loads((tmp_path / "b.json").read_text())
    assert rc == 0 and b["fits"] and b["reduce_grads_every_microbatch"] and "reduce_grads_every_microbatch=true" in out
    assert b["min_device_memory_bytes_without_reduce_every_microbatch"] > 55 * 2**30
    rc, _, _ = dryrun(capsys, "--config", str(SEED_YAML), *on, "--set", f"parallel.pp_layer_offset={b['offset']}",
                      "--set", f"parallel.recompute_layers={b['recompute']}", "--json", str(tmp_path / "check.json"))
    assert json.loads((tmp_path / "check.json").read_text())["fits"]


def test_one_rank_stands_for_its_pipeline_rank(tmp_path):
    """Every dp x tp x ep position of a pipeline rank holds the same bytes as the one the dry-run builds."""
    from dsv3.config.train import load_run_config
    from dsv3.parallel.dims import ParallelDims
    from dsv3.tools.memory import rank_states, representative_ranks

    cfg = load_run_config(str(write_cfg(tmp_path, model_parallel=2, pipeline_stage=2, micro_batch_num=4, use_seq_parallel=True)))
    dims = ParallelDims.from_config(cfg.parallel)
    reps = representative_ranks(dims)
    seen = {}
    for r in range(dims.world_size):
        st = rank_states(cfg, r)
        key = (st["param_bytes"], st["optimizer_bytes"], st["fsdp_gathered_all"], tuple(st["layers"]))
        seen.setdefault(st["pp_stage"], set()).add(key)
        if r in reps:
            assert (st["dp_rank"], st["tp_rank"]) == (0, 0)
    assert all(len(v) == 1 for v in seen.values()), seen


def test_meta_routing_is_balanced_over_every_expert():
    """The fake run's MoE routing (`bincount(..., minlength=E)`, as the model calls it): every expert
    gets its share; the dispatcher passes minlength positionally (once read as 1 bin: all tokens on
    one expert, and the grouped-expert backward's per-expert temporaries counted at full size)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dsv3.tools.memtrack import TensorMemory

    fake = FakeTensorMode()
    with fake:
        idx = torch.zeros(1001, 2, dtype=torch.long)
    with fake, TensorMemory(meta_routing=True):
        counts = torch.bincount(idx.flatten(), minlength=8).tolist()
    assert counts == [251, 251, 250, 250, 250, 250, 250, 250]


def test_moe_layer_transient_has_no_expert_weight_gradients():
    """The fake run counts activations only: the grouped experts' hand-written backward must not form
    the stacked [E, I, D] weight gradients there (model states, counted from the build). With 64
    experts one stack (16 MiB) outweighs the layer's activations at batch 1 x 64 tokens."""
    from memory_cases import case_cfg

    from dsv3.tools.activations import ActivationProfile

    cfg = case_cfg("/nonexistent/never_read_text_document", "/nonexistent/out", {}, batch_size=1, seq=64)
    cfg.model.n_routed_experts = 64
    mc = cfg.model
    stack = mc.n_routed_experts * mc.moe_intermediate_size * mc.hidden_size * 4
    for recomputed in (False, True):
        kept, transient = ActivationProfile(cfg).layer(1, recomputed)
        assert kept + transient < stack, (recomputed, kept, transient, stack)


def test_hsdp_replicas_hold_twice_the_shard(tmp_path, capsys):
    """dp4 sharded over all 4 vs HSDP dp_replicate 2 (sharded over 2): the dense model states per rank
    grow (each shard is twice as large), the routed experts' (edp-sharded) do not change."""
    cfg_path = write_cfg(tmp_path, data_parallel=4, pipeline_stage=2, expert_parallel=1, micro_batch_num=4)
    reps = {}
    for r in (1, 2):
        rc, _, _ = dryrun(capsys, "--config", str(cfg_path), "--set", f"parallel.dp_replicate={r}", "--json", str(tmp_path / f"{r}.json"))
        assert rc == 0
        reps[r] = json.loads((tmp_path / f"{r}.json").read_text())
    for a, b in zip(reps[1]["ranks"], reps[2]["ranks"]):
        assert a["params"] < b["params"] < 2 * a["params"], (a["params"], b["params"])
    assert dryrun(capsys, "--config", str(cfg_path), "--set", "parallel.dp_replicate=3")[0] != 0  # must divide dp
