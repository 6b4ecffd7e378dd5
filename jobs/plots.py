"""Plots every training job writes at its end (logged to MLflow as run artifacts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, its cache (the font list) in this node's scratch
    unless MPLCONFIGDIR is set: by default matplotlib writes `~/.cache/matplotlib` and
    `~/.config/matplotlib`, and nothing of seedpipe's belongs outside the root and Ray's temp dir."""
    import os

    from pipelines.storage import scratch_dir

    os.environ.setdefault("MPLCONFIGDIR", str(scratch_dir("matplotlib")))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(run_dir: Path) -> Path:
    """Loss curves from the rank-0 metric log `metrics.jsonl` (written whether or not MLflow is up)."""
    plt = pyplot()

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
