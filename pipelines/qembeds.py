"""Causal-embeddings stage: features -> the frozen stage-1 Q-Former's 32 causal embeddings (fp16).

    seedpipe qembeds --corpus cc3m --features tiny --stage1 <checkpoint dir or models:/ URI>

Stage 2 trains from these (plus the targets copied alongside), so neither the ViT nor the
Q-Former runs per training step. Output: `qembeds/<stage1 name>@<digest12>/NNNNN.parquet`.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa

from pipelines import cli_common
from pipelines.catalog import Catalog, digest_of
from pipelines.models import resolve_model
from pipelines.schemas import (
    TARGET_COLUMNS,
    from_fixed_list,
    qembeds_schema,
    schema_shapes,
    to_fixed_list,
)
from pipelines.stage import Resources, ShardTask, ShardWorker, StageResult, plan_stage


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


def run(*, root: str = "./seed-data", corpus: str, features: str, stage1: str, name: str = "",
        resources: Resources | None = None, dry_run: bool = False, address: str | None = None) -> StageResult:  # fmt: skip
    from seed_core.qformer import CausalQFormer

    resources = resources or Resources()
    catalog = Catalog(root)
    features_dir = catalog.stage_dir(corpus, "features", features)
    shapes = schema_shapes(read_features_schema(catalog, features_dir))
    target_column = next(c for c in shapes if c.startswith("target_"))
    ref = resolve_model(stage1)
    digest = CausalQFormer.from_pretrained(ref.directory).digest
    output_dir = catalog.stage_dir(corpus, "qembeds", name or f"{ref.name}@{digest[:12]}")
    config = {"features": features, "stage1": ref.uri, "stage1_digest": digest}
    plan, tasks = plan_stage(catalog, input_dir=features_dir, output_dir=output_dir,
                             config_digest=digest_of({"stage": "qembeds"}), model_digest=digest)  # fmt: skip
    return cli_common.run_stage(
        catalog, stage="qembeds", corpus=corpus, plan=plan, tasks=tasks, dry_run=dry_run, address=address,
        config=config, resources=resources, input_dir=features_dir, output_dir=output_dir,
        worker_cls=QEmbedsShardWorker,
        worker_kwargs={"root": root, "stage1_dir": ref.directory, "features_shapes": {k: list(v) for k, v in shapes.items()},
                       "target_column": target_column, "batch_size": resources.batch_size},
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="seedpipe qembeds", description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True)
    parser.add_argument(
        "--features", default="paper-v2", help="features dataset name (the feature set)"
    )
    parser.add_argument(
        "--stage1", required=True, help="stage-1 Q-Former: checkpoint directory or models:/ URI"
    )
    parser.add_argument(
        "--name", default="", help="output dataset name (default: <model>@<digest12>)"
    )
    cli_common.add_stage_args(parser)
    args = parser.parse_args(argv)
    result = run(root=args.root, corpus=args.corpus, features=args.features, stage1=args.stage1, name=args.name,
                 resources=cli_common.resources(args), dry_run=args.dry_run, address=args.address)  # fmt: skip
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
