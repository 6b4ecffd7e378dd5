"""Causal-embeddings stage: features -> the frozen stage-1 Q-Former's 32 causal embeddings (fp16).

    seedpipe qembeds --corpus cc3m --features tiny --stage1 <checkpoint dir or models:/ URI>

Stage 2 trains from these (plus the targets copied alongside), so neither the ViT nor the
Q-Former runs per training step. Output: `qembeds/<stage1 name>@<digest12>/NNNNN.parquet`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipelines import cli_common
from pipelines.catalog import Catalog, digest_of
from pipelines.config import cli_main
from pipelines.models import default_feature_set, resolve_model
from pipelines.schemas import (
    TARGET_COLUMNS,
    from_fixed_list,
    qembeds_schema,
    schema_shapes,
    to_fixed_list,
)
from pipelines.stage import ShardTask, ShardWorker, StageResult, plan_stage


def read_features_schema(catalog: Catalog, features_dir: str) -> pa.Schema:
    """The schema of a features dataset, from its first readable committed file.

    An unreadable file is skipped here: the worker that builds from it reports that shard failed.
    """
    import pyarrow.parquet as pq

    files = catalog.committed_files(features_dir)
    if not files:
        raise ValueError(
            f"no committed features shards in {features_dir}: run `seedpipe features` first"
        )
    errors = []
    for path in files:
        try:
            with catalog.fs.open_input_file(path) as f:
                return pq.read_schema(f)
        except (OSError, pa.ArrowException) as err:
            errors.append(f"{path}: {err}")
    raise ValueError("no readable features shard: " + "; ".join(errors[:3]))


class QEmbedsShardWorker(ShardWorker):
    def __init__(self, *, root: str, stage1_dir: str, features_shapes: dict[str, list[int]], target_column: str,
                 batch_size: int, num_threads: int | None = None) -> None:  # fmt: skip
        super().__init__(root=root, num_threads=num_threads)
        import torch

        from seed_core.qformer import CausalQFormer

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.qformer = CausalQFormer.from_pretrained(stage1_dir).eval().to(self.device)
        self.patch_shape = tuple(features_shapes["patch_features"])
        self.target_column, self.target_shape = target_column, tuple(features_shapes[target_column])
        q = self.qformer.config
        target_kind = {v: k for k, v in TARGET_COLUMNS.items()}[target_column]
        self.schema = qembeds_schema(embed_shape=(q.num_queries, q.hidden_size), target_kind=target_kind,
                                     target_shape=self.target_shape, meta={"stage1_digest": self.qformer.digest})  # fmt: skip
        self.batch_size = batch_size

    def build(self, task: ShardTask) -> tuple[int, dict[str, int]]:
        name, rows = self.write_parquet(task, self.schema, self._tables(task))
        self.commit(task, [name], rows, {})
        return rows, {}

    def _tables(self, task: ShardTask) -> Iterator[pa.Table]:
        import torch

        for batch in self.read_parquet(task, batch_size=self.batch_size):
            patches = from_fixed_list(batch.column("patch_features"), self.patch_shape)
            with torch.inference_mode():
                x = torch.from_numpy(patches.astype(np.float32)).to(self.device)
                causal = self.qformer(x).float().cpu().numpy()
            yield pa.table(
                {
                    "key": batch.column("key"),
                    "sha256": batch.column("sha256"),
                    "caption": batch.column("caption"),
                    "causal_embeds": to_fixed_list(causal, pa.float16()),
                    self.target_column: batch.column(self.target_column),
                }
            )


@dataclass(kw_only=True)
class QEmbedsConfig(cli_common.StageConfig):
    stage1: str = ""
    """The stage-1 Q-Former: export directory or models:/ URI. Required."""
    features: str = ""
    """Features dataset name; default: the feature set the stage-1 model was trained on."""
    name: str = ""
    """Output dataset name (`qembeds/<name>/`); default: <model>@<digest12>."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.stage1:
            raise ValueError(
                "stage1 is required: --stage1 <export directory or models:/seed-tokenizer-stage1/N>"
            )


def run(config: QEmbedsConfig) -> StageResult:
    from seed_core.qformer import CausalQFormer

    catalog = Catalog(config.root)
    ref = resolve_model(config.stage1, catalog)
    features = config.features or default_feature_set(ref, catalog, config.corpus)
    features_dir = catalog.stage_dir(config.corpus, "features", features)
    shapes = schema_shapes(read_features_schema(catalog, features_dir))
    target_column = next(c for c in shapes if c.startswith("target_"))
    digest = CausalQFormer.from_pretrained(ref.directory).digest
    output_dir = catalog.stage_dir(
        config.corpus, "qembeds", config.name or f"{ref.name}@{digest[:12]}"
    )
    plan, tasks = plan_stage(catalog, input_dir=features_dir, output_dir=output_dir,
                             config_digest=digest_of({"stage": "qembeds"}), model_digest=digest)  # fmt: skip
    return cli_common.run_stage(
        catalog, stage="qembeds", config=config, plan=plan, tasks=tasks, input_dir=features_dir, output_dir=output_dir,
        resolved={"features": features, "stage1": ref.uri, "stage1_digest": digest}, worker_cls=QEmbedsShardWorker,
        worker_kwargs={"root": config.root, "stage1_dir": ref.directory, "features_shapes": {k: list(v) for k, v in shapes.items()},
                       "target_column": target_column, "batch_size": config.resources.batch_size},
    )  # fmt: skip


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    config = cli_common.parse_stage(QEmbedsConfig, argv, prog="seedpipe qembeds", doc=__doc__)
    return 0 if run(config).ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
