"""The seed's fine-tuning YAML runs: `dsv3 train --config finetune_deepseek3_671b.yaml` (model shrunk with
--set) starting from an HF directory, on an Alpaca file read directly (tokenizer from the checkpoint
directory), epochs over the data, CosineWithWarmUpLR to lr_end, held-out SFT loss, HF export with the
tokenizer; train.init_from errors are one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dsv3.cli import main
from dsv3.config.train import load_run_config

SHRINK = [f"model.{k}" for k in (
    "hidden_size=64", "intermediate_size=128", "moe_intermediate_size=32", "num_hidden_layers=2", "first_k_dense_replace=1",
    "num_attention_heads=2", "q_lora_rank=32", "kv_lora_rank=16", "qk_nope_head_dim=16", "qk_rope_head_dim=8",
    "v_head_dim=16", "n_routed_experts=8", "n_group=4", "topk_group=2", "num_experts_per_tok=2", "max_position_embeddings=512")] + [
    "data.seq_length=128", "train.precision=fp32", "train.device=cpu", "train.threads=2", "parallel.data_parallel=1",
    "parallel.model_parallel=1", "parallel.pipeline_stage=1", "parallel.expert_parallel=1", "parallel.micro_batch_num=1",
    "parallel.use_seq_parallel=false", "parallel.pp_layer_offset=null", "parallel.recompute_layers=null", "train.recompute=none",
    "lr_schedule.learning_rate=0.002", "lr_schedule.min_lr=0.0002",
    "logging.plots=false", "logging.progress_bar=false", "checkpoint.save_steps=0", "eval.eval_steps=4", "eval.eval_iters=2"]


def _yaml(data_dir: Path) -> Path:
    return data_dir.parent / "mindformers-configs" / "finetune_deepseek3_671b.yaml"


def gsm8k_alpaca(data_dir: Path, out: Path, n: int, start: int = 0, split: str = "train") -> Path:
    """GSM8K questions -> Alpaca instruction/output records (JSON lines)."""
    lines = (data_dir / "gsm8k" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[start : start + n]
    recs = [json.loads(x) for x in lines]
    out.write_text("".join(json.dumps({"instruction": r["question"], "input": "", "output": r["answer"]}) + "\n" for r in recs),
                   encoding="utf-8")
    return out


def hf_dir_for(cfg, data_dir: Path, dest: Path, seed: int = 0) -> Path:
    """A random model of cfg.model saved as an HF directory, with the V3 tokenizer next to it."""
    from dsv3.model import Transformer

    torch.manual_seed(seed)
    m = Transformer(cfg.model)
    m.reset_parameters()
    m.save_pretrained(dest)
    for name in ("tokenizer.json.xz", "tokenizer_config.json"):
        shutil.copy(data_dir / "deepseek_v3_tokenizer" / name, dest / name)
    return dest


def test_seed_finetune_yaml_runs_from_an_hf_dir(data_dir, tmp_path, capsys):
    from dsv3.train.metrics import read_metrics

    yaml_path = _yaml(data_dir)
    cfg = load_run_config(yaml_path, SHRINK)
    assert cfg.data.type == "sft" and cfg.train.epochs == 2 and cfg.lr_schedule.type == "cosine"
    assert cfg.lr_schedule.warmup_ratio == 0.02
    hf = hf_dir_for(cfg, data_dir, tmp_path / "hf")
    data = gsm8k_alpaca(data_dir, tmp_path / "gsm8k.jsonl", 8)
    out = tmp_path / "run"
    rc = main(["train", "--config", str(yaml_path), *sum((["--set", s] for s in SHRINK), []), "--set", f"train.init_from={hf}",
               "--set", f"data.sft.path={data}", "--set", "data.sft.valid_fraction=0.25", "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "MindDataset -> data.type sft" in err and f"init_from {hf}" in err
    assert "SFT train" in err and "truncated" in err and "SFT held-out" in err
    recs = read_metrics(out)
    train = [r for r in recs if r.get("kind") == "train"]
    evals = [r for r in recs if r.get("kind") == "eval"]
    n_steps = len(train)
    assert n_steps % 2 == 0 and n_steps >= 4  # 2 epochs x (6 samples packed into sequences of 128)
    lrs = [r["lr"] for r in train]
    assert max(lrs) == pytest.approx(2e-3) and lrs[-1] < lrs[1] and min(lrs) >= 2e-4 - 1e-12  # cosine to lr_end
    assert evals and evals[0]["step"] == 0 and all(r["valid_loss"] > 0 for r in evals)
    exported = out / "hf"
    assert (exported / "tokenizer.json").is_file()
    assert "chat_template" in json.loads((exported / "tokenizer_config.json").read_text(encoding="utf-8"))
    # a dsv3 run directory as init_from: its latest checkpoint's weights, fresh optimizer, step 0
    from dsv3.train.checkpoint import latest_checkpoint
    from dsv3.train.trainer import Trainer

    cfg2 = load_run_config(yaml_path, SHRINK + [f"train.init_from={out}", f"data.sft.path={data}", f"checkpoint.output_dir={tmp_path / 'run2'}"])
    t = Trainer(cfg2, quiet=True)
    from safetensors.torch import load_file

    saved = load_file(str(latest_checkpoint(out / "checkpoint") / "model.safetensors"))
    state = t.model.state_dict()
    assert t.step == 0 and not t.optimizer.state and all(torch.equal(state[k], v) for k, v in saved.items())


@pytest.mark.parametrize("extra,expect", [
    (["model.hidden_size=96"], "architecture differs from the run's model config: hidden_size: checkpoint 64, config 96"),
    (["model.n_routed_experts=16", "model.rope_theta=50000"], "rope_theta: checkpoint 10000.0, config 50000.0; n_routed_experts: checkpoint 8, config 16"),
    (["model.num_nextn_predict_layers=2"], "num_nextn_predict_layers is 2 but the checkpoint holds 1"),
])
def test_init_from_mismatch_is_one_line(data_dir, tmp_path, capsys, extra, expect):
    yaml_path = _yaml(data_dir)
    hf = hf_dir_for(load_run_config(yaml_path, SHRINK), data_dir, tmp_path / "hf")
    data = gsm8k_alpaca(data_dir, tmp_path / "d.jsonl", 4)
    rc = main(["train", "--config", str(yaml_path), *sum((["--set", s] for s in SHRINK + extra), []), "--set", f"train.init_from={hf}",
               "--set", f"data.sft.path={data}", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and expect in err[-1] and str(hf) in err[-1], err
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_init_from_a_file_or_mindrecord_dir_is_refused(data_dir, tmp_path, capsys):
    from dsv3.errors import UserError
    from dsv3.train.init_from import resolve_init_dir
    from dsv3.data.sft import load_sft_samples

    ckpt = tmp_path / "deepseekv3.ckpt"
    ckpt.write_bytes(b"x")
    with pytest.raises(UserError, match="MindSpore .ckpt files are not supported"):
        resolve_init_dir(ckpt)
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "alpaca.mindrecord").write_bytes(b"x")
    with pytest.raises(UserError, match="MindRecord files, which dsv3 does not read"):
        load_sft_samples(tmp_path / "ds")


def test_cosine_with_warmup_lr_of_the_seed(data_dir):
    """CosineWithWarmUpLR 5e-6 -> lr_end 1e-6, warmup_ratio 0.02 of the run's steps (MindFormers' formula after warmup)."""
    import math

    from dsv3.train.lr_schedule import lr_factor

    s = load_run_config(_yaml(data_dir), [x for x in SHRINK if not x.startswith("lr_schedule")]).lr_schedule
    assert (s.type, s.learning_rate, s.min_lr, s.warmup_ratio, s.total_steps) == ("cosine", 5e-6, 1e-6, 0.02, None)
    total, warm = 200, 4
    lrs = [s.learning_rate * lr_factor(i, s, total) for i in range(total)]
    assert lrs[:warm] == pytest.approx([5e-6 * (i + 1) / warm for i in range(warm)])
    for i in range(warm, total):
        assert lrs[i] == pytest.approx(1e-6 + 4e-6 * 0.5 * (1 + math.cos(math.pi * (i - warm) / (total - warm))))
    assert lrs[-1] == pytest.approx(1e-6, rel=1e-3)


def test_seed_finetune_yaml_runs_in_one_process_with_its_offset_and_recompute(data_dir, tmp_path):
    """The seed's 16-stage `offset` and `recompute` lists as they are, the run in one process (`--set
    parallel.pipeline_stage=1`): read as MindFormers reads them for one stage (offset unused, recompute[0]
    for the one stage, at most its layers), said on stderr, through the real CLI."""
    import subprocess
    import sys

    yaml_path = _yaml(data_dir)
    keep = [s for s in SHRINK if not s.startswith(("parallel.pp_layer_offset", "parallel.recompute_layers", "train.recompute"))]
    cfg = load_run_config(yaml_path, keep)
    assert cfg.parallel.pp_layer_offset is None and cfg.parallel.recompute_layers == [3] and cfg.train.recompute == "full"
    hf = hf_dir_for(cfg, data_dir, tmp_path / "hf")
    data = gsm8k_alpaca(data_dir, tmp_path / "gsm8k.jsonl", 4)
    sets = [*keep, f"train.init_from={hf}", f"data.sft.path={data}", "train.epochs=1", "eval.eval_steps=0",
            "eval.eval_at_end=false", "checkpoint.export_hf=false"]
    r = subprocess.run([sys.executable, "-m", "dsv3", "train", "--config", str(yaml_path), *sum((["--set", s] for s in sets), []),
                        "--output-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "model.model_config.offset [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, -1] not applied (pipeline_stage 1" in r.stderr
    assert "parallel.recompute_layers [3]" in r.stderr
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
