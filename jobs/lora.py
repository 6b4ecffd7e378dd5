"""LoRA tuning of a causal LM on a tokens dataset: image-to-text and text-to-image (SEED's LLM side).

Reads `tokens/<name>/` (32 codes + caption per image), extends the LLM's vocabulary with the image
tokens, wraps it with LoRA (seed_core.llm) and trains `seed_core.tasks.LoraTask` on a per-batch
mix of image-to-text and text-to-image examples. Exports the PEFT adapter (`jobs.lora_export`)
and registers it as `seed-lora`. The entry point is `jobs.train_lora`.

Design choices:
- The mix is decided per batch, not per row: the round(i2t_fraction * B) rows with the smallest
  seeded key hashes become image-to-text, the others text-to-image. It is deterministic (a resumed
  run sees the same examples), every step has both loss terms, and since batches are reshuffled
  each epoch a pair is not tied to one direction for the whole run.
- The codebook size comes from the tokens dataset's schema metadata (written by the tokens stage
  from the tokenizer), checked against the codes themselves; no tracking store is needed.
- `tiny-opt` is a random OPT saved once into the run folder (like the caption-trained text
  tokenizer), so that every rank, every restart and the export agree on the base weights.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from jobs import config as cfg
from jobs.job import Job, JobParts, Prepared, RunContext, run_folder
from jobs.lora_export import TINY_LLM, LoraExportInfo, build_tiny_llm, export_lora
from jobs.plots import plot_losses
from seed_core.llm import LoraSettings


@dataclass(kw_only=True)
class LoraJobConfig(cfg.TrainJobConfig):
    tokens: str = ""
    """Tokens dataset (`tokens/<name>/`) or `<corpus>@<name>`; default: the one made by the newest
    registered seed-tokenizer (else the corpus's only tokens dataset)."""
    llm: str = "facebook/opt-2.7b"
    """Base causal LM: HF model directory or hub id (SEED-OPT2.7B), or `tiny-opt` (random, CPU tests)."""
    llm_tokenizer: str = ""
    """'' = the LLM's own; 'train' = byte-level BPE trained on the training captions; else a dir/hub id."""
    train_vocab_size: int = 1000
    """Vocabulary size of the caption-trained tokenizer (llm_tokenizer=train)."""
    num_codes: int = 0
    """Codebook size K of the image tokenizer; 0 = from the tokens dataset's metadata."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    i2t_fraction: float = 0.5
    """Share of each batch that is image-to-text (captioning); the rest is text-to-image (SEED: half)."""
    max_length: int = 96
    """Examples are padded to this length (static shapes); only captions are ever truncated."""
    register_as: str = "seed-lora"
    """MLflow registered-model name of the export."""
    optim: cfg.OptimSettings = field(
        # Our choice: the SEED papers do not publish the LoRA optimiser; 2e-4 is the usual LoRA lr
        # (1e-4..3e-4) and weight decay 0 keeps the image-token row deltas from decaying to their init.
        default_factory=lambda: cfg.OptimSettings(
            lr=2e-4,
            min_lr=2e-5,
            warmup_steps=500,
            weight_decay=0.0,
            batch_size_per_worker=32,
            max_steps=10000,
        )  # fmt: skip
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.i2t_fraction <= 1.0:
            raise ValueError(f"i2t_fraction must be in [0, 1], got {self.i2t_fraction}")
        if self.num_codes < 0:
            raise ValueError(
                f"num_codes must be >= 0 (0 = from the tokens dataset), got {self.num_codes}"
            )
        if self.max_length < 16:
            raise ValueError(f"max_length must be >= 16, got {self.max_length}")
        if self.llm == TINY_LLM and not self.llm_tokenizer:
            raise ValueError(
                f"llm_tokenizer: {TINY_LLM} has no tokenizer of its own; use 'train' or a tokenizer dir"
            )
        if self.train_vocab_size < 300:
            raise ValueError(f"train_vocab_size must be >= 300, got {self.train_vocab_size}")


@dataclass(frozen=True, kw_only=True)
class LoraInputs:
    llm: str
    """Base model directory or hub id (the saved tiny-opt for `tiny-opt`)."""
    base_in_export: bool
    """Copy the base into the export (a random base cannot be re-downloaded)."""
    text_tokenizer: str
    num_codes: int
    num_tokens: int
    """Image tokens per image (32)."""
    tokens: LoraExportInfo
    train_files: list[str]


def resolve_tokens(config: LoraJobConfig) -> LoraJobConfig:
    """The config with `tokens` resolved: a default when empty, `<corpus>@<name>` split.

    A name is first looked up as is in `corpus` (tokenizer ids contain '@' themselves); only when
    no such dataset exists and `<prefix>/tokens/<rest>` does, the prefix is taken as the corpus.
    """
    from pipelines.catalog import Catalog

    catalog = Catalog(config.root)
    if not config.tokens:
        return dataclasses.replace(config, tokens=default_tokens(catalog, config.corpus))
    if "@" not in config.tokens or catalog.committed(
        catalog.stage_dir(config.corpus, "tokens", config.tokens)
    ):
        return config
    corpus, name = config.tokens.split("@", 1)
    try:
        directory = catalog.stage_dir(corpus, "tokens", name)
    except ValueError:
        return config
    if not catalog.committed(directory):
        return config
    if corpus != config.corpus:
        print(
            f"lora: corpus {corpus!r} from tokens={config.tokens} (config said {config.corpus!r})"
        )
    return dataclasses.replace(config, corpus=corpus, tokens=name)


def default_tokens(catalog: Any, corpus: str, registered_name: str = "seed-tokenizer") -> str:
    """The corpus's tokens dataset made by the newest registered `registered_name` version
    (tokens datasets are named `<name>-v<version>@<digest12>`), else its only tokens dataset."""
    from pipelines.datasets import list_datasets, only_dataset

    available = list_datasets(catalog, corpus, "tokens")
    newest = _newest_version(catalog, registered_name)
    if newest is not None:
        made = [n for n in available if n.startswith(f"{registered_name}-v{newest}@")]
        if made:
            return made[0]
    if len(available) == 1:
        return available[0]
    hint = f" (none made by {registered_name} v{newest})" if newest is not None else ""
    return only_dataset(catalog, corpus, "tokens", "tokens" + hint)


def _newest_version(catalog: Any, name: str) -> int | None:
    """The newest version number of a registered model in the catalog's store, None if none."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipelines.tracking import tracking_uri

    uri = tracking_uri(catalog)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
        return None  # no store yet: do not create one just to look
    try:
        versions = mlflow.MlflowClient(uri, registry_uri=uri).search_model_versions(
            f"name = '{name}'"
        )
    except MlflowException:
        return None
    return max((int(v.version) for v in versions), default=None)


def i2t_rows(keys: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    """Which rows of a batch are image-to-text: the round(fraction * B) smallest seeded key hashes.

    With 0 < fraction < 1 and B >= 2 each direction gets at least one row, so both loss terms are
    defined on every step (and the per-rank term lists stay identical for the all-reduce).
    """
    b = len(keys)
    n = round(fraction * b)
    if 0 < fraction < 1 and b >= 2:
        n = min(max(n, 1), b - 1)
    hashes = [int(hashlib.md5(f"{seed}:{k}".encode()).hexdigest()[:12], 16) for k in keys]
    out = np.zeros(b, dtype=bool)
    out[np.argsort(hashes, kind="stable")[:n]] = True
    return out


class MemoizedEncoder:
    """A tokenizer whose `encode` is memoized (bounded LRU); every other attribute is the tokenizer's.

    Why: each example encodes its direction's constant prompt twice and its caption once, and every
    epoch after the first encodes the same captions again; in the demo's LoRA job that encoding was
    7.8% of a training step (py-spy). The ids are those of the tokenizer (a fresh list per call).
    """

    def __init__(self, tokenizer: Any, maxsize: int = 1 << 16) -> None:
        self.tokenizer = tokenizer
        self._encode = functools.lru_cache(maxsize=maxsize)(self._encode_uncached)

    def _encode_uncached(self, text: str, add_special_tokens: bool) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._encode(text, add_special_tokens))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


def pad_examples(
    examples: Sequence[dict[str, list[int]]], pad_id: int, length: int
) -> dict[str, torch.Tensor]:
    """collate_examples, then right-padded to a fixed `length` (static shapes for every step)."""
    from seed_core.llm import IGNORE_INDEX, collate_examples

    batch = collate_examples(examples, pad_id)
    extra = length - batch["input_ids"].shape[1]
    assert extra >= 0, "examples are built with max_length"
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    return {k: nn.functional.pad(v, (0, extra), value=fill[k]) for k, v in batch.items()}


def load_llm(config: LoraJobConfig, inputs: LoraInputs) -> tuple[nn.Module, Any, Any]:
    """(PEFT model, extended text tokenizer, ImageTokenSpace), seeded alike on every rank."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jobs.trainer import training_precision
    from seed_core.llm import add_image_tokens, apply_lora

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        training_precision(config)
    ]
    tokenizer = AutoTokenizer.from_pretrained(inputs.text_tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.run.seed)  # LoRA A init: the same on every rank
        # loaded once in the training dtype, so a 2.7B base is never materialised in fp32 first
        base = AutoModelForCausalLM.from_pretrained(inputs.llm, dtype=dtype)
        space = add_image_tokens(
            tokenizer, base, inputs.num_codes, num_tokens_per_image=inputs.num_tokens
        )
        model = apply_lora(base, config.lora, space)
    return model, tokenizer, space


class LoraJob(Job[LoraJobConfig, LoraInputs]):
    name = "lora"
    config_cls = LoraJobConfig
    export_kind = "lora_adapter"

    def resolve(self, config: LoraJobConfig) -> LoraJobConfig:
        return resolve_tokens(config)

    def prepare(self, config: LoraJobConfig) -> Prepared[LoraInputs]:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
        from transformers import AutoTokenizer

        from pipelines.catalog import Catalog
        from pipelines.datasets import committed_dataset, is_holdout, list_datasets
        from pipelines.schemas import schema_meta, schema_shapes

        catalog = Catalog(config.root)
        directory = catalog.stage_dir(config.corpus, "tokens", config.tokens)
        if not catalog.committed(directory):
            names = list_datasets(catalog, config.corpus, "tokens")
            raise ValueError(f"tokens={config.tokens!r}: no committed tokens dataset in corpus "
                             f"{config.corpus!r} (available: {', '.join(names) or 'none'})")  # fmt: skip
        files, lineage = committed_dataset(catalog, directory, "tokens")
        schema = pq.read_schema(files[0])
        meta = schema_meta(schema)
        if meta.get("stage") != "tokens" or not {"key", "caption", "codes"} <= set(schema.names):
            raise ValueError(f"{directory} is not a tokens dataset (stage {meta.get('stage')!r})")
        (num_tokens,) = schema_shapes(schema)["codes"]
        recorded = int(meta.get("num_codes", 0))
        if config.num_codes and recorded and config.num_codes != recorded:
            raise ValueError(
                f"num_codes={config.num_codes} but the tokenizer that made {config.tokens} has {recorded}"
            )
        num_codes = config.num_codes or recorded
        if not num_codes:
            raise ValueError(
                f"num_codes: {config.tokens} does not record its codebook size; set num_codes=<K>"
            )
        sample = (
            pq.read_table(files[0], columns=["codes"]).column("codes").combine_chunks().flatten()
        )
        low, high = pc.min(sample).as_py(), pc.max(sample).as_py()
        if sample.null_count or low is None or low < 0 or high >= num_codes:
            raise ValueError(f"num_codes={num_codes}: codes in {files[0]} span [{low}, {high}]")
        if config.max_length < num_tokens + 10:
            raise ValueError(
                f"max_length={config.max_length} cannot hold <img> + {num_tokens} codes + </img> + prompt"
            )

        folder = run_folder(config, self.name)
        text_tokenizer = config.llm_tokenizer or config.llm
        if config.llm_tokenizer == "train":
            tokenizer_dir = folder.local / "text_tokenizer"
            if not folder.pull("text_tokenizer"):  # a restarted run keeps its first tokenizer
                from seed_core.llm import train_caption_tokenizer

                captions = []
                for f in files:
                    table = pq.read_table(f, columns=["key", "caption"])
                    keep = ~is_holdout(table.column("key").to_pylist(), config.holdout)
                    captions += [
                        c
                        for c, k in zip(table.column("caption").to_pylist(), keep, strict=True)
                        if k and c
                    ]
                train_caption_tokenizer(
                    captions, vocab_size=config.train_vocab_size
                ).save_pretrained(tokenizer_dir)
                folder.push("text_tokenizer")
            text_tokenizer = str(tokenizer_dir)
        llm, base_in_export = config.llm, False
        if config.llm == TINY_LLM:
            llm_dir = folder.local / "tiny_llm"
            if not folder.pull("tiny_llm"):
                tok = AutoTokenizer.from_pretrained(text_tokenizer)
                build_tiny_llm(len(tok), max_positions=max(128, config.max_length), tokenizer=tok,
                               seed=config.run.seed).save_pretrained(llm_dir)  # fmt: skip
                folder.push("tiny_llm")
            llm, base_in_export = folder.uri_of("tiny_llm"), True
        if text_tokenizer == str(folder.local / "text_tokenizer"):
            text_tokenizer = folder.uri_of("text_tokenizer")  # what the workers fetch
        tokens = LoraExportInfo(name=lineage.name, digest=lineage.digest, tokenizer_id=meta.get("tokenizer_id", ""),
                                tokenizer_digest=meta.get("tokenizer_digest", ""),
                                tokenizer_uri=meta.get("tokenizer_uri", ""))  # fmt: skip
        inputs = LoraInputs(llm=llm, base_in_export=base_in_export, text_tokenizer=text_tokenizer, num_codes=num_codes,
                            num_tokens=num_tokens, tokens=tokens, train_files=files)  # fmt: skip
        return Prepared(train_files=files, inputs=inputs, input_datasets=[lineage])

    def build(self, config: LoraJobConfig, inputs: LoraInputs, ctx: RunContext) -> JobParts:
        import dataclasses

        from ray.data.collate_fn import ArrowBatchCollateFn

        from pipelines.storage import local_copy

        # run-folder files on an object store: this node's copy (hub ids and local paths pass)
        inputs = dataclasses.replace(inputs, text_tokenizer=local_copy(inputs.text_tokenizer),
                                     llm=local_copy(inputs.llm))  # fmt: skip

        from jobs.lora_eval import evaluate_lora
        from pipelines.datasets import load_holdout
        from pipelines.schemas import from_fixed_list
        from seed_core.llm import build_image_to_text_example, build_text_to_image_example
        from seed_core.tasks import LoraTask

        model, tokenizer, space = load_llm(config, inputs)
        task = LoraTask(model, space)
        max_len, num_tokens, seed = config.max_length, inputs.num_tokens, config.run.seed
        pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )

        encoder = MemoizedEncoder(tokenizer)

        class Collate(ArrowBatchCollateFn):
            """Arrow rows (key, caption, codes) -> (B, max_length) input_ids/attention_mask/labels + i2t."""

            def __init__(self, directions: str = "mix") -> None:
                self.directions = directions  # "mix": the training mix; "both": every row both ways

            def __call__(self, batch: Any) -> dict[str, torch.Tensor]:
                codes = torch.from_numpy(
                    from_fixed_list(batch.column("codes"), (num_tokens,)).astype(np.int64)
                )
                captions = [c or "" for c in batch.column("caption").to_pylist()]
                if self.directions == "both":
                    i2t = np.array([True] * len(captions) + [False] * len(captions))
                    codes, captions = torch.cat([codes, codes]), captions + captions
                else:
                    i2t = i2t_rows(batch.column("key").to_pylist(), config.i2t_fraction, seed)
                examples = [
                    (build_image_to_text_example if d else build_text_to_image_example)(
                        c, cap, encoder, space, max_length=max_len
                    )
                    for c, cap, d in zip(codes, captions, i2t, strict=True)
                ]
                return pad_examples(examples, pad_id, max_len) | {"i2t": torch.from_numpy(i2t)}

        holdout = load_holdout(
            inputs.train_files, config.holdout, config.eval_rows, ["key", "caption", "codes"]
        )

        def evaluate(module: Any) -> dict[str, float]:
            # Only rank 0's numbers are logged; without ZeRO-3 the other ranks need not run the forward.
            if (
                holdout is None
                or holdout.num_rows == 0
                or (ctx.rank != 0 and config.deepspeed.zero_stage < 3)
            ):
                return {}
            return evaluate_lora(module, tokenizer, space, holdout, Collate("both"),
                                 batch_size=config.optim.batch_size_per_worker, max_length=max_len)  # fmt: skip

        def export(module: Any, out: Path) -> None:
            export_lora(module.model, tokenizer, space, out, config=config, llm=inputs.llm,
                        base_in_export=inputs.base_in_export, tokens=inputs.tokens)  # fmt: skip

        return JobParts(task=task, collate=Collate(), export=export, evaluate=evaluate,
                        final_artifacts=lambda module, run_dir: [plot_losses(run_dir)])  # fmt: skip
