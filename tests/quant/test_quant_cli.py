"""Quantisation from the command line: the seed's W8A8 predict YAML through `dsv3 generate --config`,
`--quantization`, and `dsv3 serve`'s engine loader."""

from __future__ import annotations

import argparse

import pytest
import torch
import yaml

from dsv3.cli import main
from dsv3.quant import QuantLinear


def test_seed_w8a8_predict_yaml_generates_with_w8a8(tiny_tok_ckpt, data_dir, tmp_path, capsys):
    seed = data_dir.parent / "mindformers-configs" / "predict_deepseek3_671b_w8a8.yaml"
    if not seed.is_file():
        pytest.skip(f"{seed} not found (the seed's MindFormers configs)")
    data = yaml.safe_load(seed.read_text(encoding="utf-8"))
    data["load_checkpoint"] = str(tiny_tok_ckpt)
    data["processor"]["tokenizer"]["tokenizer_file"] = str(tiny_tok_ckpt / "tokenizer.json")
    data["processor"]["tokenizer"]["vocab_file"] = str(tiny_tok_ckpt / "tokenizer.json")
    data["use_parallel"] = False  # one process (with True, parallel_config model_parallel 16 would start 16)
    cfg = tmp_path / "predict_w8a8.yaml"
    cfg.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    rc = main(["generate", "--config", str(cfg), "--input", "hello", "--raw", "--max-tokens", "4", "--ignore-eos",
               "--num-blocks", "32"])
    out, err = capsys.readouterr()
    assert rc == 0 and len(out.strip()) > 0, err
    assert "quantization (predict YAML quantization_config): w8a8" in err and "quantised" in err
    assert "outliers_suppression 'outlier-suppression+' is NOT applied" in err
    # --quantization on the command line wins over the YAML
    rc = main(["generate", "--config", str(cfg), "--quantization", "int8", "--input", "hello", "--raw", "--max-tokens", "2",
               "--ignore-eos", "--num-blocks", "32"])
    err = capsys.readouterr().err
    assert rc == 0 and "quantization (--quantization): int8" in err


def test_generate_quantization_flag_errors_in_one_line(tiny_tok_ckpt, capsys):
    rc = main(["generate", "--model", str(tiny_tok_ckpt), "--quantization", "int3", "--input", "x", "--num-blocks", "32"])
    err = capsys.readouterr().err
    assert rc == 2 and "int3" in err and err.count("\n") == 1


def test_serve_loader_passes_quantization(tiny_tok_ckpt):
    from dsv3.serve.cli import add_arguments, load_engine

    p = argparse.ArgumentParser()
    add_arguments(p)
    engine = load_engine(p.parse_args(["--model", str(tiny_tok_ckpt), "--quantization", "w8a8", "--dtype", "float32",
                                       "--max-model-len", "64"]))
    assert isinstance(engine.model.model.layers[0].self_attn.q_a_proj, QuantLinear)
    assert engine.model.model.layers[0].self_attn.q_a_proj.weight.dtype == torch.int8
