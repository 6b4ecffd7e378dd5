"""Tokenizer stage 1: the Causal Q-Former trained with ITC on cached patch features.

Reads the features dataset (patch features + captions), so the frozen ViT never runs per step;
exports the Q-Former (+ the caption tokenizer it was trained with) and registers it as
`seed-tokenizer-stage1`. The entry point is `jobs.train_tokenizer --stage 1`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jobs import config as cfg
from jobs.job import Job, JobParts, Prepared, RunContext, run_folder
from jobs.plots import plot_losses
from seed_core.tasks import Stage1Config


@dataclass(kw_only=True)
class Stage1JobConfig(cfg.TrainJobConfig):
    features: str = ""
    """Features dataset name (`features/<name>/`); default: the corpus's only feature set."""
    preset: str = "paper-v2"
    """Model shapes (Q-Former config) from this preset."""
    blip2: str | None = None
    """BLIP-2 checkpoint (dir or hub id, Blip2ForImageTextRetrieval) to initialise the Q-Former from."""
    text_tokenizer: str = "train"
    """'train': a BPE tokenizer trained on the corpus captions (tokenizers lib); else a dir/hub id."""
    max_text_len: int = 32
    """Caption tokens per text (padded/truncated)."""
    register_as: str = "seed-tokenizer-stage1"
    """MLflow registered-model name of the export."""
    task: Stage1Config = field(default_factory=Stage1Config)
    optim: cfg.OptimSettings = field(
        default_factory=lambda: cfg.OptimSettings(
            lr=3e-5, warmup_start_lr=3e-7, min_lr=3e-6, warmup_steps=2000
        )
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_text_len < 2:
            raise ValueError(f"max_text_len must be >= 2, got {self.max_text_len}")


@dataclass(frozen=True, kw_only=True)
class Stage1Inputs:
    features: str
    """The feature set trained on (recorded in the export's lineage.json)."""
    text_tokenizer: str
    """Directory (or hub id) of the caption tokenizer, the same on every rank and restart."""
    patch_shape: tuple[int, ...]
    """(P, Dv) of the features' patch_features column."""
    train_files: list[str]
    """The dataset's files, to read the held-out rows from."""


class Stage1Job(Job[Stage1JobConfig, Stage1Inputs]):
    name = "stage1"
    config_cls = Stage1JobConfig
    export_kind = "causal_qformer"

    def resolve(self, config: Stage1JobConfig) -> Stage1JobConfig:
        from pipelines.catalog import Catalog
        from pipelines.datasets import only_dataset

        if config.features:
            return config
        features = only_dataset(Catalog(config.root), config.corpus, "features", "features")
        return dataclasses.replace(config, features=features)

    def prepare(self, config: Stage1JobConfig) -> Prepared[Stage1Inputs]:
        import pyarrow.parquet as pq

        from pipelines.catalog import Catalog
        from pipelines.datasets import committed_dataset
        from pipelines.schemas import schema_shapes
        from seed_core.presets import get_preset

        catalog = Catalog(config.root)
        features = config.features
        files, lineage = committed_dataset(
            catalog, catalog.stage_dir(config.corpus, "features", features), "features"
        )
        shapes = schema_shapes(pq.read_schema(files[0]))
        qcfg = get_preset(config.preset).tokenizer.qformer
        if tuple(shapes["patch_features"])[-1] != qcfg.encoder_hidden_size:
            raise ValueError(
                f"features {features} width {shapes['patch_features']} does not match preset "
                f"{config.preset}'s Q-Former (encoder width {qcfg.encoder_hidden_size})"
            )
        text_tokenizer = config.text_tokenizer
        if text_tokenizer == "train":
            folder = run_folder(config, self.name)
            tokenizer_dir = folder.local / "text_tokenizer"
            if not folder.pull("text_tokenizer"):  # a restarted run keeps its first tokenizer
                from seed_core.llm import train_caption_tokenizer

                captions = [
                    c
                    for f in files
                    for c in pq.read_table(f, columns=["caption"])["caption"].to_pylist()
                ]
                train_caption_tokenizer(captions, vocab_size=qcfg.vocab_size).save_pretrained(
                    tokenizer_dir
                )
                folder.push("text_tokenizer")
            text_tokenizer = folder.uri_of("text_tokenizer")
        inputs = Stage1Inputs(features=features, text_tokenizer=text_tokenizer, train_files=files,
                              patch_shape=tuple(shapes["patch_features"]))  # fmt: skip
        return Prepared(train_files=files, inputs=inputs, input_datasets=[lineage])

    def build(self, config: Stage1JobConfig, inputs: Stage1Inputs, ctx: RunContext) -> JobParts:
        from ray.data.collate_fn import ArrowBatchCollateFn
        from transformers import AutoTokenizer

        from pipelines.datasets import fixed_tensor, load_holdout
        from pipelines.storage import local_copy
        from seed_core.presets import get_preset
        from seed_core.qformer import CausalQFormer
        from seed_core.tasks import Stage1Task

        if config.blip2:
            import transformers

            qformer = CausalQFormer.from_blip2(
                transformers.Blip2ForImageTextRetrieval.from_pretrained(config.blip2)
            )
        else:
            qformer = CausalQFormer(get_preset(config.preset).tokenizer.qformer)
        task = Stage1Task(qformer, config.task)
        text_tok = AutoTokenizer.from_pretrained(local_copy(inputs.text_tokenizer))
        patch_shape, max_len = inputs.patch_shape, config.max_text_len

        class Collate(ArrowBatchCollateFn):
            def __call__(self, batch: Any) -> dict[str, torch.Tensor]:
                text = text_tok(batch.column("caption").to_pylist(), padding="max_length", truncation=True,
                                max_length=max_len, return_tensors="pt")  # fmt: skip
                return {"patch_features": fixed_tensor(batch.column("patch_features"), patch_shape),
                        "input_ids": text["input_ids"], "attention_mask": text["attention_mask"],
                        "caption_group": caption_groups(batch.column("caption").to_pylist())}  # fmt: skip

        holdout = load_holdout(inputs.train_files, config.holdout, config.eval_rows,
                               ["key", "caption", "patch_features"])  # fmt: skip

        def evaluate(module: Any) -> dict[str, float]:
            if holdout is None or holdout.num_rows < 2:
                return {}
            from jobs.metrics import dedupe_captions, retrieval_chance

            captions = holdout.column("caption").to_pylist()
            unique, group_I = dedupe_captions(captions)
            chance = retrieval_chance(group_I, np.arange(len(unique)))  # logged beside each recall
            recall = itc_retrieval(module.qformer, Collate()(holdout), captions)
            return recall | {f"{k}_chance": v for k, v in chance.items()}

        def export(module: Any, out: Path) -> None:
            from pipelines.models import write_lineage

            module.qformer.save_pretrained(out)
            text_tok.save_pretrained(out / "text_tokenizer")
            write_lineage(
                out,
                corpus=config.corpus,
                features=inputs.features,
                holdout=config.holdout,
                max_text_len=max_len,
            )

        return JobParts(task=task, collate=Collate(), export=export, evaluate=evaluate,
                        final_artifacts=lambda module, run_dir: [plot_losses(run_dir)])  # fmt: skip


def caption_groups(captions: Sequence[str]) -> torch.Tensor:
    """(B,) int64 ITC group per row: a stable hash of the caption text (the same on every rank and
    run), so that in-batch rows with an identical caption are each other's positives."""
    return torch.tensor(
        [int.from_bytes(hashlib.blake2b(c.encode(), digest_size=8).digest(), "little", signed=True)
         for c in captions], dtype=torch.long,
    )  # fmt: skip


@torch.no_grad()
def itc_retrieval(
    qformer: Any, batch: dict[str, torch.Tensor], captions: Sequence[str]
) -> dict[str, float]:
    """Held-out image<->text recall@1/5/10 with the ITC features, many-to-many: a repeated caption
    is one candidate, and an image's hit is any caption equal to its own (templated corpora repeat
    captions; a one-to-one target would cap R@1 at 1/copies)."""
    from jobs.metrics import dedupe_captions, retrieval_recall

    img_ID = qformer.image_feature(qformer(batch["patch_features"]))
    unique, group_I = dedupe_captions(captions)
    first = {g: i for i, g in reversed(list(enumerate(group_I)))}
    rows = [first[g] for g in range(len(unique))]
    txt_TD = qformer.text_feature(
        qformer.encode_text(batch["input_ids"][rows], batch["attention_mask"][rows])
    )
    return retrieval_recall(img_ID, txt_TD, np.asarray(group_I), np.arange(len(unique)))
