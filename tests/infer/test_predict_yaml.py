"""`dsv3 generate --config` with the seed's MindFormers predict YAML (W8A8 variant): the keys it
applies are honoured (quantization_config included: W8A8, see tests/quant/test_quant_cli.py) and every
other key (parallel_config, block_size/num_blocks, the model keys) is listed once on stderr as not applied
-- nothing is dropped silently."""

from __future__ import annotations

import pytest
import yaml

from dsv3.cli import main as cli_main


def test_seed_w8a8_predict_yaml_lists_what_it_does_not_apply(tiny_tok_ckpt, data_dir, tmp_path, capsys):
    src = data_dir.parent / "mindformers-configs" / "predict_deepseek3_671b_w8a8.yaml"
    if not src.is_file():
        pytest.skip(f"{src} not found")
    d = yaml.safe_load(src.read_text(encoding="utf-8"))
    d["load_checkpoint"] = str(tiny_tok_ckpt / "model.safetensors")
    d["processor"]["tokenizer"]["tokenizer_file"] = d["processor"]["tokenizer"]["vocab_file"] = str(tiny_tok_ckpt / "tokenizer.json")
    d["model"]["model_config"]["max_decode_length"] = 3
    d["use_parallel"] = False  # one process: parallel_config (model_parallel 16) is then listed as not applied
    cfg = tmp_path / "predict.yaml"
    cfg.write_text(yaml.safe_dump(d, allow_unicode=True), encoding="utf-8")
    rc = cli_main(["generate", "--config", str(cfg), "--input", "hello", "--raw", "--ignore-eos", "--quiet", "--num-blocks", "32"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    lines = [ln for ln in cap.err.splitlines() if "not applied" in ln]
    assert len(lines) == 1, cap.err
    line = lines[0]
    for key in ("parallel_config", "block_size", "num_blocks", "hidden_size", "num_layers", "context", "chat_template"):
        assert key in line, key
    for applied in ("quantization_config", "load_checkpoint", "tokenizer_file", "max_decode_length", "top_k", "do_sample"):
        assert applied not in line, applied
