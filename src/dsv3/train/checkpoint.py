"""Training checkpoints: `OUTPUT/checkpoint/step-N/`, written atomically, the last K kept.

A checkpoint directory holds
    model.safetensors    model state (parameters + the fp32 routing-bias buffers)
    optimizer.pt         AdamW state
    trainer_state.pt     step, LR-scheduler state, data-loader position, RNG states
    config.resolved.yaml the run's resolved config
It is first written as `.tmp-step-N-PID/` (each file fsynced), then renamed to `step-N` in one
`os.rename`, so a run killed at any moment leaves either the complete new checkpoint or none:
`step-N` directories are always complete. Older checkpoints are deleted only after that rename.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from dsv3.config.load import dump_yaml
from dsv3.errors import UserError

_STEP_DIR = re.compile(r"^step-(\d+)$")
FILES = ("model.safetensors", "optimizer.pt", "trainer_state.pt", "config.resolved.yaml")


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
    final = root / f"step-{step}"
    if final.exists():  # re-saving a step after a resume: replace it, old copy removed only afterwards
        old = root / f".old-step-{step}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync(root)
    for _, path in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None) -> dict[str, Any]:
    """Restore model (and optimizer/scheduler when given) in place; returns trainer_state (step, loader, rng)."""
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
