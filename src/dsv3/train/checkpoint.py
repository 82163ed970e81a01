"""Training checkpoints: `OUTPUT/checkpoint/step-N/`, written atomically, the last K kept.

A checkpoint directory holds
    model.safetensors    model state (parameters + the fp32 routing-bias buffers)
    optimizer.pt         AdamW state
    trainer_state.pt     step, LR-scheduler state, data-loader position, RNG states
    config.resolved.yaml the run's resolved config
    manifest.json        size and sha256 of every file above (written last, before the rename)
It is first written as `.tmp-step-N-PID/` (each file fsynced), then renamed to `step-N` in one
`os.rename`, so a run killed at any moment leaves either the complete new checkpoint or none.
Older checkpoints are deleted only after that rename.

`--resume` trusts nothing it cannot verify: `resume_checkpoint` checks the newest `step-N` against
its manifest (every file present, sizes and sha256 equal) and, when it is incomplete (an empty or
hand-made `step-N/`, no manifest) or fails verification (flipped or truncated bytes), says so in
one line and takes the newest one that verifies. Distributed (DCP) checkpoints carry the same
manifest over their own files.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from dsv3.config.load import dump_yaml
from dsv3.errors import UserError

_STEP_DIR = re.compile(r"^step-(\d+)$")
FILES = ("model.safetensors", "optimizer.pt", "trainer_state.pt", "config.resolved.yaml")
MANIFEST = "manifest.json"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoint"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Completed checkpoints under `root`, oldest first, as (step, path)."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(out)


def latest_checkpoint(root: str | Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def prune(root: str | Path, keep_last: int, step: int) -> None:
    """Delete all but the newest `keep_last` checkpoints up to `step` (the one just written). Newer
    ones can only be checkpoints a resume skipped as unverifiable; they are left alone."""
    older = [path for s, path in list_checkpoints(root) if s <= step]
    for path in older[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------- integrity
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def _hash_files(directory: Path, names: list[str]) -> dict[str, str]:
    """sha256 of each file (hashlib releases the GIL: the files are hashed in parallel)."""
    with ThreadPoolExecutor(max_workers=max(1, min(4, len(names)))) as ex:
        return dict(zip(names, ex.map(lambda n: _sha256(directory / n), names)))


def _present_files(directory: Path) -> list[str]:
    """Every file under `directory` but the manifest (links and other non-directories included), relative, sorted."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if not p.is_dir() and p.relative_to(directory).as_posix() != MANIFEST)


def write_manifest(directory: str | Path, step: int) -> None:
    """Write `manifest.json` (size + sha256 of every file under `directory`) and fsync it. Called on
    the temporary directory, after its files are written and before the rename to step-N."""
    directory = Path(directory)
    names = _present_files(directory)
    digests = _hash_files(directory, names)
    files = {n: {"bytes": (directory / n).stat().st_size, "sha256": digests[n]} for n in names}
    (directory / MANIFEST).write_text(json.dumps({"format": 1, "step": step, "files": files}, indent=1) + "\n")
    _fsync(directory / MANIFEST)


def verify_checkpoint(path: str | Path) -> str | None:
    """None when `path` holds exactly the files of its manifest (none missing, none unlisted) with the
    recorded sizes and sha256; otherwise why not, as a phrase ("is incomplete (...)" / "fails verification (...)")."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        empty = not any(path.iterdir())
        return f"is incomplete ({'empty' if empty else 'no ' + MANIFEST})"
    try:
        files = json.loads((path / MANIFEST).read_text(encoding="utf-8"))["files"]
        sizes = {str(n): int(m["bytes"]) for n, m in files.items()}
        digests = {str(n): str(m["sha256"]) for n, m in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return f"fails verification (unreadable {MANIFEST})"
    if not sizes or any(Path(n).is_absolute() or ".." in Path(n).parts for n in sizes):
        return f"fails verification (invalid {MANIFEST})"
    unlisted = [n for n in _present_files(path) if n not in sizes]
    if unlisted:
        more = f" and {len(unlisted) - 3} more" if len(unlisted) > 3 else ""
        return f"fails verification ({', '.join(unlisted[:3])}{more} not listed in {MANIFEST})"
    for name, size in sizes.items():
        f = path / name
        if not f.is_file():
            return f"is incomplete ({name} is missing)"
        if f.stat().st_size != size:
            return f"fails verification ({name} is {f.stat().st_size} bytes, the manifest says {size})"
    got = _hash_files(path, list(sizes))
    bad = [n for n in sizes if got[n] != digests[n]]
    if bad:
        return f"fails verification (sha256 of {', '.join(bad)} differs from the manifest)"
    return None


def resume_checkpoint(root: str | Path, log: Callable[[str], None]) -> Path | None:
    """The newest checkpoint under `root` that verifies (None when there is none at all). Newer ones
    that do not verify are reported in one line through `log`; if none verifies: UserError."""
    rejected = []
    for _, path in reversed(list_checkpoints(root)):
        why = verify_checkpoint(path)
        if why is None:
            if rejected:
                log(f"checkpoint {'; '.join(rejected)}: resuming from {path.name}, the newest one that verifies")
            return path
        rejected.append(f"{path.name} {why}")
    if rejected:
        raise UserError(f"--resume: no checkpoint under {root} verifies: {'; '.join(rejected)}")
    return None


def rng_state() -> dict[str, Any]:
    """Every RNG a run may draw from (torch CPU/CUDA, Python, NumPy)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, loader_state: dict, config: Any, keep_last: int) -> Path:
    """Write step-N atomically, then prune to the newest `keep_last` checkpoints. Returns the path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step-*"):  # left by a run killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"step": step, "scheduler": scheduler.state_dict(), "loader": loader_state, "rng": rng_state()},
               tmp / "trainer_state.pt")
    dump_yaml(config, tmp / "config.resolved.yaml")
    for name in FILES:
        _fsync(tmp / name)
    write_manifest(tmp, step)
    final = root / f"step-{step}"
    if final.exists():  # re-saving a step after a resume: replace it, old copy removed only afterwards
        old = root / f".old-step-{step}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync(root)
    prune(root, keep_last, step)
    return final


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None) -> dict[str, Any]:
    """Restore model (and optimizer/scheduler when given) in place; returns trainer_state (step, loader, rng).
    Loads what is there: `resume_checkpoint` is what verifies a checkpoint against its manifest."""
    path = Path(path)
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise UserError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    try:
        load_model(model, str(path / "model.safetensors"), strict=True, device=str(next(model.parameters()).device))
        trainer_state = torch.load(path / "trainer_state.pt", weights_only=True)
        if optimizer is not None:
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
        if scheduler is not None:
            scheduler.load_state_dict(trainer_state["scheduler"])
    except UserError:
        raise
    except Exception as e:  # corrupt/truncated files surface as many exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} is corrupt or does not match this model: {first[:300]}") from None
    return trainer_state


def load_dcp_checkpoint(path: Path, parts: list[torch.nn.Module], optimizer, scheduler) -> dict[str, Any]:
    """Fill `parts`, `optimizer` and `scheduler` from a DCP checkpoint directory written under any
    layout (`dsv3.parallel.dcp`); returns its trainer state (step, loader, rng)."""
    from dsv3.parallel import dcp as pdcp

    pdcp.load(path, parts, optimizer)
    state = torch.load(path / "trainer_state.pt", weights_only=True)
    scheduler.load_state_dict(state["scheduler"])
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr  # the DCP optimizer state holds the moments only, not the groups' current lr
    return state
