"""Training checkpoints carry a manifest (size + sha256 per file) and `dsv3 train --resume` trusts
only what verifies (issue 10 item 6): flipped bytes or an empty newer `step-N/` are reported in one
line and the run resumes, bit-identically, from the newest checkpoint that verifies."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from dsv3.cli import main as cli_main
from dsv3.train import checkpoint

from run_config import train_losses


def _copy_run(reference, dst):
    shutil.copytree(reference["out"], dst)
    conf = yaml.safe_load((dst / "config.resolved.yaml").read_text())
    conf["checkpoint"]["output_dir"] = str(dst)
    path = dst.parent / f"{dst.name}.yaml"
    path.write_text(yaml.safe_dump(conf))
    return path


def test_manifest_lists_every_file_with_its_sha256(reference):
    ckpt = checkpoint.latest_checkpoint(checkpoint.checkpoint_root(reference["out"]))
    manifest = json.loads((ckpt / checkpoint.MANIFEST).read_text())
    assert manifest["step"] == 6 and sorted(manifest["files"]) == sorted(checkpoint.FILES)
    assert all(len(m["sha256"]) == 64 and m["bytes"] > 0 for m in manifest["files"].values())
    assert checkpoint.verify_checkpoint(ckpt) is None


def test_resume_skips_corrupt_and_empty_checkpoints(reference, tmp_path, capsys):
    run = tmp_path / "run"
    conf = _copy_run(reference, run)
    root = checkpoint.checkpoint_root(run)
    w = root / "step-6" / "model.safetensors"
    data = bytearray(w.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])  # 64 flipped bytes, same size
    w.write_bytes(bytes(data))
    (root / "step-99").mkdir()  # an empty newer directory must not block the resume
    rc = cli_main(["train", "--config", str(conf), "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 0, err
    notes = [ln for ln in err if "verif" in ln]
    assert len(notes) == 1, err
    assert notes[0] == ("checkpoint step-99 is incomplete (empty); step-6 fails verification (sha256 of "
                        "model.safetensors differs from the manifest): resuming from step-3, the newest one that verifies")
    # steps 4..6 were trained again from step-3: the same losses as the uninterrupted run
    assert train_losses(run) == reference["losses"]
    assert checkpoint.verify_checkpoint(root / "step-6") is None  # rewritten, verified again
    assert (root / "step-99").is_dir() and (root / "step-3").is_dir()  # a skipped newer dir is left alone, not pruned


def test_pruning_keeps_the_new_checkpoint_below_a_skipped_newer_one(tmp_path):
    root = tmp_path / "checkpoint"
    for s in (3, 6, 99):
        (root / f"step-{s}").mkdir(parents=True)
    checkpoint.prune(root, keep_last=1, step=6)
    assert [s for s, _ in checkpoint.list_checkpoints(root)] == [6, 99]


def _list_only_config(step_dir):
    m = json.loads((step_dir / checkpoint.MANIFEST).read_text())
    m["files"] = {"config.resolved.yaml": m["files"]["config.resolved.yaml"]}
    (step_dir / checkpoint.MANIFEST).write_text(json.dumps(m))
    return "model.safetensors, optimizer.pt, trainer_state.pt not listed in manifest.json"


def _add_unlisted_file(step_dir):
    (step_dir / "extra.pt").write_bytes(b"not written by dsv3")
    return "extra.pt not listed in manifest.json"


@pytest.mark.parametrize("tamper", [_list_only_config, _add_unlisted_file], ids=["partial-manifest", "unlisted-file"])
def test_manifest_must_cover_every_file(reference, tmp_path, capsys, tamper):
    """A manifest listing only some files (the others then never checked), or a file it does not
    list, fails verification: `--resume` says so in one line and takes step-3."""
    run = tmp_path / "run"
    conf = _copy_run(reference, run)
    root = checkpoint.checkpoint_root(run)
    why = tamper(root / "step-6")
    assert checkpoint.verify_checkpoint(root / "step-6") == f"fails verification ({why})"
    rc = cli_main(["train", "--config", str(conf), "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 0, err
    assert [ln for ln in err if "verif" in ln] == [
        f"checkpoint step-6 fails verification ({why}): resuming from step-3, the newest one that verifies"]
