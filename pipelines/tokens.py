"""Tokens stage: features -> `SeedTokenizer.encode` -> 32 int16 codes per image, with key/sha256/caption.

    seedpipe tokenize --corpus cc3m --features paper-v2 --tokenizer <dir or models:/seed-tokenizer/3>

Output: `tokens/<tokenizer name>@<digest12>/NNNNN.parquet`; the digest names the tokenizer version,
so a new tokenizer is a new dataset built from the *cached* features: this stage never constructs
or calls the vision encoder (tested). Keys stay img2dataset's, so every token row links back to
its URL and caption.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa

from pipelines import cli_common
from pipelines.catalog import Catalog, digest_of
from pipelines.models import resolve_model
from pipelines.qembeds import read_features_schema
from pipelines.schemas import from_fixed_list, schema_shapes, to_fixed_list, tokens_schema
from pipelines.stage import Resources, ShardTask, ShardWorker, StageResult, plan_stage


class TokensShardWorker(ShardWorker):
    def __init__(self, *, root: str, tokenizer_dir: str, patch_shape: list[int], tokenizer_id: str, batch_size: int,
                 num_threads: int | None = None) -> None:  # fmt: skip
        super().__init__(root=root, num_threads=num_threads)
        import torch

        from seed_core.tokenizer import SeedTokenizer

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = SeedTokenizer.from_pretrained(tokenizer_dir).eval().to(self.device)
        self.patch_shape = tuple(patch_shape)
        digest = self.tokenizer.digest
        self.schema = tokens_schema(num_tokens=self.tokenizer.config.num_queries,
                                    meta={"tokenizer_id": tokenizer_id, "tokenizer_digest": digest})  # fmt: skip
        self.batch_size = batch_size

    def build(self, task: ShardTask) -> tuple[int, dict[str, int]]:
        name, rows = self.write_parquet(task, self.schema, self._tables(task))
        self.commit(task, [name], rows, {})
        return rows, {}

    def _tables(self, task: ShardTask) -> Iterator[pa.Table]:
        import torch

        for batch in self.read_parquet(task, columns=["key", "sha256", "caption", "patch_features"],
                                       batch_size=self.batch_size):  # fmt: skip
            patches = from_fixed_list(batch.column("patch_features"), self.patch_shape)
            x = torch.from_numpy(patches.astype(np.float32)).to(self.device)
            codes = self.tokenizer.encode(x).cpu().numpy()
            yield pa.table(
                {
                    "key": batch.column("key"),
                    "sha256": batch.column("sha256"),
                    "caption": batch.column("caption"),
                    "codes": to_fixed_list(codes, pa.int16()),
                }
            )


def run(*, root: str = "./seed-data", corpus: str, features: str, tokenizer: str, name: str = "",
        resources: Resources | None = None, dry_run: bool = False, address: str | None = None) -> StageResult:  # fmt: skip
    from seed_core.tokenizer import SeedTokenizer

    resources = resources or Resources()
    catalog = Catalog(root)
    features_dir = catalog.stage_dir(corpus, "features", features)
    patch_shape = schema_shapes(read_features_schema(catalog, features_dir))["patch_features"]
    ref = resolve_model(tokenizer)
    digest = SeedTokenizer.from_pretrained(ref.directory).digest
    tokenizer_id = name or f"{ref.name}@{digest[:12]}"
    output_dir = catalog.stage_dir(corpus, "tokens", tokenizer_id)
    plan, tasks = plan_stage(catalog, input_dir=features_dir, output_dir=output_dir,
                             config_digest=digest_of({"stage": "tokens"}), model_digest=digest)  # fmt: skip
    return cli_common.run_stage(
        catalog, stage="tokens", corpus=corpus, plan=plan, tasks=tasks, dry_run=dry_run, address=address,
        config={"features": features, "tokenizer": ref.uri, "tokenizer_digest": digest, "tokenizer_id": tokenizer_id},
        resources=resources, input_dir=features_dir, output_dir=output_dir, worker_cls=TokensShardWorker,
        worker_kwargs={"root": root, "tokenizer_dir": ref.directory, "patch_shape": list(patch_shape),
                       "tokenizer_id": tokenizer_id, "batch_size": resources.batch_size},
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="seedpipe tokenize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True)
    parser.add_argument(
        "--features", default="paper-v2", help="features dataset name (the feature set)"
    )
    parser.add_argument(
        "--tokenizer", required=True, help="SeedTokenizer directory or models:/ URI"
    )
    parser.add_argument(
        "--name", default="", help="output dataset name (default: <tokenizer>@<digest12>)"
    )
    cli_common.add_stage_args(parser)
    args = parser.parse_args(argv)
    result = run(root=args.root, corpus=args.corpus, features=args.features, tokenizer=args.tokenizer,
                 name=args.name, resources=cli_common.resources(args), dry_run=args.dry_run, address=args.address)  # fmt: skip
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
