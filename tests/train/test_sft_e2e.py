"""End to end: a tiny model pretrained briefly on WikiText-2, fine-tuned on GSM8K questions -> answers
(our YAML, `dsv3 train`), held-out SFT loss falls; the exported directory (weights, tokenizer, chat
template) loads in transformers, in `dsv3 serve` (its app) and in `dsv3 generate --speculative`."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
import yaml

from dsv3.cli import main
from run_config import MODEL, small_run
from test_sft_train import gsm8k_alpaca


def _acceptance(capsys, model: Path, prompt: str, tokenizer: Path | None = None) -> tuple[int, int]:
    args = ["generate", "--model", str(model), "--input", prompt, "--max-tokens", "12", "--speculative", "--device", "cpu",
            "--dtype", "float32", "--threads", "2", "--ignore-eos"] + (["--tokenizer", str(tokenizer)] if tokenizer else [])
    assert main(args) == 0
    err = capsys.readouterr().err
    m = re.search(r"MTP drafts accepted (\d+)/(\d+)", err)
    assert m, err
    return int(m.group(1)), int(m.group(2))


def test_pretrain_finetune_export_serve(wiki_prefix, data_dir, tmp_path, capsys):
    from dsv3.train.metrics import read_metrics
    from dsv3.train.trainer import Trainer

    tok = data_dir / "deepseek_v3_tokenizer"
    pre = small_run(wiki_prefix, tmp_path / "pre", train={"steps": 6, "mtp_loss_factor": 0.3},
                    checkpoint={"export_hf": True, "save_steps": 0})
    Trainer(pre, quiet=True).fit()
    pre_hf = tmp_path / "pre" / "hf"
    train_file = gsm8k_alpaca(data_dir, tmp_path / "gsm8k_train.jsonl", 20)
    valid_file = gsm8k_alpaca(data_dir, tmp_path / "gsm8k_valid.jsonl", 4, split="test_even")
    run = {
        "model": dict(MODEL),
        "data": {"type": "sft", "seq_length": 128, "tokenizer": str(tok),
                 "sft": {"path": str(train_file), "valid_path": str(valid_file), "packing": True}},
        "train": {"steps": 10, "batch_size": 1, "device": "cpu", "threads": 2, "init_from": str(pre_hf), "mtp_loss_factor": 0.3},
        "lr_schedule": {"type": "cosine", "learning_rate": 3e-3, "warmup_ratio": 0.1, "min_lr": 3e-4},
        "checkpoint": {"output_dir": str(tmp_path / "sft"), "save_steps": 0, "keep_last": 1},
        "eval": {"eval_steps": 10, "eval_iters": 4},
        "logging": {"progress_bar": False, "plots": False},
    }
    cfg_file = tmp_path / "finetune.yaml"
    cfg_file.write_text(yaml.safe_dump(run), encoding="utf-8")
    assert main(["train", "--config", str(cfg_file)]) == 0
    capsys.readouterr()
    evals = [r["valid_loss"] for r in read_metrics(tmp_path / "sft") if r.get("kind") == "eval"]
    assert len(evals) == 2 and evals[-1] < evals[0] - 0.1, evals  # held-out SFT loss falls

    hf = tmp_path / "sft" / "hf"
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in hf.iterdir()}
    # transformers: same logits, and the shipped chat template renders like ours
    import dsv3
    from dsv3.data.chat_template import render_chat
    from transformers import AutoTokenizer, DeepseekV3ForCausalLM

    ids = torch.randint(0, 128000, (1, 24))
    ours = dsv3.from_pretrained(hf, dtype=torch.float32, mtp=False)
    theirs = DeepseekV3ForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max().item() <= 1e-4
    msgs = [{"role": "system", "content": "Answer."}, {"role": "user", "content": "1+1?"}]
    assert AutoTokenizer.from_pretrained(hf).apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == render_chat(msgs)

    # dsv3 serve's app over the exported directory
    from fastapi.testclient import TestClient

    from dsv3.serve.app import build_app
    from dsv3.serve.cli import load_engine

    engine = load_engine(argparse.Namespace(model=str(hf), tokenizer=None, dtype="float32", device="cpu", max_num_seqs=2,
                                            max_model_len=256))
    with TestClient(build_app(engine, "sft")) as client:
        r = client.post("/v1/chat/completions", json={"model": "sft", "messages": msgs, "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text

    # MTP speculative decoding before / after fine-tuning (a held-out GSM8K question)
    q = json.loads(valid_file.read_text(encoding="utf-8").splitlines()[0])["instruction"]
    before = _acceptance(capsys, pre_hf, q, tokenizer=tok)
    after = _acceptance(capsys, hf, q)
    assert before[1] > 0 and after[1] > 0
    print(f"MTP acceptance before {before[0]}/{before[1]}, after {after[0]}/{after[1]}", file=sys.stderr)
