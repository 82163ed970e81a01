"""Bad input gives one clear line naming the problem, exit status 2, no traceback (CLI and API)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import dsv3
from dsv3.cli import main
from dsv3.errors import UserError


def _cli(capsys, *argv):
    rc = main(list(argv))
    err = capsys.readouterr().err.strip()
    return rc, err


def test_good_checkpoint_is_reported(capsys, good):
    rc = main(["info", "--model", str(good)])
    out = capsys.readouterr().out
    assert rc == 0 and "names and shapes match" in out and "parameters (main, total)" in out


def test_missing_directory(capsys, tmp_path):
    for argv in (["info", "--model", str(tmp_path / "nope")], ["convert", str(tmp_path / "nope"), str(tmp_path / "out")]):
        rc, err = _cli(capsys, *argv)
        assert rc == 2 and "does not exist" in err and str(tmp_path / "nope") in err
        assert "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_llama_config_is_rejected(copy_checkpoint, capsys, good, tmp_path):
    d = copy_checkpoint(good, tmp_path / "llama")
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64}))
    for argv in (["info", "--model", str(d)], ["convert", str(d), str(tmp_path / "out")]):
        rc, err = _cli(capsys, *argv)
        assert rc == 2 and "'llama'" in err and "not a DeepSeek-V3 model" in err and len(err.splitlines()) == 1
    with pytest.raises(UserError, match="not a DeepSeek-V3 model"):
        dsv3.from_pretrained(d)


def test_wrong_shape_tensor(copy_checkpoint, capsys, good, tmp_path):
    d = copy_checkpoint(good, tmp_path / "shape")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    fname = index["weight_map"][name]
    from safetensors import safe_open

    with safe_open(str(d / fname), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[name] = torch.zeros(7, 3)
    save_file(tensors, str(d / fname), metadata={"format": "pt"})
    rc, err = _cli(capsys, "info", "--model", str(d))
    assert rc == 2 and name in err and "[7, 3]" in err and "wrong shape" in err and len(err.splitlines()) == 1
    with pytest.raises(UserError, match="kv_b_proj"):
        dsv3.from_pretrained(d)


def test_truncated_safetensors(copy_checkpoint, capsys, good, tmp_path):
    d = copy_checkpoint(good, tmp_path / "trunc")
    victim = sorted(d.glob("model-*.safetensors"))[1]
    os.truncate(victim, victim.stat().st_size - 50)
    for argv in (["info", "--model", str(d)], ["convert", str(d), str(tmp_path / "out")]):
        rc, err = _cli(capsys, *argv)
        assert rc == 2 and victim.name in err and "truncated or corrupt" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_missing_and_unexpected_tensors_are_named(copy_checkpoint, good, tmp_path):
    d = copy_checkpoint(good, tmp_path / "missing")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    name = "model.layers.2.mlp.experts.3.up_proj.weight"
    fname = index["weight_map"][name]
    from safetensors import safe_open

    with safe_open(str(d / fname), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != name}
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(d / fname), metadata={"format": "pt"})
    index["weight_map"].pop(name)
    index["weight_map"]["model.layers.1.self_attn.k_proj.weight"] = fname
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError) as e:
        dsv3.from_pretrained(d)
    msg = str(e.value)
    assert "model.layers.2.mlp.experts.up_proj (experts [3] missing)" in msg
    assert "unexpected tensors: model.layers.1.self_attn.k_proj.weight" in msg


def test_output_directory_not_empty(capsys, good, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("keep me")
    rc, err = _cli(capsys, "convert", str(good), str(out))
    assert rc == 2 and "not empty" in err and (out / "x").read_text() == "keep me"
