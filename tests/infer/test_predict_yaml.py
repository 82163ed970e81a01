"""`dsv3 generate --config` with the seed's MindFormers predict YAML (W8A8 variant): the keys it
applies are honoured (quantization_config included: W8A8, see tests/quant/test_quant_cli.py) and every
other key (parallel_config, block_size/num_blocks, the model keys) is listed once on stderr as not applied
-- nothing is dropped silently."""

from __future__ import annotations

import pytest
import yaml

from dsv3.cli import main as cli_main


def test_seed_w8a8_predict_yaml_lists_what_it_does_not_apply(tiny_tok_ckpt, data_dir, tmp_path, capsys):
    cfg = _predict_yaml(data_dir, tiny_tok_ckpt, tmp_path, "predict_deepseek3_671b_w8a8.yaml")
    rc = cli_main(["generate", "--config", str(cfg), "--input", "hello", "--max-tokens", "3", "--ignore-eos", "--quiet",
                     "--num-blocks", "32"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    lines = [ln for ln in cap.err.splitlines() if "not applied" in ln]
    assert len(lines) == 1, cap.err
    line = lines[0]
    for key in ("parallel_config", "block_size", "num_blocks", "hidden_size", "num_layers", "context", "chat_template"):
        assert key in line, key
    assert "max_decode_length (run_predict_deepseek.py's max_new_tokens=128 takes precedence" in line
    for applied in ("quantization_config", "load_checkpoint", "tokenizer_file", "top_k", "do_sample"):
        assert applied not in line, applied


def _predict_yaml(data_dir, ckpt, tmp_path, name: str = "predict_deepseek3_671b.yaml"):
    """The seed's predict YAML `name` pointed at `ckpt` and its tokenizer, in one process (use_parallel False:
    parallel_config, model_parallel 16, is then listed as not applied)."""
    src = data_dir.parent / "mindformers-configs" / name
    if not src.is_file():
        pytest.skip(f"{src} not found")
    d = yaml.safe_load(src.read_text(encoding="utf-8"))
    d["load_checkpoint"] = str(ckpt / "model.safetensors")
    d["processor"]["tokenizer"]["tokenizer_file"] = d["processor"]["tokenizer"]["vocab_file"] = str(ckpt / "tokenizer.json")
    d["use_parallel"] = False
    cfg = tmp_path / "predict.yaml"
    cfg.write_text(yaml.safe_dump(d, allow_unicode=True), encoding="utf-8")
    return cfg


def _generate(*args):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "dsv3", "generate", *map(str, args), "--input", "请介绍一下北京的景点", "--ignore-eos",
                        "--num-blocks", "64"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_predict_yaml_runs_as_run_predict_deepseek(tiny_tok_ckpt, data_dir, tmp_path):
    """`dsv3 generate --config predict.yaml` (the seed's YAML, max_decode_length 1024) by default as
    `run_predict_deepseek.py` runs: the raw prompt after BOS, 128 new tokens -- the same text as
    `--model DIR --raw --max-tokens 128`; `--chat` applies the chat template (other text)."""
    cfg = _predict_yaml(data_dir, tiny_tok_ckpt, tmp_path)
    seed = _generate("--config", cfg)
    assert "raw prompt after BOS, at most 128 new tokens]" in seed.stderr
    assert "[128 tokens in" in seed.stderr
    raw = _generate("--model", tiny_tok_ckpt, "--raw", "--max-tokens", "128")
    assert seed.stdout == raw.stdout and seed.stdout.strip()
    chat = _generate("--config", cfg, "--chat", "--max-tokens", "16")
    assert "chat template, at most 16 new tokens]" in chat.stderr and chat.stdout != seed.stdout[: len(chat.stdout)]
