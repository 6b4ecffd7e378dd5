"""Tokenizer training: stage 1 (Causal Q-Former, ITC) and stage 2 (quantizer + decoders).

    seedpipe train-tokenizer --stage 1 --config jobs/configs/tiny_stage1.yaml corpus=demo
    seedpipe train-tokenizer --stage 2 --config jobs/configs/tiny_stage2.yaml stage1=models:/seed-tokenizer-stage1/1
    python -m jobs.train_tokenizer --stage 1 ...     # what `ray job submit` runs

Stage 1 reads the features dataset (patch features + captions); stage 2 reads the qembeds
dataset (cached causal embeddings + targets), so neither the ViT nor the Q-Former runs per
step. Both run on `jobs.trainer` (Ray Train + DeepSpeed) and export + register their model.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jobs import config as cfg
from jobs.launch import Prepared, is_holdout, launch, run_paths
from jobs.trainer import JobParts, collective_device
from seed_core.tasks import Stage1Config, Stage2Config

# ---------------------------------------------------------------------------------------------
# configs


@dataclass(kw_only=True)
class DeadCodeSettings:
    """Dead-code accounting (always on) and the opt-in remedy (off: the paper recipe)."""

    window: int = 100
    """Steps over which a code must be used at least once to count as alive."""
    reseed: bool = False
    """Re-seed codes unused for a window from recent encoder outputs (projected z)."""

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"dead_codes.window must be >= 1, got {self.window}")


@dataclass(kw_only=True)
class Stage1JobConfig:
    root: str = "./seed-data"
    corpus: str = "cc3m"
    features: str = "paper-v2"
    """Features dataset name (`features/<name>/`)."""
    preset: str = "paper-v2"
    """Model shapes (Q-Former config) from this preset."""
    blip2: str | None = None
    """BLIP-2 checkpoint (dir or hub id, Blip2ForImageTextRetrieval) to initialise the Q-Former from."""
    text_tokenizer: str = "train"
    """'train': a BPE tokenizer trained on the corpus captions (tokenizers lib); else a dir/hub id."""
    max_text_len: int = 32
    holdout: float = 0.05
    """Fraction of rows (by key hash) held out for retrieval evaluation."""
    eval_every: int = 0
    eval_rows: int = 256
    register_as: str = "seed-tokenizer-stage1"
    task: Stage1Config = field(default_factory=Stage1Config)
    scaling: cfg.ScalingSettings = field(default_factory=cfg.ScalingSettings)
    run: cfg.RunSettings = field(default_factory=cfg.RunSettings)
    optim: cfg.OptimSettings = field(
        default_factory=lambda: cfg.OptimSettings(
            lr=3e-5, warmup_start_lr=3e-7, min_lr=3e-6, warmup_steps=2000
        )
    )
    deepspeed: cfg.DeepSpeedSettings = field(default_factory=cfg.DeepSpeedSettings)
    fault: cfg.FaultSettings = field(default_factory=cfg.FaultSettings)

    def __post_init__(self) -> None:
        if not 0 <= self.holdout < 0.5:
            raise ValueError(f"holdout must be in [0, 0.5), got {self.holdout}")
        if self.max_text_len < 2:
            raise ValueError(f"max_text_len must be >= 2, got {self.max_text_len}")


@dataclass(kw_only=True)
class Stage2JobConfig:
    root: str = "./seed-data"
    corpus: str = "cc3m"
    qembeds: str = ""
    """qembeds dataset name (`qembeds/<name>/`); default: the one made with `stage1`."""
    stage1: str = ""
    """The stage-1 Q-Former: export directory or models:/ URI (frozen in stage 2)."""
    preset: str = "paper-v2"
    """Quantizer and decoder shapes from this preset."""
    holdout: float = 0.05
    eval_every: int = 0
    eval_rows: int = 256
    register_as: str = "seed-tokenizer"
    task: Stage2Config = field(default_factory=Stage2Config)
    dead_codes: DeadCodeSettings = field(default_factory=DeadCodeSettings)
    scaling: cfg.ScalingSettings = field(default_factory=cfg.ScalingSettings)
    run: cfg.RunSettings = field(default_factory=cfg.RunSettings)
    optim: cfg.OptimSettings = field(
        default_factory=lambda: cfg.OptimSettings(
            lr=1e-4, warmup_steps=2000, batch_size_per_worker=256
        )
    )
    deepspeed: cfg.DeepSpeedSettings = field(default_factory=cfg.DeepSpeedSettings)
    fault: cfg.FaultSettings = field(default_factory=cfg.FaultSettings)

    def __post_init__(self) -> None:
        if not 0 <= self.holdout < 0.5:
            raise ValueError(f"holdout must be in [0, 0.5), got {self.holdout}")


# ---------------------------------------------------------------------------------------------
# shared helpers


def load_holdout(files: Sequence[str], fraction: float, max_rows: int, columns: list[str]) -> Any:
    """The held-out rows (same key-hash rule as training's filter), at most `max_rows`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables, rows = [], 0
    for path in files:
        table = pq.read_table(path, columns=columns)
        table = table.filter(pa.array(is_holdout(table.column("key").to_pylist(), fraction)))
        tables.append(table)
        rows += table.num_rows
        if rows >= max_rows:
            break
    return pa.concat_tables(tables).slice(0, max_rows) if tables else None


def fixed(column: Any, shape: Sequence[int]) -> torch.Tensor:
    from pipelines.schemas import from_fixed_list

    return torch.from_numpy(from_fixed_list(column, shape).astype(np.float32))


def committed_dataset(catalog: Any, directory: str, what: str) -> tuple[list[str], dict[str, Any]]:
    """(files, lineage dict) of a committed catalog dataset; a clear error when it is empty."""
    from pipelines.catalog import dataset_digest

    records = catalog.committed(directory)
    if not records:
        raise ValueError(f"no committed {what} shards in {directory}")
    digest = dataset_digest({s: r.digest for s, r in records.items()})
    rel = directory[len(catalog.base) + len("/corpora/") :]
    lineage = {"name": rel, "digest": digest, "uri": catalog.uri(directory), "context": "training",
               "rows": sum(r.rows for r in records.values())}  # fmt: skip
    return catalog.committed_files(directory), lineage


# ---------------------------------------------------------------------------------------------
# stage 1


def prepare_stage1(config: Stage1JobConfig) -> Prepared:
    import pyarrow.parquet as pq

    from pipelines.catalog import Catalog
    from pipelines.schemas import schema_shapes
    from seed_core.presets import get_preset

    catalog = Catalog(config.root)
    files, lineage = committed_dataset(
        catalog, catalog.stage_dir(config.corpus, "features", config.features), "features"
    )
    shapes = schema_shapes(pq.read_schema(files[0]))
    qcfg = get_preset(config.preset).tokenizer.qformer
    if tuple(shapes["patch_features"])[-1] != qcfg.encoder_hidden_size:
        raise ValueError(
            f"features width {shapes['patch_features']} does not match preset {config.preset}'s Q-Former"
        )
    _, _, run_dir = run_paths(config, "stage1")
    tokenizer_dir = run_dir / "text_tokenizer"
    if config.text_tokenizer == "train":
        if not tokenizer_dir.exists():  # a restarted run keeps its first tokenizer
            from seed_core.llm import train_caption_tokenizer

            captions = [
                c
                for f in files
                for c in pq.read_table(f, columns=["caption"])["caption"].to_pylist()
            ]
            train_caption_tokenizer(captions, vocab_size=qcfg.vocab_size).save_pretrained(
                tokenizer_dir
            )
        text_tokenizer = str(tokenizer_dir)
    else:
        text_tokenizer = config.text_tokenizer
    return Prepared(train_files=files, input_datasets=[lineage], holdout_fraction=config.holdout,
                    extra={"_text_tokenizer": text_tokenizer, "_patch_shape": list(shapes["patch_features"]),
                           "_train_files": files})  # fmt: skip


def build_stage1(job: dict[str, Any], *, rank: int, world: int) -> Any:
    from ray.data.collate_fn import ArrowBatchCollateFn
    from transformers import AutoTokenizer

    from seed_core.presets import get_preset
    from seed_core.qformer import CausalQFormer, QFormerConfig
    from seed_core.tasks import Stage1Config, Stage1Task

    qcfg: QFormerConfig = get_preset(job["preset"]).tokenizer.qformer
    if job["blip2"]:
        import transformers

        qformer = CausalQFormer.from_blip2(
            transformers.Blip2ForImageTextRetrieval.from_pretrained(job["blip2"])
        )
    else:
        qformer = CausalQFormer(qcfg)
    task = Stage1Task(qformer, Stage1Config(**job["task"]))
    text_tok = AutoTokenizer.from_pretrained(job["_text_tokenizer"])
    patch_shape, max_len = tuple(job["_patch_shape"]), job["max_text_len"]

    class Collate(ArrowBatchCollateFn):
        def __call__(self, batch: Any) -> dict[str, torch.Tensor]:
            text = text_tok(batch.column("caption").to_pylist(), padding="max_length", truncation=True,
                            max_length=max_len, return_tensors="pt")  # fmt: skip
            return {"patch_features": fixed(batch.column("patch_features"), patch_shape),
                    "input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}  # fmt: skip

    holdout = load_holdout(
        job["_train_files"], job["holdout"], job["eval_rows"], ["key", "caption", "patch_features"]
    )

    def evaluate(module: Any) -> dict[str, float]:
        if holdout is None or holdout.num_rows < 2:
            return {}
        return retrieval_recall(module.qformer, Collate()(holdout))

    def export(module: Any, out: Path) -> None:
        module.qformer.save_pretrained(out)
        text_tok.save_pretrained(out / "text_tokenizer")

    return JobParts(task=task, collate=Collate(), export=export, evaluate=evaluate,
                    final_artifacts=lambda module, run_dir: [plot_losses(run_dir)])  # fmt: skip


@torch.no_grad()
def retrieval_recall(
    qformer: Any, batch: dict[str, torch.Tensor], ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Image->text and text->image recall@k on a held-out batch with ITC features."""
    img = qformer.image_feature(qformer(batch["patch_features"]))
    txt = qformer.text_feature(qformer.encode_text(batch["input_ids"], batch["attention_mask"]))
    sim = img @ txt.t()
    target = torch.arange(sim.shape[0])
    out = {}
    for k in ks:
        k_ = min(k, sim.shape[0])
        out[f"i2t_recall_at_{k}"] = (
            (sim.topk(k_, dim=1).indices == target[:, None]).any(1).float().mean().item()
        )
        out[f"t2i_recall_at_{k}"] = (
            (sim.t().topk(k_, dim=1).indices == target[:, None]).any(1).float().mean().item()
        )
    return out


# ---------------------------------------------------------------------------------------------
# stage 2


def prepare_stage2(config: Stage2JobConfig) -> Prepared:
    import pyarrow.parquet as pq

    from pipelines.catalog import Catalog
    from pipelines.models import resolve_model
    from pipelines.schemas import schema_shapes
    from seed_core.qformer import CausalQFormer

    if not config.stage1:
        raise ValueError(
            "stage1 is required: stage1=<stage-1 export directory or models:/seed-tokenizer-stage1/N>"
        )
    catalog = Catalog(config.root)
    ref = resolve_model(config.stage1)
    digest = CausalQFormer.from_pretrained(ref.directory).digest
    name = config.qembeds or f"{ref.name}@{digest[:12]}"
    files, lineage = committed_dataset(
        catalog, catalog.stage_dir(config.corpus, "qembeds", name), "qembeds"
    )
    shapes = schema_shapes(pq.read_schema(files[0]))
    target = next(c for c in shapes if c.startswith("target_"))
    stage1 = {
        "name": f"model:{ref.uri}",
        "digest": digest,
        "uri": Path(ref.directory).as_uri(),
        "context": "stage1",
    }
    return Prepared(train_files=files, input_datasets=[lineage, stage1], holdout_fraction=config.holdout,
                    extra={"_stage1_dir": ref.directory, "_shapes": {k: list(v) for k, v in shapes.items()},
                           "_target": target, "_train_files": files})  # fmt: skip


def build_stage2(job: dict[str, Any], *, rank: int, world: int) -> Any:
    from ray.data.collate_fn import ArrowBatchCollateFn

    from seed_core.presets import get_preset
    from seed_core.qformer import CausalQFormer
    from seed_core.tasks import Stage2Config, Stage2Task
    from seed_core.tokenizer import SeedTokenizer

    qformer = CausalQFormer.from_pretrained(job["_stage1_dir"])
    tok_cfg = get_preset(job["preset"]).tokenizer
    tok_cfg.qformer = qformer.config  # the frozen stage-1 Q-Former defines the embedding space
    task = Stage2Task(SeedTokenizer.from_qformer(qformer, tok_cfg), Stage2Config(**job["task"]))
    shapes, target = job["_shapes"], job["_target"]

    class Collate(ArrowBatchCollateFn):
        def __call__(self, batch: Any) -> dict[str, torch.Tensor]:
            return {"causal_embeds": fixed(batch.column("causal_embeds"), shapes["causal_embeds"]),
                    target: fixed(batch.column(target), shapes[target])}  # fmt: skip

    usage = CodeUsage(tok_cfg.quantizer.num_codes, window=job["dead_codes"]["window"], reseed=job["dead_codes"]["reseed"],
                      world=world)  # fmt: skip
    holdout = load_holdout(
        job["_train_files"], job["holdout"], job["eval_rows"], ["key", "causal_embeds", target]
    )

    def evaluate(module: Any) -> dict[str, float]:
        if holdout is None or holdout.num_rows == 0:
            return {}
        out = module(Collate()(holdout))
        return {"loss": out.loss.item()} | {k: float(v) for k, v in out.metrics.items()}

    def export(module: Any, out: Path) -> None:
        module.tokenizer.save_pretrained(out)

    def artifacts(module: Any, run_dir: Path) -> list[Path]:
        return [plot_losses(run_dir), usage.plot(run_dir / "codebook_usage.png")]

    return JobParts(task=task, collate=Collate(), export=export, evaluate=evaluate, on_step=usage.on_step,
                    final_artifacts=artifacts, stateful={"code_usage": usage})  # fmt: skip


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
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

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


def plot_losses(run_dir: Path) -> Path:
    """Loss curves from the rank-0 metric log `metrics.jsonl` (written whether or not MLflow is up)."""
    import json

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


# ---------------------------------------------------------------------------------------------
# entry point


def build_parts(job: dict[str, Any], *, rank: int, world: int) -> Any:
    return (
        build_stage1(job, rank=rank, world=world)
        if job["_stage"] == 1
        else build_stage2(job, rank=rank, world=world)
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="seedpipe train-tokenizer", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--stage", type=int, choices=(1, 2), required=True)
    parser.add_argument("--config", help="YAML job config (jobs/configs/*.yaml)")
    parser.add_argument(
        "--address", default=None, help="Ray address (default: RAY_ADDRESS or local)"
    )
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    cls = Stage1JobConfig if args.stage == 1 else Stage2JobConfig
    config = cfg.load_config(cls, args.config, args.overrides)
    prepared = prepare_stage1(config) if args.stage == 1 else prepare_stage2(config)  # type: ignore[arg-type]
    prepared.extra["_stage"] = args.stage
    result = launch(config, job_name=f"stage{args.stage}", job_module="jobs.train_tokenizer",
                    export_kind="causal_qformer" if args.stage == 1 else "seed_tokenizer", prepared=prepared,
                    address=args.address)  # fmt: skip
    return 0 if result.error is None else 1


if __name__ == "__main__":
    raise SystemExit(main())
