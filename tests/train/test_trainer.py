"""The training loop on real data: exact resume, crash-safe checkpoints, balancing counts, validation,
the seed's MindSpore YAML end to end, and one-line errors for bad input."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
import yaml

from dsv3.cli import main as cli_main
from dsv3.train import checkpoint
from dsv3.train.metrics import read_metrics
from dsv3.train.trainer import Trainer

from run_config import SAMPLE_LEN
from run_config import small_run, steps_then_resume, train_losses

HERE = Path(__file__).resolve().parent


def test_resume_is_bit_identical(reference, wiki_prefix, tmp_path):
    cfg = small_run(wiki_prefix, tmp_path)
    losses, resumed = steps_then_resume(cfg, 3)
    assert resumed.step == 3
    resumed.fit()
    losses.update(train_losses(tmp_path))
    assert losses == reference["losses"]  # exact float equality, steps 1..6
    state = resumed.model.state_dict()
    for k, v in reference["model"].items():
        assert torch.equal(state[k], v), k  # weights and routing biases
    assert any(torch.count_nonzero(v) for k, v in state.items() if k.endswith("e_score_correction_bias"))
    ref_opt, opt = reference["optim"]["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(ref_opt[i]["exp_avg_sq"], opt[i]["exp_avg_sq"]) for i in ref_opt)


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {here!r})
    from run_config import small_run, steps_then_resume, train_losses
    from dsv3.train import checkpoint
    from dsv3.train.trainer import Trainer
    t = Trainer(small_run({prefix!r}, {out!r}), quiet=True)
    for _ in range(3):
        t.train_step()
    t.save()
    for _ in range(3):
        t.train_step()
    real_save = torch.save
    def slow_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        open({marker!r}, "w").close()   # the new checkpoint is half written: tell the parent
        time.sleep(120)
    checkpoint.torch.save = slow_save
    t.save()
""")


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(reference, wiki_prefix, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "writing"
    script = _KILL_SCRIPT.format(here=str(HERE), prefix=wiki_prefix, out=str(out), marker=str(marker))
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    root = checkpoint.checkpoint_root(out)
    assert [s for s, _ in checkpoint.list_checkpoints(root)] == [3]  # step-6 never appeared
    assert list(root.glob(".tmp-step-6-*"))  # the half-written one is only a temp dir
    cfg = small_run(wiki_prefix, out)
    resumed = Trainer(dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume=True)), quiet=True)
    assert resumed.step == 3
    resumed.fit()
    assert train_losses(out) == {s: v for s, v in reference["losses"].items() if s > 3}
    assert [s for s, _ in checkpoint.list_checkpoints(root)] == [3, 6] and not list(root.glob(".tmp-*"))


def test_counts_cover_every_micro_batch_and_bias_moves_by_gamma(wiki_prefix, tmp_path):
    gamma = 1e-3
    cfg = small_run(wiki_prefix, tmp_path, parallel={"micro_batch_num": 3}, train={"steps": 1, "bias_update_rate": gamma})
    t = Trainer(cfg, quiet=True)
    before = [m.gate.e_score_correction_bias.clone() for m in t.moe_layers]
    rec = t.train_step()
    counts = rec["counts"]  # [MoE layers, E]: main MoE layer + the MTP block's
    assert counts.shape == (2, 8)
    assert torch.all(counts.sum(1) == 3 * 1 * 32 * 2)  # micro-batches x batch x seq x top-k
    for m, b, c in zip(t.moe_layers, before, counts):
        torch.testing.assert_close(m.gate.e_score_correction_bias - b, gamma * torch.sign(c.mean() - c))


def test_validation_loss_goes_down_and_outputs_are_written(wiki_prefix, tmp_path):
    cfg = small_run(wiki_prefix, tmp_path, train={"steps": 12, "batch_size": 2}, eval={"eval_steps": 3, "eval_iters": 4},
                    lr_schedule={"learning_rate": 1e-2}, checkpoint={"save_steps": 0, "export_hf": True}, logging={"plots": True})
    summary = Trainer(cfg, quiet=True).fit()
    evals = [r["valid_loss"] for r in read_metrics(tmp_path) if r.get("kind") == "eval"]
    assert len(evals) == 5  # steps 0, 3, 6, 9, 12
    assert all(b < a for a, b in zip(evals, evals[1:])), evals
    assert evals[-1] < evals[0] - 1.0
    assert summary["valid_loss"] == evals[-1]
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"loss.png", "expert_load.png", "lr.png"}
    assert cli_main(["plot", str(tmp_path), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "expert_load.png").stat().st_size > 1000
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "config.resolved.yaml").is_file()
    from dsv3.checkpoint.io import from_pretrained

    hf = from_pretrained(tmp_path / "hf", dtype="float32")
    tokens = torch.randint(0, 1000, (1, 8))
    torch.testing.assert_close(hf(tokens), _reload(tmp_path, cfg)(tokens))  # the HF export is the final model


def _reload(run_dir, cfg):
    from dsv3.model import Transformer

    m = Transformer(cfg.model)
    checkpoint.load_checkpoint(checkpoint.latest_checkpoint(checkpoint.checkpoint_root(run_dir)), m)
    return m.eval()


def _write(cfg_dict: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg_dict), encoding="utf-8")
    return path


def _run_cli(capsys, *args) -> tuple[int, list[str]]:
    rc = cli_main(["train", *args])
    return rc, capsys.readouterr().err.strip().splitlines()


def test_seed_mindspore_yaml_trains(data_dir, wiki_prefix, tmp_path, capsys):
    from seed_recipe import write_seed_1b

    y = write_seed_1b(data_dir, tmp_path / "pretrain_deepseek3_1b.yaml", wiki_prefix)
    shrink = [f"model.{k}={v}" for k, v in dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                                   num_attention_heads=2, q_lora_rank=32, kv_lora_rank=16,
                                                   qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16).items()]
    args = ["--config", str(y), "--output-dir", str(tmp_path / "out"), "--set", "train.steps=2", "--set", "data.seq_length=32", "--set", "parallel.micro_batch_num=1",
            "--set", "train.precision=fp32", "--set", "logging.progress_bar=false"]
    for s in shrink:
        args += ["--set", s]
    rc, err = _run_cli(capsys, *args)
    assert rc == 0, err
    recs = [r for r in read_metrics(tmp_path / "out") if r.get("kind") == "train"]
    assert [r["step"] for r in recs] == [1, 2]
    assert recs[0]["tokens_per_s"] > 0 and len(recs[0]["expert_load"]) == 3  # 2 MoE layers + MTP
    assert any("ignored (MindSpore/Ascend-only)" in ln for ln in err)
    assert any("accumulating 2 micro-batches" in ln for ln in err)  # data_parallel 2 x micro_batch_num 1


def test_bad_input_gives_one_line_and_loses_nothing(reference, wiki_prefix, tmp_path, capsys):
    base = yaml.safe_load((reference["out"] / "config.resolved.yaml").read_text())
    base["checkpoint"]["output_dir"] = str(tmp_path / "new")
    # missing data
    bad = dict(base, data=dict(base["data"], data_path=[str(tmp_path / "nope_text_document")]))
    rc, err = _run_cli(capsys, "--config", str(_write(bad, tmp_path / "a.yaml")))
    assert rc == 2 and len(err) == 1 and "nope_text_document.bin" in err[0] and "dsv3 preprocess" in err[0]
    # seq_length beyond the preprocessed sample length
    bad = dict(base, data=dict(base["data"], seq_length=2 * SAMPLE_LEN))
    rc, err = _run_cli(capsys, "--config", str(_write(bad, tmp_path / "b.yaml")))
    assert rc == 2 and len(err) == 1 and f"sample length {SAMPLE_LEN}" in err[0]
    assert not (tmp_path / "new").exists()
    # an existing run is never overwritten without --resume
    old = reference["out"]
    snapshot = {p: p.stat().st_mtime_ns for p in old.rglob("*")}
    rc, err = _run_cli(capsys, "--config", str(old / "config.resolved.yaml"))
    assert rc == 2 and len(err) == 1 and "--resume" in err[0]
    # every checkpoint corrupt (one truncated, one without its optimizer state): nothing to resume from
    run = tmp_path / "corrupt"
    import shutil

    shutil.copytree(old, run)
    conf = yaml.safe_load((run / "config.resolved.yaml").read_text())
    conf["checkpoint"]["output_dir"] = str(run)
    (_, first), (_, latest) = checkpoint.list_checkpoints(checkpoint.checkpoint_root(run))
    w = latest / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    (first / "optimizer.pt").unlink()
    metrics_before = (run / "metrics.jsonl").read_bytes()
    rc, err = _run_cli(capsys, "--config", str(_write(conf, tmp_path / "c.yaml")), "--resume")
    assert rc == 2 and len(err) == 1 and "no checkpoint under" in err[0] and "verifies" in err[0], err
    assert "step-6 fails verification (model.safetensors is" in err[0] and "step-3 is incomplete (optimizer.pt is missing)" in err[0]
    assert (run / "metrics.jsonl").read_bytes() == metrics_before and w.is_file()
    assert snapshot == {p: p.stat().st_mtime_ns for p in old.rglob("*")}


def test_log_lines_show_step_of_total_and_eta_and_layers_are_named(wiki_prefix, tmp_path, capsys):
    """`dsv3 train`: every log line reads "step N/total ... | ETA H:MM:SS"; the expert load is recorded
    per named MoE layer, the MTP block's as "MTP 0" (the plot once called it "MoE layer 1")."""
    from dsv3.config.load import dump_yaml
    from dsv3.train.plot import expert_load_series

    cfg = small_run(wiki_prefix, tmp_path / "out", train={"steps": 3}, checkpoint={"save_steps": 0, "save_at_end": False})
    conf = tmp_path / "run.yaml"
    dump_yaml(cfg, conf)
    rc, err = _run_cli(capsys, "--config", str(conf))
    assert rc == 0, err
    lines = [ln for ln in err if ln.startswith("step ") and "loss" in ln and "valid" not in ln]
    assert [ln.split(" | ")[0] for ln in lines] == ["step 1/3", "step 2/3", "step 3/3"], err
    assert all(re.search(r" \| ETA \d+:\d\d:\d\d$", ln) for ln in lines) and lines[-1].endswith("ETA 0:00:00"), lines
    recs = [r for r in read_metrics(tmp_path / "out") if r.get("kind") == "train"]
    assert recs[-1]["expert_load_layers"] == ["layer 1", "MTP 0"]  # first_k_dense_replace 1 of 2 layers, one MTP block
    assert [label for label, _ in expert_load_series(recs)] == ["layer 1", "MTP 0"]
