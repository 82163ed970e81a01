"""The `dsv3` command line: verbs listed, help works, `dsv3 info` accounting."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from dsv3.cli import _available, main


def test_console_script_lists_the_verbs():
    exe = shutil.which("dsv3")
    cmd = [exe, "--help"] if exe else [sys.executable, "-m", "dsv3", "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    verbs = _available()
    assert "info" in verbs and "convert" in verbs
    for verb in verbs:
        assert verb in out.stdout


@pytest.mark.parametrize("verb", list(_available()))
def test_verb_help_exits_zero(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    assert "usage: dsv3 " + verb in capsys.readouterr().out


def test_unknown_verb_is_one_line(capsys):
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown verb 'frobnicate'" in err and len(err.splitlines()) == 1


def test_info_671b_preset(capsys):
    """The published figures: ~671.0B main, ~37B activated, ~11.6B MTP (README_WEIGHTS)."""
    assert main(["info", "--config", "deepseek_v3_671b", "--json"]) == 0
    acc = json.loads(capsys.readouterr().out)
    assert abs(acc["total"] / 1e9 - 671.0) < 0.5
    assert 36.5 < acc["activated"] / 1e9 < 38.0
    assert abs(acc["mtp"] / 1e9 - 11.6) < 0.1
    # 2 FLOPs per activated matmul parameter (embedding excluded) + attention at 4096 tokens
    assert 2 * (acc["activated"] - acc["embedding"]) < acc["flops_per_token"] < 2.5 * acc["activated"]


def test_info_counts_equal_a_real_model(tiny_config):
    """Meta-device accounting == numel of an allocated tiny model (no double counting of tied tensors)."""
    from dsv3.model import Transformer
    from dsv3.tools.info import account

    acc = account(tiny_config, seq_len=16)
    model = Transformer(tiny_config)
    main_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("model.mtp."))
    mtp_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.mtp."))
    assert (acc.total, acc.mtp) == (main_params, mtp_params)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n and not n.startswith("model.mtp."))
    frac = tiny_config.num_experts_per_tok / tiny_config.n_routed_experts
    assert acc.activated == round(main_params - experts * (1 - frac))


def test_info_table_and_set(capsys):
    assert main(["info", "--config", "tiny", "--set", "model.num_hidden_layers=2"]) == 0
    out = capsys.readouterr().out
    assert "parameters activated per token" in out and "MTP parameters" in out


@pytest.mark.parametrize("flags", [[], ["-q"]], ids=["plain", "-q"])
def test_pytest_prints_its_summary_line(tmp_path, flags):
    """The project's pytest settings: `pytest` and `pytest -q` both end with the "N passed" line."""
    from pathlib import Path

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    (tmp_path / "test_one.py").write_text("def test_ok():\n    pass\n")
    r = subprocess.run([sys.executable, "-m", "pytest", *flags, "-p", "no:cacheprovider", "-c", str(pyproject),
                        "--rootdir", str(tmp_path), str(tmp_path / "test_one.py")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "1 passed" in r.stdout.strip().splitlines()[-1], r.stdout


def test_version():
    import dsv3

    out = subprocess.run([sys.executable, "-m", "dsv3", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"dsv3 {dsv3.__version__}", (out.stdout, out.stderr)


@pytest.mark.parametrize("value,expect", [
    ("/no/such/ckpt", "{y}: load_checkpoint /no/such/ckpt: no such checkpoint directory"),
    ("[a, b]", "{y}: load_checkpoint is a list, expected a path (the checkpoint directory or file)"),
], ids=["missing-dir", "not-a-path"])
def test_predict_yaml_bad_load_checkpoint_names_the_key_and_file(tmp_path, value, expect):
    """`dsv3 generate --config predict.yaml`: a bad load_checkpoint is reported as that YAML key of that
    file (it was reported as --model, which the user never passed), in one line."""
    y = tmp_path / "predict.yaml"
    y.write_text(f"load_checkpoint: {value}\nseed: 0\n")
    r = subprocess.run([sys.executable, "-m", "dsv3", "generate", "--config", str(y), "--input", "hi"],
                       capture_output=True, text=True, timeout=300)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and err[0] == f"dsv3 generate: error: {expect.format(y=y)}", r.stderr
