"""`dsv3 plot RUN_DIR`: PNG plots of a run's metrics.jsonl (also written at the end of training).

* loss.png: training loss and its parts (main, MTP, balance) and the validation loss over steps.
* expert_load.png: max/mean expert load of every MoE layer over steps (1.0 = perfectly balanced),
  each named as the run logged it ("layer N", "MTP k").
* lr.png: the learning rate.
* a GRPO run (`dsv3.rl`): reward.png (mean reward, KL to the reference, sampler/trainer logprob
  mismatch per step) and loss.png (its warm-up and policy losses) instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dsv3.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a training output directory (holding metrics.jsonl)")
    p.add_argument("--out", default=None, help="where to write the PNGs (default RUN_DIR/plots)")


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)
    return path


PLOTS_HINT = "pip install matplotlib, or pip install 'dsv3[train]'"


def plots_after_training(run_dir: str | Path, log) -> list[Path]:
    """The end of `dsv3 train`: write the plots, or, without matplotlib (a base install), say in one
    line how to get them -- the run's results are all written already, so this never fails the run."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log(f"plots skipped: matplotlib is not installed ({PLOTS_HINT}; then: dsv3 plot {run_dir})")
        return []
    return write_plots(run_dir)


def write_plots(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Write the PNGs; returns their paths."""
    try:
        import matplotlib
    except ImportError:
        raise UserError(f"plots need matplotlib: {PLOTS_HINT}") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dsv3.train.metrics import read_metrics

    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl (is it a `dsv3 train` output directory?)")
    recs = read_metrics(run_dir)
    # a resumed run may repeat steps: the last record of each (kind, step) wins
    last = {(r.get("kind", "train"), r.get("step")): r for r in recs}
    train = sorted((r for (k, _), r in last.items() if k == "train"), key=lambda r: r["step"])
    evals = sorted((r for (k, _), r in last.items() if k == "eval"), key=lambda r: r["step"])
    rl = sorted((r for (k, _), r in last.items() if k in ("grpo", "sft")), key=lambda r: r["step"])
    if not train and not evals and not rl:
        raise UserError(f"{run_dir}/metrics.jsonl has no records yet")
    out_dir = Path(out) if out else run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    if rl:  # a GRPO run (`dsv3.rl`)
        from dsv3.rl.plot import grpo_plots

        return grpo_plots(rl, out_dir, plt, _save)
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in train]
    for key, label in (("loss", "train total"), ("lm_loss", "train main"), ("mtp_loss", "train MTP (scaled)")):
        if train:
            ax.plot(steps, [r[key] for r in train], label=label, lw=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["valid_loss"] for r in evals], "o-", label="validation", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(_save(fig, out_dir / "loss.png"))
    plt.close(fig)

    loads = [r for r in train if r.get("expert_load")]
    if loads:
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, ys in expert_load_series(loads):
            ax.plot([r["step"] for r in loads], ys, label=label, lw=1)
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_xlabel("step")
        ax.set_ylabel("max / mean expert load")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        paths.append(_save(fig, out_dir / "expert_load.png"))
        plt.close(fig)

    if train:
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.plot(steps, [r["lr"] for r in train], lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("learning rate")
        ax.grid(alpha=0.3)
        paths.append(_save(fig, out_dir / "lr.png"))
        plt.close(fig)
    return paths


def expert_load_series(loads: list[dict]) -> list[tuple[str, list[float]]]:
    """(legend label, max/mean load per record) of every MoE layer: the run's own layer names
    ("layer N", "MTP k"); metrics written before they were recorded name the position only."""
    n = len(loads[0]["expert_load"])
    named = (r["expert_load_layers"] for r in reversed(loads) if len(r.get("expert_load_layers") or ()) == n)
    labels = next(named, None) or [f"MoE module #{i}" for i in range(n)]
    return [(labels[i], [r["expert_load"][i] for r in loads]) for i in range(n)]


def run(args: argparse.Namespace) -> int:
    for p in write_plots(args.run_dir, args.out):
        print(p)
    return 0
