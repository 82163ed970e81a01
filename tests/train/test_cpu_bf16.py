"""`train.precision: bf16` (the seed YAML's compute_dtype: bfloat16) on a CPU without bf16 instructions
(issue 26 item 5): one line says so, with the bf16/fp32 GEMM slowdown measured at startup, and the run
computes in fp32 -- the losses of an fp32 run, at its speed; metrics.jsonl records the precision that ran.
`DSV3_ISA=avx2` makes this machine (AVX-512 BF16 or not) count as one without native bf16. Through the real
CLI with the seed guide's 1B YAML, shrunk."""

from __future__ import annotations

import os
import subprocess
import sys

from dsv3.train.metrics import read_metrics

SHRINK = {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_attention_heads": 2, "q_lora_rank": 32,
          "kv_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16}


def _train(yaml_path, out, *sets, isa: str | None = "avx2"):
    env = {k: v for k, v in os.environ.items() if k != "DSV3_ISA"}
    if isa is not None:
        env["DSV3_ISA"] = isa
    args = [sys.executable, "-m", "dsv3", "train", "--config", str(yaml_path), "--output-dir", str(out)]
    for s in ["train.steps=2", "data.seq_length=32", "parallel.micro_batch_num=1", "logging.progress_bar=false",
              "checkpoint.save_steps=0", "checkpoint.save_at_end=false", "checkpoint.export_hf=false", "eval.eval_steps=0",
              "eval.eval_at_end=false", "logging.plots=false", *[f"model.{k}={v}" for k, v in SHRINK.items()], *sets]:
        args += ["--set", s]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stderr, [rec for rec in read_metrics(out) if rec.get("kind") == "train"]


def test_bf16_without_native_bf16_runs_fp32_and_says_so(data_dir, wiki_prefix, tmp_path):
    from seed_recipe import write_seed_1b

    y = write_seed_1b(data_dir, tmp_path / "pretrain_deepseek3_1b.yaml", wiki_prefix)
    err, recs = _train(y, tmp_path / "fallback")
    notes = [ln for ln in err.splitlines() if "no native bf16" in ln]
    assert len(notes) == 1, err
    assert "DSV3_ISA=avx2 caps the ISA below bf16" in notes[0] and "bf16 GEMM took" in notes[0]
    assert "x the fp32 time here (measured at startup" in notes[0] and "computes in fp32" in notes[0]
    assert [r["precision"] for r in recs] == ["fp32", "fp32"]
    # the same computation as an fp32 run: identical losses
    err32, recs32 = _train(y, tmp_path / "fp32", "train.precision=fp32")
    assert "no native bf16" not in err32 and [r["precision"] for r in recs32] == ["fp32", "fp32"]
    assert [r["loss"] for r in recs] == [r["loss"] for r in recs32]
    # train.cpu_bf16: autocast keeps bf16 autocast (other numerics), and says nothing
    err16, recs16 = _train(y, tmp_path / "bf16", "train.cpu_bf16=autocast")
    assert "no native bf16" not in err16 and [r["precision"] for r in recs16] == ["bf16", "bf16"]
    assert [r["loss"] for r in recs16] != [r["loss"] for r in recs32]
