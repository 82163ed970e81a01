"""`dsv3 dryrun` / `dsv3 balance` through the real CLI: a plan keeps `--headroom` of the device memory
free (the dry-run under-predicts by up to 10%), says per stage why its recompute count is enough, a MindSpore YAML's `context.max_device_memory` is the device
memory when no `--device-memory` is given, progress goes to stderr while they work, the ignored
MindSpore keys are counted on one short line (listed under `--verbose`), and the plan's columns
are explained."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from dsv3.cli import main
from memory_cases import MODEL

SEED_YAML = Path(__file__).resolve().parents[2].parent / "shared" / "mindformers-configs" / "pretrain_deepseek3_671b.yaml"


@pytest.fixture
def dsv3(capsys):
    """`dsv3 ARGS` through the CLI's entry point in this process (the subprocess test below covers the
    console path): (exit status, stdout, stderr)."""
    def run(*args: str) -> SimpleNamespace:
        rc = main(list(args))
        out = capsys.readouterr()
        return SimpleNamespace(returncode=rc, stdout=out.out, stderr=out.err)
    return run


def layout_yaml(tmp: Path) -> Path:
    d = {"model": {**MODEL, "num_hidden_layers": 4}, "data": {"data_path": ["/nonexistent/never_read_text_document"], "seq_length": 128},
         "train": {"batch_size": 2, "recompute": "full"}, "optimizer": {"state_dtype": "bfloat16"},
         "parallel": {"data_parallel": 2, "pipeline_stage": 2, "expert_parallel": 2, "micro_batch_num": 4}}
    p = tmp / "layout.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def test_dryrun_fits_only_within_the_headroom(tmp_path, dsv3):
    cfg = str(layout_yaml(tmp_path))
    p = dsv3("dryrun", "--config", cfg, "--device-memory", "64GB", "--headroom", "0", "--json", str(tmp_path / "a.json"))
    assert p.returncode == 0, p.stderr
    peak = json.loads((tmp_path / "a.json").read_text())["max_peak_bytes"]
    # a device 10% larger than the peak: fits without headroom, not with the default 15%
    limit = f"{int(peak * 1.1)}B"
    p = dsv3("dryrun", "--config", cfg, "--device-memory", limit, "--json", str(tmp_path / "b.json"))
    rep = json.loads((tmp_path / "b.json").read_text())
    last = p.stdout.strip().splitlines()[-1]
    assert p.returncode == 0 and rep["headroom"] == 0.15 and not rep["fits"], last
    assert rep["usable_bytes"] == int(int(peak * 1.1) * 0.85)
    assert "15% headroom" in last and "does NOT fit within the headroom" in last, last
    p = dsv3("dryrun", "--config", cfg, "--device-memory", limit, "--headroom", "0.05", "--json", str(tmp_path / "c.json"))
    assert json.loads((tmp_path / "c.json").read_text())["fits"] and "-> fits" in p.stdout, p.stdout
    # progress on stderr, one line per pipeline rank
    prog = [ln for ln in p.stderr.splitlines() if ln.startswith("dryrun: pipeline rank")]
    assert len(prog) == 2 and "of 2" in prog[0], p.stderr
    p = dsv3("dryrun", "--config", cfg, "--headroom", "1.2")
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "dsv3 dryrun: error: --headroom 1.2: expected a fraction of the device memory in [0, 1), e.g. 0.15"], p.stderr


def test_dryrun_verbose_says_what_each_peak_is_made_of(tmp_path, dsv3):
    cfg = str(layout_yaml(tmp_path))
    p = dsv3("dryrun", "--config", cfg, "--verbose", "--json", str(tmp_path / "r.json"))
    rep = json.loads((tmp_path / "r.json").read_text())
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("stage ") and "): peak " in ln]
    assert p.returncode == 0 and len(lines) == len(rep["ranks"]) == 2, p.stdout
    for r, line in zip(rep["ranks"], lines):
        assert sum(r["breakdown"].values()) == r["peak_bytes"], r["breakdown"]  # the parts add up to the peak
        assert f"(rank {r['rank']}): peak {r['peak_bytes'] / 2**30:.2f} GiB during the {r['peak_phase']} = " in line, line
        assert "fp32 weights" in line and "AdamW moments" in line and "activations in flight" in line, line
    # the last stage's heads: their logits are a named part (MTP: two heads)
    assert rep["ranks"][1]["breakdown"]["logits"] > 0 and "logits + loss" in lines[1]


def test_balance_plans_within_the_headroom(tmp_path, dsv3):
    cfg = str(layout_yaml(tmp_path))
    p = dsv3("balance", "--config", cfg, "--device-memory", "1GB", "--json", str(tmp_path / "plan.json"))
    assert p.returncode == 0, p.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["fits"] and plan["usable_bytes"] == int(0.85 * 2**30)
    assert max(plan["stage_peak_bytes"]) <= plan["usable_bytes"]
    assert "rc: how many of its first layers" in p.stdout and "less 15% headroom" in p.stdout, p.stdout
    prog = [ln for ln in p.stderr.splitlines() if ln.startswith("balance: ")]
    assert any("built pipeline rank 2 of 2" in ln for ln in prog) and any("profiled activations: MoE layer" in ln for ln in prog)
    assert len(prog) < 20, prog  # a line per stage / kind of layer, not per candidate
    # the smallest device memory it names is one under which a plan fits, headroom included
    p = dsv3("balance", "--config", cfg, "--device-memory", "1MB", "--json", str(tmp_path / "no.json"))
    need = json.loads((tmp_path / "no.json").read_text())["min_device_memory_bytes"]
    assert "plus the headroom" in p.stdout
    dsv3("balance", "--config", cfg, "--device-memory", f"{need}B", "--json", str(tmp_path / "ok.json"))
    ok = json.loads((tmp_path / "ok.json").read_text())
    assert ok["fits"] and max(ok["stage_peak_bytes"]) > 0.9 * ok["usable_bytes"]  # the bound is tight


def test_balance_says_why_each_stage_recomputes(tmp_path, dsv3):
    cfg = str(layout_yaml(tmp_path))
    dsv3("balance", "--config", cfg, "--device-memory", "1MB", "--json", str(tmp_path / "no.json"))
    need = json.loads((tmp_path / "no.json").read_text())["min_device_memory_bytes"]
    p = dsv3("balance", "--config", cfg, "--device-memory", f"{need}B", "--json", str(tmp_path / "plan.json"))
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert p.returncode == 0 and plan["fits"] and [w["stage"] for w in plan["why"]] == [0, 1], p.stdout
    for w, r, peak in zip(plan["why"], plan["recompute"], plan["stage_peak_bytes"]):
        assert w["line"] in p.stdout.splitlines() and w["recompute"] == r and w["peak_bytes"] == peak <= w["usable_bytes"]
        if r:  # one layer fewer would not fit: r is the least that does
            assert w["fewer_peak_bytes"] > w["usable_bytes"] and f"recompute {r} layer" in w["line"], w
            assert f"because with {r - 1} its peak would be" in w["line"] and "over the" in w["line"], w["line"]
    s, w = next((s, w) for s, w in enumerate(plan["why"]) if w["recompute"])
    # `dsv3 dryrun` of the plan (its --set keys, reduce_grads_every_microbatch included when it plans with
    # it) with that stage recomputing one layer fewer: exactly the peak the line quotes
    fewer = [r - (i == s) for i, r in enumerate(plan["recompute"])]
    lst = lambda xs: "[" + ",".join(map(str, xs)) + "]"
    sets = [f"parallel.pp_layer_offset={lst(plan['offset'])}", f"parallel.recompute_layers={lst(fewer)}", "train.recompute=full",
            f"parallel.reduce_grads_every_microbatch={str(plan['reduce_grads_every_microbatch']).lower()}"]
    dsv3("dryrun", "--config", cfg, *(a for kv in sets for a in ("--set", kv)), "--json", str(tmp_path / "d.json"))
    rank = next(r for r in json.loads((tmp_path / "d.json").read_text())["ranks"] if r["pp_stage"] == s)
    assert rank["peak_bytes"] == w["fewer_peak_bytes"], (rank["breakdown"], w)
    # without a tight limit no stage recomputes, and each line says its peak fits
    p = dsv3("balance", "--config", cfg, "--device-memory", "64GB", "--json", str(tmp_path / "free.json"))
    free = json.loads((tmp_path / "free.json").read_text())
    assert free["recompute"] == [0, 0] and all("recompute 0 layers because without recompute its peak" in w["line"]
                                               and w["line"] in p.stdout for w in free["why"]), p.stdout


def shrunk_seed(tmp: Path) -> Path:
    """The seed's 671B MindSpore YAML with its sizes cut to a CPU-sized model on 8 ranks (dp2 pp2 ep2 mp2)."""
    if not SEED_YAML.is_file():
        pytest.skip(f"{SEED_YAML} not found")
    d = yaml.safe_load(SEED_YAML.read_text(encoding="utf-8"))
    mc = d["model"]["model_config"]
    mc.update(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=768, kv_lora_rank=64, q_lora_rank=128,
              qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=64, vocab_size=4096, seq_length=128,
              max_position_embeddings=512, offset=0)
    d["moe_config"].update(expert_num=8, moe_intermediate_size=256, first_k_dense_replace=1, n_group=4, topk_group=2,
                           num_experts_chosen=2)
    d["train_dataset"]["data_loader"]["config"]["seq_length"] = 128
    d["parallel_config"].update(data_parallel=2, model_parallel=2, pipeline_stage=2, expert_parallel=2, micro_batch_num=4)
    d["recompute_config"]["recompute"] = True
    assert d["context"]["max_device_memory"] == "55GB"
    p = tmp / "pretrain_small.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


def test_seed_yaml_device_memory_and_ignored_keys(tmp_path, dsv3):
    cfg = str(shrunk_seed(tmp_path))
    p = dsv3("dryrun", "--config", cfg, "--json", str(tmp_path / "r.json"))
    assert p.returncode == 0, p.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["device_memory_bytes"] == 55 * 2**30 and rep["device_memory_source"] == "context.max_device_memory"
    assert "55.00 GiB (context.max_device_memory)" in p.stdout
    ignored = [ln for ln in p.stderr.splitlines() if "ignored (MindSpore/Ascend-only)" in ln]
    assert len(ignored) == 1 and len(ignored[0]) < len(cfg) + 100 and "--verbose lists them" in ignored[0], ignored
    p = dsv3("dryrun", "--config", cfg, "--device-memory", "2GB", "--verbose", "--json", str(tmp_path / "v.json"))
    assert json.loads((tmp_path / "v.json").read_text())["device_memory_bytes"] == 2 * 2**30
    assert "load_ckpt_format" in p.stderr and "use_fused_rope" in p.stderr
    bad = yaml.safe_load(Path(cfg).read_text())
    bad["context"]["max_device_memory"] = "lots"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    p = subprocess.run([sys.executable, "-m", "dsv3", "balance", "--config", str(tmp_path / "bad.yaml")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "context.max_device_memory 'lots': expected a size" in p.stderr
