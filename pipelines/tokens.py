"""Tokens stage: features -> `SeedTokenizer.encode` -> 32 int16 codes per image, with key/sha256/caption.

    seedpipe tokenize --corpus cc3m --features paper-v2 --tokenizer <dir or models:/seed-tokenizer/3>

Output: `tokens/<tokenizer name>@<digest12>/NNNNN.parquet`; the digest names the tokenizer version,
so a new tokenizer is a new dataset built from the *cached* features: this stage never constructs
or calls the vision encoder (tested). Keys stay img2dataset's, so every token row links back to
its URL and caption.
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
from pipelines.qembeds import read_features_schema
from pipelines.schemas import from_fixed_list, schema_shapes, to_fixed_list, tokens_schema
from pipelines.stage import ShardTask, ShardWorker, StageResult, plan_stage


class TokensShardWorker(ShardWorker):
    def __init__(self, *, root: str, tokenizer_dir: str, patch_shape: list[int], tokenizer_id: str, batch_size: int,
                 tokenizer_uri: str = "", num_threads: int | None = None) -> None:  # fmt: skip
        super().__init__(root=root, num_threads=num_threads)
        import torch

        from seed_core.tokenizer import SeedTokenizer

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = SeedTokenizer.from_pretrained(tokenizer_dir).eval().to(self.device)
        self.patch_shape = tuple(patch_shape)
        digest = self.tokenizer.digest
        self.schema = tokens_schema(num_tokens=self.tokenizer.config.num_queries,
                                    meta={"tokenizer_id": tokenizer_id, "tokenizer_digest": digest, "tokenizer_uri": tokenizer_uri,
                                          "num_codes": self.tokenizer.config.quantizer.num_codes})  # fmt: skip
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


@dataclass(kw_only=True)
class TokensConfig(cli_common.StageConfig):
    tokenizer: str = ""
    """SeedTokenizer export directory or models:/ URI. Required."""
    features: str = ""
    """Features dataset name; default: the feature set the tokenizer was trained on."""
    name: str = ""
    """Output dataset name (`tokens/<name>/`); default: <tokenizer>@<digest12>."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.tokenizer:
            raise ValueError(
                "tokenizer is required: --tokenizer <export directory or models:/seed-tokenizer/N>"
            )


def run(config: TokensConfig) -> StageResult:
    from seed_core.tokenizer import SeedTokenizer

    catalog = Catalog(config.root)
    ref = resolve_model(config.tokenizer, catalog)
    features = config.features or default_feature_set(ref, catalog, config.corpus)
    features_dir = catalog.stage_dir(config.corpus, "features", features)
    patch_shape = schema_shapes(read_features_schema(catalog, features_dir))["patch_features"]
    digest = SeedTokenizer.from_pretrained(ref.directory).digest
    tokenizer_id = config.name or f"{ref.name}@{digest[:12]}"
    output_dir = catalog.stage_dir(config.corpus, "tokens", tokenizer_id)
    plan, tasks = plan_stage(catalog, input_dir=features_dir, output_dir=output_dir,
                             config_digest=digest_of({"stage": "tokens"}), model_digest=digest)  # fmt: skip
    return cli_common.run_stage(
        catalog, stage="tokens", config=config, plan=plan, tasks=tasks, input_dir=features_dir, output_dir=output_dir,
        resolved={"features": features, "tokenizer": ref.uri, "tokenizer_digest": digest, "tokenizer_id": tokenizer_id},
        worker_cls=TokensShardWorker,
        worker_kwargs={"root": config.root, "tokenizer_dir": ref.directory, "patch_shape": list(patch_shape),
                       "tokenizer_id": tokenizer_id, "tokenizer_uri": ref.uri, "batch_size": config.resources.batch_size},
    )  # fmt: skip


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    config = cli_common.parse_stage(TokensConfig, argv, prog="seedpipe tokenize", doc=__doc__)
    return 0 if run(config).ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
