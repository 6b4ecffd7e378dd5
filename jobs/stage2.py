"""Tokenizer stage 2: quantizer + decoders trained on cached causal embeddings (the qembeds stage).

Neither the ViT nor the frozen stage-1 Q-Former runs per step. Exports the `SeedTokenizer` and
registers it as `seed-tokenizer`. The entry point is `jobs.train_tokenizer --stage 2`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from jobs import config as cfg
from jobs.code_usage import CodeUsage
from jobs.job import Job, JobParts, Prepared, RunContext
from jobs.plots import plot_losses
from pipelines.datasets import DatasetRef
from seed_core.tasks import Stage2Config


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
class Stage2JobConfig(cfg.TrainJobConfig):
    stage1: str = ""
    """The stage-1 Q-Former: export directory or models:/ URI (frozen in stage 2). Required."""
    qembeds: str = ""
    """qembeds dataset name (`qembeds/<name>/`); default: the one made with `stage1`."""
    preset: str = "paper-v2"
    """Quantizer and decoder shapes from this preset."""
    register_as: str = "seed-tokenizer"
    """MLflow registered-model name of the export."""
    task: Stage2Config = field(default_factory=Stage2Config)
    dead_codes: DeadCodeSettings = field(default_factory=DeadCodeSettings)
    optim: cfg.OptimSettings = field(
        default_factory=lambda: cfg.OptimSettings(
            lr=1e-4, warmup_steps=2000, batch_size_per_worker=256
        )
    )


@dataclass(frozen=True, kw_only=True)
class Stage2Inputs:
    stage1_dir: str
    """Local directory of the stage-1 export."""
    stage1_lineage: dict[str, Any]
    """The stage-1 export's lineage.json (its corpus and feature set), carried into this export's."""
    shapes: dict[str, tuple[int, ...]]
    """Per-row shapes of the qembeds columns (causal_embeds, the target)."""
    target: str
    """The target column: target_image_embed (v2) or target_text_cond (v1)."""
    train_files: list[str]


class Stage2Job(Job[Stage2JobConfig, Stage2Inputs]):
    name = "stage2"
    config_cls = Stage2JobConfig
    export_kind = "seed_tokenizer"

    def prepare(self, config: Stage2JobConfig) -> Prepared[Stage2Inputs]:
        import pyarrow.parquet as pq

        from pipelines.catalog import Catalog
        from pipelines.datasets import committed_dataset, list_datasets
        from pipelines.models import resolve_model
        from pipelines.schemas import schema_shapes
        from seed_core.qformer import CausalQFormer

        if not config.stage1:
            raise ValueError(
                "stage1 is required: stage1=<stage-1 export directory or models:/seed-tokenizer-stage1/N>"
            )
        catalog = Catalog(config.root)
        ref = resolve_model(config.stage1, catalog)
        digest = CausalQFormer.from_pretrained(ref.directory).digest
        name = config.qembeds or f"{ref.name}@{digest[:12]}"
        directory = catalog.stage_dir(config.corpus, "qembeds", name)
        if not catalog.committed(directory):
            available = list_datasets(catalog, config.corpus, "qembeds")
            raise ValueError(
                f"no qembeds dataset {name!r} in corpus {config.corpus!r} (available: "
                f"{', '.join(available) or 'none'}); make it with `seedpipe qembeds --corpus "
                f"{config.corpus} --stage1 {config.stage1}`"
            )
        files, lineage = committed_dataset(catalog, directory, "qembeds")
        shapes = schema_shapes(pq.read_schema(files[0]))
        target = next(c for c in shapes if c.startswith("target_"))
        stage1 = DatasetRef(name=f"model:{ref.uri}", digest=digest, uri=Path(ref.directory).as_uri(),
                            context="stage1")  # fmt: skip
        inputs = Stage2Inputs(stage1_dir=ref.directory, stage1_lineage=ref.lineage, target=target, train_files=files,
                              shapes={k: tuple(v) for k, v in shapes.items()})  # fmt: skip
        return Prepared(train_files=files, inputs=inputs, input_datasets=[lineage, stage1])

    def build(self, config: Stage2JobConfig, inputs: Stage2Inputs, ctx: RunContext) -> JobParts:
        from ray.data.collate_fn import ArrowBatchCollateFn

        from pipelines.datasets import fixed_tensor, load_holdout
        from seed_core.presets import get_preset
        from seed_core.qformer import CausalQFormer
        from seed_core.tasks import Stage2Task
        from seed_core.tokenizer import SeedTokenizer

        qformer = CausalQFormer.from_pretrained(inputs.stage1_dir)
        tok_cfg = get_preset(config.preset).tokenizer
        tok_cfg.qformer = qformer.config  # the frozen stage-1 Q-Former defines the embedding space
        task = Stage2Task(SeedTokenizer.from_qformer(qformer, tok_cfg), config.task)
        shapes, target = inputs.shapes, inputs.target

        class Collate(ArrowBatchCollateFn):
            def __call__(self, batch: Any) -> dict[str, torch.Tensor]:
                return {"causal_embeds": fixed_tensor(batch.column("causal_embeds"), shapes["causal_embeds"]),
                        target: fixed_tensor(batch.column(target), shapes[target])}  # fmt: skip

        usage = CodeUsage(tok_cfg.quantizer.num_codes, window=config.dead_codes.window,
                          reseed=config.dead_codes.reseed, world=ctx.world)  # fmt: skip
        holdout = load_holdout(inputs.train_files, config.holdout, config.eval_rows,
                               ["key", "causal_embeds", target])  # fmt: skip

        def evaluate(module: Any) -> dict[str, float]:
            if holdout is None or holdout.num_rows == 0:
                return {}
            out = module(Collate()(holdout))
            return {"loss": out.loss.item()} | {k: float(v) for k, v in out.metrics.items()}

        def export(module: Any, out: Path) -> None:
            from pipelines.models import write_lineage

            module.tokenizer.save_pretrained(out)
            write_lineage(
                out,
                **(
                    inputs.stage1_lineage
                    | {"corpus": config.corpus, "stage1": config.stage1, "holdout": config.holdout}
                ),
            )

        def artifacts(module: Any, run_dir: Path) -> list[Path]:
            return [plot_losses(run_dir), usage.plot(run_dir / "codebook_usage.png")]

        return JobParts(task=task, collate=Collate(), export=export, evaluate=evaluate, on_step=usage.on_step,
                        final_artifacts=artifacts, stateful={"code_usage": usage})  # fmt: skip
