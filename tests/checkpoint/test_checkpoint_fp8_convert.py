"""FP8 block dequantisation (fast vs reference) and the `dsv3 convert` verb."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import dsv3
from dsv3.checkpoint.convert import convert
from dsv3.checkpoint.fp8 import weight_dequant, weight_dequant_reference, weight_quant
from dsv3.checkpoint.reader import CheckpointReader
from dsv3.cli import main
from hf_oracle import add_mtp_layer, make_hf_checkpoint

QUANTISED = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("shape", [(256, 384), (300, 200), (576, 130), (5, 7)])
def test_dequant_fast_equals_reference(shape):
    w = torch.randn(shape) * 3
    q, s = weight_quant(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    fast, ref = weight_dequant(q, s, dtype=torch.float32), weight_dequant_reference(q, s, dtype=torch.float32)
    assert torch.equal(fast, ref)
    err = (ref - w).abs()  # e4m3 keeps 3 mantissa bits: relative error <= 1/16 away from subnormals
    assert err.max() <= 0.07 * w.abs().max() and (err / w.abs()).median() < 0.04
    # each block really has its own scale
    if shape[0] > 128:
        assert not torch.equal(s[0], s[1])


def make_fp8_checkpoint(src, dst):
    """Quantise every attention/MLP/expert matrix of an HF checkpoint like DeepSeek's release."""
    dst.mkdir()
    reader = CheckpointReader(src)
    tensors = {}
    for name in reader.names():
        t = reader.tensor(name)
        if t.dim() == 2 and name.split(".")[-2] in QUANTISED:
            tensors[name], tensors[name + "_scale_inv"] = weight_quant(t)
        else:
            tensors[name] = t.bfloat16() if "e_score_correction_bias" not in name else t
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    cfg["torch_dtype"] = "bfloat16"
    (dst / "config.json").write_text(json.dumps(cfg))
    return tensors


def test_fp8_checkpoint_converts_and_loads(tmp_path, capsys):
    hf = make_hf_checkpoint(tmp_path / "hf")
    add_mtp_layer(tmp_path / "hf", hf)
    fp8 = make_fp8_checkpoint(tmp_path / "hf", tmp_path / "fp8")
    assert main(["convert", str(tmp_path / "fp8"), str(tmp_path / "bf16"), "--max-shard-size", "50KB"]) == 0
    out = CheckpointReader(tmp_path / "bf16")
    assert not any(n.endswith("_scale_inv") for n in out.meta)
    name = "model.layers.1.mlp.experts.5.down_proj.weight"
    expect = weight_dequant_reference(fp8[name], fp8[name + "_scale_inv"], dtype=torch.bfloat16)
    assert out.tensor(name).dtype == torch.bfloat16 and torch.equal(out.tensor(name), expect)
    assert out.tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
    conf = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "quantization_config" not in conf and conf["torch_dtype"] == "bfloat16"
    # loading the FP8 files with quantization="none" dequantises on the fly to the same weights
    # (by default they stay FP8: tests/quant/test_quant_fp8.py)
    direct = dsv3.from_pretrained(tmp_path / "fp8", dtype=torch.float32, quantization="none")
    converted = dsv3.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    for (n, a), (_, b) in zip(direct.state_dict().items(), converted.state_dict().items()):
        if "e_score" not in n:
            assert torch.equal(a.bfloat16(), b.bfloat16()), n
    # and the dequantised model is close to the original (FP8 error only)
    ids = torch.randint(0, hf.config.vocab_size, (1, 40))
    with torch.no_grad():
        ref, got = hf(ids).logits, converted(ids)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 0.3, rel  # FP8 rounding of every matrix, plus the routing flips it causes
    # transformers reads the converted directory as a plain (non-quantised) checkpoint
    from transformers import DeepseekV3ForCausalLM

    tf = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    assert tf.model.layers[1].mlp.experts.down_proj.dtype == torch.float32


def test_convert_hf_dsv3_hf_is_bit_exact(tmp_path):
    hf = make_hf_checkpoint(tmp_path / "hf")
    add_mtp_layer(tmp_path / "hf", hf)
    convert(tmp_path / "hf", tmp_path / "ours", to="dsv3", max_shard_size="100KB")
    ours = CheckpointReader(tmp_path / "ours")
    assert "model.mtp.0.block.mlp.experts.gate_proj" in ours.meta and "model.layers.3.enorm.weight" not in ours.meta
    convert(tmp_path / "ours", tmp_path / "back", to="hf", max_shard_size="30KB")
    a, b = CheckpointReader(tmp_path / "hf"), CheckpointReader(tmp_path / "back")
    assert sorted(a.meta) == sorted(b.meta)
    for n in a.meta:
        assert torch.equal(a.tensor(n), b.tensor(n)), n
    m1 = dsv3.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    m2 = dsv3.from_pretrained(tmp_path / "ours", dtype=torch.float32)
    for (n, x), (_, y) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(x, y), n


@pytest.mark.parametrize("shard", [None, "2MB"])
def test_train_checkpoint_to_hf(tmp_path, tiny_config, shard):
    """A `dsv3 train` checkpoint (model.safetensors in our layout + config.resolved.yaml) converts to HF,
    at the default shard size too: the MTP copies of the embedding/head then share one shard with the
    tensors they copy (safetensors refused that: "Some tensors share memory")."""
    import dataclasses

    from safetensors.torch import save_model

    from dsv3.config.load import dump_yaml
    from dsv3.model import Transformer

    cfg = dataclasses.replace(tiny_config, vocab_size=512)
    model = Transformer(cfg)
    model.reset_parameters(std=0.05)
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
    step = tmp_path / "checkpoint" / "step-10"
    step.mkdir(parents=True)
    save_model(model, str(step / "model.safetensors"))
    dump_yaml({"model": cfg, "train": {"steps": 10}}, step / "config.resolved.yaml")
    assert cfg.num_nextn_predict_layers == 1
    assert main(["convert", str(step), str(tmp_path / "hf"), *(["--max-shard-size", shard] if shard else [])]) == 0
    model.save_pretrained(tmp_path / "direct", max_shard_size=shard or "5GB")
    if shard is None:
        assert (tmp_path / "hf" / "model.safetensors").is_file()  # one shard holds the tensors and their copies
    a, b = CheckpointReader(tmp_path / "hf"), CheckpointReader(tmp_path / "direct")
    assert sorted(a.meta) == sorted(b.meta)
    for n in a.meta:
        assert torch.equal(a.tensor(n), b.tensor(n)), n
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    loaded = dsv3.from_pretrained(step, dtype=torch.float32)
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model.eval()(ids))


def test_seed_fp8_cast_bf16_flag_names(tmp_path):
    """The seed's `fp8_cast_bf16.py --input-fp8-hf-path X --output-bf16-hf-path Y` line, as `dsv3 convert` flags
    (the real CLI): the same bf16 directory as `dsv3 convert X Y`; a path given twice or missing is one line."""
    import subprocess
    import sys

    hf = make_hf_checkpoint(tmp_path / "hf")
    add_mtp_layer(tmp_path / "hf", hf)
    make_fp8_checkpoint(tmp_path / "hf", tmp_path / "fp8")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "dsv3", "convert", *map(str, args)], capture_output=True, text=True, timeout=300)

    r = cli("--input-fp8-hf-path", tmp_path / "fp8", "--output-bf16-hf-path", tmp_path / "seed")
    assert r.returncode == 0, r.stderr
    assert cli(tmp_path / "fp8", tmp_path / "plain").returncode == 0
    seed, plain = CheckpointReader(tmp_path / "seed"), CheckpointReader(tmp_path / "plain")
    assert sorted(seed.meta) == sorted(plain.meta) and not any(n.endswith("_scale_inv") for n in seed.meta)
    assert all(torch.equal(seed.tensor(n), plain.tensor(n)) for n in seed.meta)
    assert json.loads((tmp_path / "seed" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for args, want in [((tmp_path / "fp8", tmp_path / "x", "--input-fp8-hf-path", tmp_path / "fp8"), "SRC given twice"),
                       (("--output-bf16-hf-path", tmp_path / "y"), "give SRC")]:
        r = cli(*args)
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1 and want in err[0], r.stderr
