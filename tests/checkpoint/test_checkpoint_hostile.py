"""Hostile checkpoint directories (issue 10 item 9): shard paths outside the directory, absurd
config.json values and a layer count the tensors do not have are refused with one line, before
anything is built, by every loader (`dsv3 info`, `dsv3 generate`, `dsv3.from_pretrained`) and by
`dsv3 convert`, which therefore never writes an unloadable checkpoint."""

from __future__ import annotations

import json
import math

import pytest

import dsv3
from dsv3.cli import main
from dsv3.errors import UserError


def _refused(capsys, d, out, *needles):
    """`dsv3 info`, `dsv3 convert` and `dsv3 generate` each exit 2 with one line holding `needles`."""
    for argv in (["info", "--model", str(d)], ["convert", str(d), str(out)],
                 ["generate", "--model", str(d), "--input", "hi", "--max-tokens", "1", "--device", "cpu"]):
        rc = main(argv)
        err = capsys.readouterr().err.strip()
        assert rc == 2, (argv, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        for n in needles:
            assert n in err, (argv, err)
    assert not out.exists()


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_shard_paths_are_confined(copy_checkpoint, capsys, good, tmp_path, shard):
    d = copy_checkpoint(good, tmp_path / "ckpt")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    if shard.startswith(".."):  # a real shard outside the directory: it would load without the check
        (tmp_path / "outside.safetensors").write_bytes((d / index["weight_map"][name]).read_bytes())
    index["weight_map"][name] = shard
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    _refused(capsys, d, tmp_path / "out", repr(shard), "inside the checkpoint directory")
    with pytest.raises(UserError, match="inside the checkpoint directory"):
        dsv3.from_pretrained(d)


ABSURD = {
    "num_hidden_layers": (1_000_000, "num_hidden_layers 1000000 is out of range"),
    "n_routed_experts": (1e9, "n_routed_experts 1000000000 is out of range"),
    "hidden_size": (-64, "hidden_size -64 is out of range"),
    "moe_intermediate_size": (0, "moe_intermediate_size 0 is out of range"),
    "num_experts_per_tok": (9, "num_experts_per_tok 9 must be in [1, n_routed_experts=8]"),
    "n_group": (0, "n_group 0 is out of range"),
    "n_group ": (3, "not divisible by n_group 3"),
    "rms_norm_eps": (math.inf, "rms_norm_eps inf must be a finite number"),
    "rope_parameters.rope_theta": (math.nan, "rope_theta nan must be a finite number"),
    "rope_parameters.factor": (math.nan, "rope_scaling: factor nan must be a finite number"),
    "rope_parameters.beta_fast": (-math.inf, "rope_scaling: beta_fast -inf must be a finite number"),
    "eos_token_id": (600, "eos_token_id 600 must be in [0, vocab_size=512)"),
}


@pytest.mark.parametrize("key", list(ABSURD))
def test_absurd_config_values_are_refused_before_building(copy_checkpoint, capsys, good, tmp_path, monkeypatch, key):
    value, needle = ABSURD[key]
    d = copy_checkpoint(good, tmp_path / "ckpt")
    cfg = json.loads((d / "config.json").read_text())
    if key.startswith("rope_parameters."):  # transformers v5 keeps rope_theta and YaRN's values here
        cfg["rope_parameters"][key.split(".")[1]] = value
    else:
        cfg[key.strip()] = value
    (d / "config.json").write_text(json.dumps(cfg))  # NaN/Infinity as Python's json writes them

    import dsv3.model.transformer as tr

    def no_build(*a, **k):
        raise AssertionError("a model was built from an invalid config")

    monkeypatch.setattr(tr.Transformer, "__init__", no_build)
    _refused(capsys, d, tmp_path / "out", "config.json", needle)
    with pytest.raises(UserError, match="config.json"):
        dsv3.from_pretrained(d)


def test_layer_count_is_checked_against_the_tensors(copy_checkpoint, capsys, good, tmp_path, monkeypatch):
    """A config claiming more layers than the tensors hold (within the ranges) is refused from the
    file headers alone: no module is built, no tensor allocated."""
    import dsv3.model.transformer as tr

    d = copy_checkpoint(good, tmp_path / "ckpt")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 900
    (d / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(tr.Transformer, "__init__", lambda *a, **k: (_ for _ in ()).throw(AssertionError("built")))
    _refused(capsys, d, tmp_path / "out", "num_hidden_layers is 900", "hold 3 layer(s)")
    with pytest.raises(UserError, match="num_hidden_layers is 900"):
        dsv3.from_pretrained(d)
    cfg["num_hidden_layers"] = 2  # fewer: layer 2 would be taken for an MTP layer the config does not declare
    (d / "config.json").write_text(json.dumps(cfg))
    _refused(capsys, d, tmp_path / "out", "layers up to 2", "allows 2")


def test_convert_refuses_a_config_its_tensors_do_not_match(copy_checkpoint, capsys, good, tmp_path):
    """`dsv3 convert` validated only config.json before; now names and shapes too, so what it writes loads."""
    d = copy_checkpoint(good, tmp_path / "ckpt")
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_routed_experts"], cfg["n_group"], cfg["topk_group"] = 16, 4, 2  # the files hold 8 experts per layer
    (d / "config.json").write_text(json.dumps(cfg))
    rc = main(["convert", str(d), str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "does not match config.json" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
