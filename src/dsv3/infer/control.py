"""Weights without a restart, and pausing generation: the `LLMEngine` methods a reinforcement-learning
trainer drives (the names of SGLang's and vLLM's weight-sync APIs; docs/serving.md maps them).

    engine.update_weights("ckpt/step-100")             # an HF or dsv3 checkpoint directory
    engine.update_weights(trainer_model.state_dict())  # or dsv3 parameter names -> tensors (a subset is fine)
    engine.weight_version                               # "1": every RequestOutput carries it too

An update is checked and staged in full first (`dsv3.infer.weights`): a wrong name, shape or
architecture refuses it with one `UserError` line and nothing changes. Then, between two steps, the
tensors are written in place (modules run quantised are requantised with their own scheme; the native
kernels repack once, on their next call), the runner recomputes its absorbed MLA weights, the prefix
cache is emptied and the running sequences are sent back to be recomputed from their tokens: every
token sampled after the update comes from the new weights over a KV cache the new weights computed.

Pausing (`pause_generation(mode)`, SGLang's modes): "abort" ends every request at once with
finish_reason "abort"; "wait" admits no new request and lets the running ones finish; "keep" freezes
the running ones where they are (their KV stays in the cache; an update in between has them
recomputed with the new weights). New requests during a pause are queued and start on
`continue_generation()`. All of these run in the thread that calls `step()` (or while it does not).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import torch

from dsv3.errors import UserError
from dsv3.infer import weights as W

PAUSE_MODES = ("abort", "wait", "keep")
MAX_VERSION_CHARS = 128


class ControlMixin:
    """Weight updates and pause / resume for `LLMEngine`."""

    def _init_control(self) -> None:
        self.weight_version = "0"  # of the weights loaded at start
        self.paused: Optional[str] = None  # None, or the mode of the pause in force
        self._updates = 0

    def update_weights(self, source: str | Path | Mapping[str, torch.Tensor], version: str | None = None) -> str:
        """Serve new weights from `source` (a checkpoint directory, or a mapping of dsv3 parameter names
        to tensors: all of them or a subset) without a restart -> the new weight version (`version`,
        else the old one plus one when it is a number, else the count of updates). Call it from the
        thread that steps the engine (a server stages in a worker thread and applies between steps:
        `stage_weights` then `apply_weights`)."""
        return self.apply_weights(self.stage_weights(source, version), version)

    def stage_weights(self, source: str | Path | Mapping[str, torch.Tensor], version: str | None = None) -> W.Staged:
        """Read, check and (for quantised modules) quantise an update without touching the served
        weights (safe while another thread steps the engine); `UserError` on anything wrong."""
        check_version(version)
        if getattr(self.runner, "parallel", None) is not None:
            raise UserError("update_weights: a tensor/expert-parallel engine cannot take new weights in place yet; "
                            "restart it on the new checkpoint")
        if isinstance(source, (str, Path)):
            return W.stage_dir(source, self.model, self.dtype, self.device)
        return W.stage_tensors(source, self.model, self.dtype, self.device)

    def apply_weights(self, staged: W.Staged, version: str | None = None) -> str:
        """Write a staged update (between steps), recompute what derives from the weights, flush the
        prefix cache, recompute the running sequences -> the new weight version."""
        check_version(version)
        W.apply(self.model, staged)
        self.runner.refresh_weights()
        self.flush_cache()
        self._updates += 1
        self.weight_version = version if version is not None else _next_version(self.weight_version, self._updates)
        return self.weight_version

    def flush_cache(self) -> None:
        """Empty the prefix cache; the running sequences are recomputed from their tokens on the next step
        (their cached latents may come from other weights)."""
        self.recompute_running()
        self.cache.allocator.cached.clear()
        self.cache.allocator.block_hash = [None] * self.cache.allocator.num_blocks

    def pause_generation(self, mode: str = "abort") -> None:
        """Pause: "abort" ends every request now (finish_reason "abort"), "wait" lets the running ones
        finish and admits none, "keep" freezes the running ones (resumed by `continue_generation`)."""
        if mode not in PAUSE_MODES:
            raise UserError(f"pause mode must be one of {', '.join(PAUSE_MODES)}, got {mode!r:.40}")
        if mode == "abort":
            with self._lock:
                ids = list(self._requests) + [r.request_id for r in self._new]
            self.abort_request(ids)
        self.paused = mode
        self.scheduler.admitting = False

    def continue_generation(self) -> None:
        """End a pause: frozen sequences go on, queued requests are admitted."""
        self.paused = None
        self.scheduler.admitting = True

    def generation_idle(self) -> bool:
        """Whether a pause is complete: nothing runs (under "wait": the running requests have finished)."""
        return self.paused is not None and (self.paused == "keep" or not self.scheduler.running)


def check_version(version: str | None) -> None:
    if version is not None and (not isinstance(version, str) or not version or len(version) > MAX_VERSION_CHARS
                                or not version.isprintable()):
        raise UserError(f"weight version must be a printable string of 1-{MAX_VERSION_CHARS} characters, "
                        f"got {version!r:.60}")


def _next_version(old: str, updates: int) -> str:
    return str(int(old) + 1) if old.isdigit() else str(updates)
