"""Codebook usage over a stage-2 run, dead codes, and the opt-in dead-code re-seeding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from jobs.trainer import collective_device


class CodeUsage:
    """Code histogram over the run and over a sliding window; the opt-in dead-code re-seeding.

    Dead codes (never chosen in the last `window` steps, all ranks counted) are a known risk of VQ
    training that the public SEED code never measures. With `reseed`, they are overwritten with
    projected encoder outputs of the current batch (rank 0 picks, all ranks receive the same
    vectors) and their Adam moments are zeroed, so stale momentum does not drag them back. The
    write goes through DeepSpeed's full-fp32-parameter API, so the optimizer's master copy (ZeRO
    1-3, bf16) agrees, and into the module's own weight where it holds the full tensor (ZeRO 0-2),
    so the very next forward already sees the new codes. The counts are checkpointed.
    """

    MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's state, the trainer's optimizer

    def __init__(self, num_codes: int, *, window: int, reseed: bool, world: int) -> None:
        self.total = torch.zeros(num_codes, dtype=torch.long)
        self.window_counts = torch.zeros(num_codes, dtype=torch.long)
        self.window, self.reseed, self.world = window, reseed, world
        self.reseeded = 0

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total.tolist(), "window_counts": self.window_counts.tolist(),
                "reseeded": self.reseeded}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total = torch.tensor(state["total"], dtype=torch.long)
        self.window_counts = torch.tensor(state["window_counts"], dtype=torch.long)
        self.reseeded = int(state["reseeded"])

    def on_step(self, engine: Any, out: Any, step: int) -> dict[str, float]:
        import torch.distributed as dist

        counts = torch.bincount(out.codes.reshape(-1), minlength=self.total.numel())
        if self.world > 1:
            counts = counts.to(collective_device())
            dist.all_reduce(counts)
        counts = counts.cpu()
        self.total += counts
        self.window_counts += counts
        metrics = {}
        if step % self.window == 0:
            dead = (self.window_counts == 0).nonzero().flatten()
            metrics = {
                "dead_codes": float(dead.numel()),
                "window_usage": 1.0 - dead.numel() / self.total.numel(),
            }
            if self.reseed and dead.numel():
                self.reseed_from(engine, dead, out.projected)
                metrics["reseeded_total"] = float(self.reseeded)
            self.window_counts.zero_()
        return metrics

    def reseed_from(
        self, engine: Any, dead: torch.Tensor, projected_BQC: torch.Tensor
    ) -> torch.Tensor:
        """Overwrite codes `dead` with rows of `projected_BQC` (rank 0's draw); returns them."""
        import torch.distributed as dist
        from deepspeed.utils import (
            safe_get_full_fp32_param,
            safe_get_full_optimizer_state,
            safe_set_full_fp32_param,
            safe_set_full_optimizer_state,
        )

        pool = projected_BQC.detach().reshape(-1, projected_BQC.shape[-1])
        n, rows = dead.numel(), pool.shape[0]
        # Distinct encoder outputs while the batch has enough: duplicates would compete for one cluster.
        draw = torch.randperm(rows)[:n] if n <= rows else torch.randint(0, rows, (n,))
        picks_NC = pool[draw.to(pool.device)].float()
        if self.world > 1:
            picks_NC = picks_NC.to(collective_device())
            dist.broadcast(picks_NC, src=0)
        picks_NC = picks_NC.cpu()
        quantizer = engine.module.tokenizer.quantizer
        weight = quantizer.codebook.weight
        master = safe_get_full_fp32_param(weight)
        if master is not None:  # ZeRO 1-3 / bf16: the optimizer's fp32 partitions are the master
            master = master.clone()
            master[dead] = picks_NC.to(master.device, master.dtype)
            safe_set_full_fp32_param(weight, master)
            for key in self.MOMENTS:
                moment = safe_get_full_optimizer_state(weight, key)
                if moment is not None:
                    moment = moment.clone()
                    moment[dead] = 0
                    safe_set_full_optimizer_state(weight, moment, key)
        else:  # no ZeRO, fp32: the module weight is the master; the torch optimizer holds moments
            state = getattr(engine.optimizer, "state", {}).get(weight, {})
            for key in self.MOMENTS:
                if key in state:
                    state[key][dead] = 0
        if not hasattr(weight, "ds_id"):  # ZeRO-3 gathers its weights from the master each step
            quantizer.reseed_codes(dead, picks_NC)
        self.reseeded += dead.numel()
        return picks_NC

    def plot(self, path: Path) -> Path:
        from jobs.plots import pyplot

        plt = pyplot()

        fig, ax = plt.subplots(figsize=(7, 3))
        counts = self.total.numpy()
        ax.bar(np.arange(counts.size), counts, width=1.0)
        ax.set(
            title=f"codebook usage: {(counts > 0).mean():.1%} of {counts.size} codes used",
            xlabel="code",
            ylabel="count",
        )
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path
