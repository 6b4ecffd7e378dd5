"""`seedpipe evaluate`: is a tokenizer (and a LoRA LLM) better than chance, and by how much.

    seedpipe evaluate --corpus C --tokenizer REF [--lora REF] [--features F] [--split holdout|all]
                      [--json PATH] [--root R] [--num-workers N] [--num-gpus-per-worker G]

On the held-out split by default: the rows whose key hashes into the fraction the models were
trained without (`pipelines.datasets.is_holdout`, the jobs' own rule), the fraction read from the
exports (lineage.json / seed_lora.json `holdout`, else the training run's params): the smallest
recorded one, so that no evaluated row was trained on by any of the models.

- **Tokenizer, the SEED paper's retrieval table**: image->text and text->image R@1/5/10 with the
  continuous causal embeddings (`*_embeds`) and with the embeddings reconstructed from the 32 codes
  (`*_codes`), through the Q-Former's ITC heads. Many-to-many (`jobs.metrics.ImageCaptionIndex`):
  rows are grouped into images by sha256 (COCO-style corpora have a row per caption), captions
  are deduplicated as candidates, and an image's hit is any caption equal to one of its own;
  every recall sits beside its chance level for this split (`chance_at_k`).
- **Codebook**: usage, perplexity, dead codes over the split's images, and a usage histogram PNG.
- **Decoders**: reconstruction cosine to the continuous embeddings; generation-embedding cosine
  and MSE to the target.
- **LLM** (`--lora`): caption BLEU-4 / CIDEr-D / exact match of the captions of the split's codes;
  text-to-image from the split's distinct captions: `t2i_valid_fraction` (plain greedy decoding
  gives exactly 32 codes then `</img>`: the paper's valid-image count; the constrained decoder used
  for the scores below is valid by construction), `t2i_gen_cosine` (decoded generation embedding
  vs the true image's target) and `t2i_r1/5` (the true image among the split's targets, many-to-
  many as above). Captioning is scored once per image, against all of its captions; the valid
  fraction and the generation cosine are row-weighted (each row's caption is one generation), and
  `t2i_r1/5` are averaged over the split's distinct captions, each ranking the distinct images.
The model work runs on Ray Data over the cached features (`jobs.eval_data`; the ViT never runs);
the scores and the table are `jobs.eval_report`'s.
Results: a printed table, `--json PATH` (`{"metrics", "chance", "split", "models"}`), and an
MLflow stage run (`stage=evaluate`) whose metrics are linked to the logged model and the split.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import cli_common
from pipelines.catalog import Catalog, sha256_text
from pipelines.config import cli_main
from pipelines.datasets import DatasetRef
from pipelines.models import ModelRef, default_feature_set, resolve_model

JOB_DEFAULT_HOLDOUT = 0.05
"""`jobs.config.TrainJobConfig.holdout`'s default: the split of a model that records none."""


@dataclass(kw_only=True)
class EvaluateConfig(cli_common.StageConfig):
    tokenizer: str = ""
    """SeedTokenizer export directory or models:/ URI; default: the one the --lora was trained with."""
    lora: str = ""
    """LoRA export directory or models:/ URI: adds the LLM metrics (captions, text-to-image)."""
    features: str = ""
    """Features dataset name; default: the feature set the tokenizer was trained on."""
    stage1: str = ""
    """Stage-1 export whose caption tokenizer the text branch uses; default: the tokenizer's lineage."""
    split: str = "holdout"
    """`holdout` (rows no model was trained on) or `all` (every committed row)."""
    holdout: float | None = None
    """Held-out fraction; default: the smallest one the models record (else the jobs' 0.05)."""
    json: str = ""
    """Also write {"metrics", "chance", "split", "models"} to this JSON file."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.split not in ("holdout", "all"):
            raise ValueError(f"split must be 'holdout' or 'all', got {self.split!r}")
        if self.holdout is not None and not 0 < self.holdout < 0.5:
            raise ValueError(f"holdout must be in (0, 0.5), got {self.holdout}")


@dataclass(frozen=True, kw_only=True)
class EvalInputs:
    tokenizer: ModelRef
    tokenizer_digest: str
    stage1: ModelRef
    lora: ModelRef | None
    lora_meta: dict[str, Any]
    features: str
    files: list[str]
    dataset: DatasetRef
    """The features dataset the split is taken from."""
    fraction: float
    """Held-out fraction of the split (unused for split=all)."""
    fraction_source: str
    worker_kwargs: dict[str, Any]
    num_codes: int


def registered_version(ref: ModelRef, catalog: Catalog) -> Any:
    """The MLflow ModelVersion of a `models:/` reference, None for a directory or when unknown."""
    if not ref.uri.startswith("models:/"):
        return None
    from pipelines.tracking import mlflow_client, tracking_uri

    model, _, alias = ref.uri[len("models:/") :].strip("/").partition("@")
    model, _, version = model.partition("/")
    try:
        client = mlflow_client(tracking_uri(catalog))
        if alias:
            return client.get_model_version_by_alias(model, alias)
        return client.get_model_version(
            model, ref.name.rsplit("-v", 1)[1] if version == "latest" else version
        )
    except Exception:  # a store that cannot say only loses the links, never the evaluation
        return None


def recorded_holdout(ref: ModelRef, record: dict[str, Any], catalog: Catalog) -> float | None:
    """The held-out fraction `ref` was trained with: its export record, else its run's params."""
    if record.get("holdout") is not None:
        return float(record["holdout"])
    mv = registered_version(ref, catalog)
    try:
        from pipelines.tracking import mlflow_client, tracking_uri

        value = (
            mlflow_client(tracking_uri(catalog)).get_run(mv.run_id).data.params.get("holdout")
            if mv
            else None
        )
        return float(value) if value is not None else None
    except Exception:
        return None


def split_fraction(config: EvaluateConfig, recorded: dict[str, float | None]) -> tuple[float, str]:
    """(fraction, where it came from) from {model role: recorded fraction}: the smallest recorded one.
    is_holdout's cut is monotonic in the fraction, so those rows are held out from every model; a
    larger --holdout would evaluate rows some model was trained on."""
    known = {uri: f for uri, f in recorded.items() if f is not None}
    if config.holdout is not None:
        if known and config.holdout > min(known.values()) + 1e-12:
            warnings.warn(f"--holdout {config.holdout} is larger than the {min(known.values())} some model "
                          f"was trained without ({known}): the split includes rows it was trained on", stacklevel=2)  # fmt: skip
        return config.holdout, "--holdout"
    if not known:
        warnings.warn(
            f"no model records its held-out fraction; using the jobs' default {JOB_DEFAULT_HOLDOUT}",
            stacklevel=2,
        )
        return JOB_DEFAULT_HOLDOUT, "the jobs' default"
    return min(known.values()), "the models' records: " + ", ".join(
        f"{k} {v:g}" for k, v in known.items()
    )


def resolve(config: EvaluateConfig) -> EvalInputs:
    """Models, feature set, files and split of `config`; ValueError naming what is missing."""
    import pyarrow.parquet as pq

    from jobs.eval_data import resolve_models
    from pipelines.datasets import committed_dataset
    from pipelines.schemas import schema_shapes
    from seed_core.tokenizer import SeedTokenizer

    catalog = Catalog(config.root)
    tokenizer, lora, lora_meta = resolve_models(catalog, config.tokenizer, config.lora)
    tok = SeedTokenizer.from_pretrained(tokenizer.directory)
    if lora and lora_meta["tokens"].get("tokenizer_digest") not in ("", None, tok.digest):
        warnings.warn(f"{lora.uri} was trained on the codes of another tokenizer "
                      f"({lora_meta['tokens'].get('tokenizer_uri')}) than {tokenizer.uri}", stacklevel=2)  # fmt: skip
    stage1_uri = config.stage1 or tokenizer.lineage.get("stage1", "")
    if not stage1_uri:
        raise ValueError(
            f"{tokenizer.uri} records no stage-1 model (lineage.json); pass --stage1 <export>"
        )
    stage1 = resolve_model(stage1_uri, catalog)
    if not Path(stage1.directory, "text_tokenizer").is_dir():
        raise ValueError(f"{stage1_uri} has no text_tokenizer/: not a seedpipe stage-1 export")
    features = config.features or default_feature_set(tokenizer, catalog, config.corpus)
    files, dataset = committed_dataset(catalog, catalog.stage_dir(config.corpus, "features", features),
                                       f"features ({features})", context="eval")  # fmt: skip
    shapes = schema_shapes(pq.read_schema(files[0]))
    target = next(c for c in shapes if c.startswith("target_"))
    recorded = {"tokenizer": recorded_holdout(tokenizer, tokenizer.lineage, catalog),
                "stage1": recorded_holdout(stage1, stage1.lineage, catalog)}  # fmt: skip
    if lora:
        recorded["lora"] = recorded_holdout(lora, lora_meta, catalog)
    fraction, source = split_fraction(config, recorded)
    kwargs = {"tokenizer_dir": tokenizer.directory, "text_tokenizer_dir": str(Path(stage1.directory, "text_tokenizer")),
              "patch_shape": list(shapes["patch_features"]), "target_column": target, "target_shape": list(shapes[target]),
              "max_text_len": int(stage1.lineage.get("max_text_len") or tok.config.qformer.max_text_len),
              "keep_target": lora is not None, "lora_dir": lora.directory if lora else None}  # fmt: skip
    return EvalInputs(tokenizer=tokenizer, tokenizer_digest=tok.digest, stage1=stage1, lora=lora, lora_meta=lora_meta,
                      features=features, files=files, dataset=dataset, fraction=fraction, fraction_source=source,
                      worker_kwargs=kwargs, num_codes=tok.config.num_codes)  # fmt: skip


def eval_split_ref(inputs: EvalInputs, split: str, rows: int | None = None) -> DatasetRef:
    """The evaluated split as a dataset: the features dataset's identity + the split rule."""
    rule = "all" if split == "all" else f"holdout={inputs.fraction:g}"
    return dataclasses.replace(inputs.dataset, name=f"{inputs.dataset.name}:{rule}",
                               digest=sha256_text(inputs.dataset.digest, rule), rows=rows)  # fmt: skip


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Resolve, run the workers on Ray Data, score, print, write --json and log to MLflow."""
    from jobs.eval_data import run_eval_rows, run_text_to_image
    from jobs.eval_report import compute_metrics, format_table
    from pipelines.tracking import stage_run

    catalog = Catalog(config.root)
    inputs = resolve(config)
    split_text = (
        "all rows"
        if config.split == "all"
        else f"held-out split {inputs.fraction:g} (from {inputs.fraction_source})"
    )
    models = {"tokenizer": inputs.tokenizer.uri, "tokenizer_digest": inputs.tokenizer_digest,
              "stage1": inputs.stage1.uri, "lora": inputs.lora.uri if inputs.lora else None}  # fmt: skip
    print(f"evaluate: {config.corpus}/features/{inputs.features} ({len(inputs.files)} files), {split_text}; "
          f"tokenizer {inputs.tokenizer.uri}" + (f", LLM {inputs.lora.uri}" if inputs.lora else ""), flush=True)  # fmt: skip
    if config.dry_run:
        print("evaluate: dry run, nothing computed or written", flush=True)
        return {}
    cli_common.ensure_ray(config.address)
    resolved = {"features": inputs.features, "split_fraction": inputs.fraction, **models}
    with stage_run(
        catalog,
        stage="evaluate",
        corpus=config.corpus,
        config=dataclasses.asdict(config) | resolved,
    ) as run:
        rows = run_eval_rows(inputs.files, filesystem=None, fraction=inputs.fraction, split=config.split,
                             worker_kwargs=inputs.worker_kwargs, resources=config.resources)  # fmt: skip
        count = len(rows.get("key", ()))
        if count < 2:
            raise ValueError(f"the {split_text} of {config.corpus}/features/{inputs.features} has {count} rows; "
                             "retrieval needs at least 2 (use --split all or a larger --holdout)")  # fmt: skip
        split = eval_split_ref(inputs, config.split, count)
        t2i = None
        if inputs.lora:
            t2i = run_text_to_image(sorted(set(rows["caption"])), lora_dir=inputs.lora.directory,
                                    tokenizer_dir=inputs.tokenizer.directory, resources=config.resources)  # fmt: skip
        metrics, chance = compute_metrics(rows, inputs.num_codes, t2i)
        split_info = {"name": config.split, "fraction": inputs.fraction if config.split == "holdout" else None,
                      "fraction_source": inputs.fraction_source, "rows": count,
                      "captions": len(set(rows["caption"])), "dataset": split.name, "digest": split.digest}  # fmt: skip
        result = {"metrics": metrics, "chance": chance, "split": split_info, "models": models}
        rule = "all rows" if config.split == "all" else f"held-out {inputs.fraction:g}"
        title = f"evaluate {config.corpus} ({inputs.features}, {rule}): {count} images, {split_info['captions']} distinct captions"
        table = format_table(metrics, chance, title)
        print(table, flush=True)
        if config.json:
            Path(config.json).parent.mkdir(parents=True, exist_ok=True)
            Path(config.json).write_text(json.dumps(result, indent=2, sort_keys=True))
            print(f"evaluate: wrote {config.json}", flush=True)
        _log(run, catalog, inputs, split, metrics, chance, rows["codes"], table, result)
        print(f"evaluate: MLflow run folder {run.run_dir}", flush=True)
    return result


def _log(run: Any, catalog: Catalog, inputs: EvalInputs, split: DatasetRef, metrics: dict[str, float],
         chance: dict[str, float], codes: np.ndarray, table: str, result: dict[str, Any]) -> None:  # fmt: skip
    """The split and models as inputs; metrics linked to the logged model (tokenizer metrics to the
    tokenizer's, LLM metrics to the adapter's) and to the split; table, plot and result as artifacts."""
    from jobs.eval_report import LLM_METRICS, usage_plot
    from jobs.export import model_digest
    from pipelines.tracking.fields import MAX_DIGEST
    from pipelines.tracking.run_tags import tag_version_evaluation

    run.log_dataset(**split.as_kwargs())
    models = [("tokenizer", inputs.tokenizer, "seed_tokenizer"), ("stage1", inputs.stage1, "causal_qformer"),
              ("lora", inputs.lora, "lora_adapter")]  # fmt: skip
    for context, ref, kind in models:
        if ref is not None:  # identified as their registration identifies them (jobs.export)
            digest = (
                inputs.tokenizer_digest
                if kind == "seed_tokenizer"
                else model_digest(kind, ref.directory)
            )
            run.log_dataset(name=f"model:{ref.uri}", digest=digest, uri=Path(ref.directory).as_uri(), context=context)  # fmt: skip
    for ref, llm in ((inputs.tokenizer, False), (inputs.lora, True)):
        names = [n for n in metrics if (n in LLM_METRICS) == llm]
        if ref is None or not names:
            continue
        mv = registered_version(ref, catalog)
        model_id = (mv.tags.get("model_id") or getattr(mv, "model_id", None)) if mv else None
        # linked points first; StageRun.log_metrics below then records the values locally, and the
        # tracker drops its own second copy of each key at the same step
        run.tracker.log_metrics({n: metrics[n] for n in names}, step=0, model_id=model_id,
                                dataset_name=split.name, dataset_digest=split.digest[:MAX_DIGEST])  # fmt: skip
        if mv is not None:  # the registry's summary of the version (R@1 from codes, usage, ...)
            summary = {n: metrics[n] for n in names}
            tag_version_evaluation(run.tracker.tracking_uri, mv, summary, split.name)
    run.log_metrics(metrics | {f"chance/{k}": v for k, v in chance.items()}, step=0)
    table_path = Path(run.run_dir, "evaluation.txt")
    table_path.write_text(table + "\n")
    run.tracker.log_artifact(table_path)
    plot = usage_plot(codes, inputs.num_codes, Path(run.run_dir, "codebook_usage.png"), metrics)
    run.tracker.log_artifact(plot)
    run.log_dict(result, "evaluation.json")


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    config = cli_common.parse_stage(EvaluateConfig, argv, prog="seedpipe evaluate", doc=__doc__)
    evaluate(config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
