"""`dsv3.checkpoint.slices`: boxes of our tensors read straight from the shards equal the same boxes
of the whole-tensor load; FP8 boxes read only the scale blocks they touch and equal the reference
dequantisation; per-expert files are opened only for the experts of the box; transformers v5's fused
gate_up; `train.init_from` of an FP8 checkpoint initialises to its dequantisation and of a DCP
checkpoint to its weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

import dsv3
from dsv3.checkpoint.fp8 import weight_dequant_reference, weight_quant
from dsv3.checkpoint.reader import load_dir_config
from dsv3.checkpoint.slices import SliceReader
from test_checkpoint_fp8_convert import make_fp8_checkpoint

BOXES = [(slice(0, 300), slice(0, 260)), (slice(100, 250), slice(127, 129)), (slice(255, 257), slice(5, 6)), (slice(7, 7), slice(0, 9))]


@pytest.mark.parametrize("box", BOXES)
def test_fp8_box_equals_reference_dequant(tmp_path, tiny_config, box):
    w = torch.randn(300, 260) * 2
    q, s = weight_quant(w)
    save_file({"lm_head.weight": q, "lm_head.weight_scale_inv": s}, str(tmp_path / "model.safetensors"))
    r = SliceReader(tmp_path, tiny_config)
    got = r.read("lm_head.weight", box)
    assert torch.equal(got, weight_dequant_reference(q, s, dtype=torch.float32)[box])
    rows, cols = [b.stop - b.start for b in box]
    blocks = (-(-box[0].stop // 128) - box[0].start // 128) * (-(-box[1].stop // 128) - box[1].start // 128)
    assert r.bytes_read == (0 if rows * cols == 0 else rows * cols + 4 * blocks)  # 1-byte weights + touched fp32 scales


def test_boxes_equal_whole_tensor_load(good, tiny_config):
    cfg = load_dir_config(good)[0]
    ref = dsv3.from_pretrained(good, dtype=torch.float32, mtp=False).state_dict()
    r = SliceReader(good, cfg)
    name = "model.layers.1.mlp.experts.down_proj"
    box = (slice(2, 5), slice(3, 40), slice(1, 9))
    assert torch.equal(r.read(name, box), ref[name][box])
    assert sorted({n for n, _, _ in r.reads}) == [f"model.layers.1.mlp.experts.{e}.down_proj.weight" for e in (2, 3, 4)]
    assert all(shape == (37, 8) for _, shape, _ in r.reads)
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.kv_b_proj.weight", "model.norm.weight"):
        box = tuple(slice(n // 3, n - 1) for n in ref[name].shape)
        assert torch.equal(r.read(name, box), ref[name][box])


def test_fused_gate_up_boxes(tmp_path, tiny_config):
    cfg = dataclasses.replace(tiny_config, num_hidden_layers=2)
    E, I, D = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    fused = torch.randn(E, 2 * I, D)
    save_file({"model.layers.1.mlp.experts.gate_up_proj": fused}, str(tmp_path / "model.safetensors"))
    r = SliceReader(tmp_path, cfg)
    box = (slice(1, 3), slice(2, I), slice(0, 5))
    assert torch.equal(r.read("model.layers.1.mlp.experts.gate_proj", box), fused[:, :I][box])
    assert torch.equal(r.read("model.layers.1.mlp.experts.up_proj", box), fused[:, I:][box])


def test_init_from_fp8_is_its_dequantisation(good, tmp_path):
    from dsv3.train.init_from import load_init_weights

    fp8 = make_fp8_checkpoint(good, tmp_path / "fp8")
    cfg = dataclasses.replace(load_dir_config(good)[0], num_nextn_predict_layers=0)
    model = load_init_weights(cfg, tmp_path / "fp8", "cpu")
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    assert torch.equal(model.state_dict()[name], weight_dequant_reference(fp8[name], fp8[name + "_scale_inv"], dtype=torch.float32))
    ref = dsv3.from_pretrained(tmp_path / "fp8", dtype=torch.float32, quantization="none").state_dict()
    got = model.state_dict()
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_init_from_a_dcp_checkpoint(good, tmp_path, tiny_config):
    """A distributed run's step-N (DCP + trainer_state.pt + config.resolved.yaml + manifest, as
    `dsv3 train` writes it), read in one process: its weights."""
    from dsv3.config.load import dump_yaml, to_dict
    from dsv3.config.train import run_config_from_dict
    from dsv3.parallel import dcp as pdcp
    from dsv3.train.checkpoint import write_manifest
    from dsv3.train.init_from import load_init_weights

    cfg = dataclasses.replace(load_dir_config(good)[0], num_nextn_predict_layers=0)
    src = dsv3.from_pretrained(good, dtype=torch.float32, mtp=False)
    step = tmp_path / "run" / "checkpoint" / "step-3"
    pdcp.save(step, [src])
    dump_yaml(run_config_from_dict({"model": to_dict(cfg)}), step / "config.resolved.yaml")
    torch.save({"step": 3}, step / "trainer_state.pt")
    write_manifest(step, 3)
    model = load_init_weights(cfg, tmp_path / "run", "cpu")  # the run directory -> its latest checkpoint
    ref, got = src.state_dict(), model.state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_init_from_int8_is_its_dequantisation(good, tmp_path):
    """`dsv3 convert --quantize int8` files (per-row scales): the same weights as the whole-tensor dequantisation."""
    from dsv3.cli import main
    from dsv3.train.init_from import load_init_weights

    assert main(["convert", str(good), str(tmp_path / "i8"), "--quantize", "int8"]) == 0
    cfg = dataclasses.replace(load_dir_config(good)[0], num_nextn_predict_layers=0)
    got = load_init_weights(cfg, tmp_path / "i8", "cpu").state_dict()
    ref = dsv3.from_pretrained(tmp_path / "i8", dtype=torch.float32, quantization="none").state_dict()
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


def test_fill_a_model_kept_fp8(good, tmp_path):
    """A model whose linears stay FP8 (`dsv3.quant`, the inference default for FP8 files) is filled with the
    stored FP8 values and their scale blocks, as the whole-tensor loader fills it."""
    import copy

    from dsv3.checkpoint.slices import fill_module

    make_fp8_checkpoint(good, tmp_path / "fp8")
    model = dsv3.from_pretrained(tmp_path / "fp8", dtype=torch.float32, mtp=False)
    ref = model.state_dict()
    assert ref["model.layers.0.self_attn.kv_b_proj.weight"].dtype == torch.float8_e4m3fn
    blank = copy.deepcopy(model)
    for t in blank.state_dict().values():
        t.view(torch.uint8).zero_() if t.dtype == torch.float8_e4m3fn else t.zero_()
    r = SliceReader(tmp_path / "fp8", model.config)
    filled = fill_module(blank, r)
    assert "model.layers.1.mlp.experts.gate_proj_scale_inv" in filled and "model.layers.0.self_attn.kv_b_proj.weight_scale_inv" in filled
    got = blank.state_dict()
    for k, v in ref.items():
        same = torch.equal(got[k].view(torch.uint8), v.view(torch.uint8)) if v.dtype == torch.float8_e4m3fn else torch.equal(got[k], v)
        assert same, k


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_init_from_onto_cuda(good, tmp_path):
    """The boxes are read on the host and copied into the device's shards: the same weights as on CPU."""
    from dsv3.train.init_from import load_init_weights

    fp8 = tmp_path / "fp8"
    make_fp8_checkpoint(good, fp8)
    cfg = dataclasses.replace(load_dir_config(good)[0], num_nextn_predict_layers=0)
    cpu, gpu = load_init_weights(cfg, fp8, "cpu").state_dict(), load_init_weights(cfg, fp8, "cuda").state_dict()
    assert all(gpu[k].is_cuda and torch.equal(gpu[k].cpu(), v) for k, v in cpu.items())
