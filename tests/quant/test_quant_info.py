"""`dsv3 info --model DIR`: bytes per weight (as stored, or as a quantisation would load it) and the
batch-1 decode bound (bandwidth / bytes read per token)."""

from __future__ import annotations

import json

from dsv3.checkpoint.reader import load_dir_config
from dsv3.cli import main
from dsv3.tools.info import account


def _info(capsys, *argv) -> dict:
    assert main(["info", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)["decode"]


def test_decode_bound_as_stored_and_quantised(small_ckpt, capsys):
    cfg = load_dir_config(small_ckpt)[0]
    acc = account(cfg)
    fp32 = _info(capsys, "--model", str(small_ckpt), "--bandwidth", "10")
    assert fp32["bytes_per_weight"] == 4.0 and fp32["source"] == "as stored"
    router_bias = cfg.n_routed_experts * sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))  # a buffer, not a parameter
    assert fp32["bytes_per_token"] == 4 * (acc.activated - acc.embedding + router_bias)  # every activated weight once, no embedding row
    assert abs(fp32["tokens_per_s_bound"] - 10e9 / fp32["bytes_per_token"]) < 1e-6 and fp32["bandwidth_gb_s"] == 10
    per = {m: _info(capsys, "--model", str(small_ckpt), "--bandwidth", "10", "--quantization", m) for m in ("int8", "int4", "w8a8")}
    assert fp32["bytes_per_token"] > per["w8a8"]["bytes_per_token"] > per["int8"]["bytes_per_token"] > per["int4"]["bytes_per_token"]
    assert per["int4"]["tokens_per_s_bound"] > 2 * fp32["tokens_per_s_bound"]


def test_decode_bound_of_fp8_dir_and_measured_bandwidth(small_ckpt, tmp_path, capsys):
    dst = tmp_path / "fp8"
    assert main(["convert", str(small_ckpt), str(dst), "--to", "fp8"]) == 0
    capsys.readouterr()
    fp8 = _info(capsys, "--model", str(dst))  # bandwidth measured
    # FP8 matrices (1 byte + block scales), bf16 embedding / head / norms / router
    assert 1.0 < fp8["bytes_per_weight"] < 2.0 and fp8["bandwidth_gb_s"] > 0 and "measured" in fp8["bandwidth_source"]
    assert main(["info", "--model", str(dst), "--bandwidth", "50"]) == 0
    out = capsys.readouterr().out
    assert "bytes per weight (as stored)" in out and "decode bound at batch 1" in out and "50.0 GB/s" in out
