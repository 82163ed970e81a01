"""Plots of a GRPO run's metrics.jsonl (`dsv3 plot RUN_DIR`, and at the end of the run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable


def grpo_plots(records: list[dict[str, Any]], out_dir: Path, plt, save: Callable) -> list[Path]:
    """reward.png: mean reward, KL and logprob mismatch per GRPO step; loss.png: warm-up and policy losses."""
    grpo = [r for r in records if r["kind"] == "grpo"]
    paths = []
    if grpo:
        steps = [r["step"] for r in grpo]
        fig, axes = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
        axes[0].plot(steps, [r["reward_mean"] for r in grpo], lw=1.2)
        axes[0].set_ylabel("mean reward")
        axes[0].set_ylim(-0.02, 1.02)
        axes[1].plot(steps, [r["kl"] for r in grpo], lw=1)
        axes[1].set_ylabel("KL to reference")
        axes[2].plot(steps, [r["logprob_mismatch_tokens"] for r in grpo], lw=1, label="tokens not bit-equal")
        axes[2].plot(steps, [r["logprob_mismatch_max"] for r in grpo], lw=1, label="max |difference| (nats)")
        axes[2].set_ylabel("sampler vs trainer")
        axes[2].set_xlabel("step")
        axes[2].legend(fontsize=7)
        for ax in axes:
            ax.grid(alpha=0.3)
        paths.append(save(fig, out_dir / "reward.png"))
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3))
    for kind, label in (("sft", "format warm-up (cross-entropy)"), ("grpo", "GRPO policy loss")):
        rs = [r for r in records if r["kind"] == kind]
        if rs:
            ax.plot([r["step"] for r in rs], [r["loss"] for r in rs], lw=1, label=label)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    paths.append(save(fig, out_dir / "loss.png"))
    plt.close(fig)
    return paths
