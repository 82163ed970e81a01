"""DeepSeek-V3.1's UE8M0 FP8 scales: `dsv3 convert --to fp8 --scale-fmt ue8m0` writes power-of-two block
scales and `quantization_config.scale_fmt`, and the checkpoint loads with the logits of its own
dequantised weights."""

from __future__ import annotations

import json

import torch

import dsv3
from dsv3.checkpoint.fp8 import weight_dequant, weight_quant
from dsv3.checkpoint.reader import CheckpointReader
from dsv3.cli import main
from hf_oracle import make_hf_checkpoint


def test_weight_quant_ue8m0_scales_are_powers_of_two():
    w = torch.randn(300, 260) * 0.05
    q, s = weight_quant(w, scale_fmt="ue8m0")
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)
    q0, s0 = weight_quant(w)
    assert (s >= s0).all() and (s < 2 * s0).all()  # rounded up, by less than one binade
    assert torch.isfinite(q.float()).all()
    err = (weight_dequant(q, s, dtype=torch.float32) - w).abs().max()
    assert err <= 0.13 * w.abs().max()  # e4m3 step at most doubled by the coarser scale


def test_convert_ue8m0_round_trip(tmp_path, capsys):
    make_hf_checkpoint(tmp_path / "hf", max_shard_size="200KB", hidden_size=128, intermediate_size=256,
                       moe_intermediate_size=128, q_lora_rank=128, kv_lora_rank=128)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "fp8"), "--to", "fp8", "--scale-fmt", "ue8m0"]) == 0
    conf = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert conf["quantization_config"]["scale_fmt"] == "ue8m0"
    reader = CheckpointReader(tmp_path / "fp8")
    scales = [reader.tensor(n) for n in reader.names() if n.endswith("_scale_inv")]
    assert len(scales) > 10 and all(torch.equal(torch.exp2(torch.log2(s).round()), s) for s in scales)
    reader.close()
    assert main(["convert", str(tmp_path / "fp8"), str(tmp_path / "deq"), "--dtype", "float32"]) == 0
    fp8 = dsv3.from_pretrained(tmp_path / "fp8", dtype=torch.float32)
    deq = dsv3.from_pretrained(tmp_path / "deq", dtype=torch.float32)
    ids = torch.randint(0, 512, (1, 40))
    with torch.no_grad():
        assert (fp8(ids) - deq(ids)).abs().max().item() <= 1e-4


def test_scale_fmt_needs_fp8_output(tmp_path, capsys):
    make_hf_checkpoint(tmp_path / "hf")
    capsys.readouterr()  # transformers' save progress
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "out"), "--scale-fmt", "ue8m0"]) == 2
    assert capsys.readouterr().err.strip() == "dsv3 convert: error: --scale-fmt ue8m0 applies to FP8 output only (add --to fp8)"
    assert not (tmp_path / "out").exists()
