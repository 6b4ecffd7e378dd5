"""Plots every training job writes at its end (logged to MLflow as run artifacts)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_losses(run_dir: Path) -> Path:
    """Loss curves from the rank-0 metric log `metrics.jsonl` (written whether or not MLflow is up)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history: dict[str, dict[int, float]] = {}
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            for k, v in rec["metrics"].items():
                if k.startswith(("loss", "eval/")) or k in ("itc", "vq", "recon", "gen"):
                    history.setdefault(k, {})[rec["step"]] = v  # a resumed run rewrites its steps
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, by_step in sorted(history.items()):
        steps = sorted(by_step)
        ax.plot(steps, [by_step[s] for s in steps], label=k)
    ax.set(xlabel="step", title="training curves")
    if history:
        ax.legend()
    fig.tight_layout()
    out = run_dir / "loss_curves.png"
    fig.savefig(out)
    plt.close(fig)
    return out
