"""Run names and tags that make MLflow's own run comparison useful (`seedpipe compare` reads them too).

- **A run name says what the run is.** Jobs: `<job>-<corpus>-<short experiment digest>`
  (`stage1-cc3m-1a2b3c4d`), the digest hashing the params that define the experiment (not the
  bookkeeping ones, `is_bookkeeping`) and the digests of its inputs: two runs share a name exactly
  when they trained the same config on the same data. An explicit `run.name` is kept in the middle
  (`stage1-cc3m-lr2-1a2b3c4d`). Stages: `<stage>-<corpus>-<output dataset>-<short input digest>`
  (`tokens-cc3m-seed-tokenizer-v1@80ce9ca71ddf-6b7cc336`). The name is set when the run is
  created; a resumed run keeps its own.
- **Tags to filter and group by** in the UI: `preset` (jobs) / `encoder` (features), and the digest
  of what the run was built from, by kind: `features_digest`, `qembeds_digest`, `tokens_digest`,
  `stage1_digest`, `tokenizer_digest` (a LoRA run gets the tokenizer digest its tokens dataset
  records in its schema metadata). `stage`, `corpus` and `code_version` come from the trackers.
- **Bookkeeping params** (where a run lives, how often it checkpoints, which cluster, which name
  it registers under) never change what a run computes: `is_bookkeeping` is the one list, used by
  the names here and by `seedpipe compare` to keep them out of "params that differ".
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from pipelines.catalog import digest_of

BOOKKEEPING = (
    "root", "address", "dry_run", "register_as", "json", "run.name", "run.storage_path",
    "run.max_failures", "run.checkpoint_every", "run.keep_checkpoints", "run.log_every",
    "run.collective_timeout_s", "fault.", "resources.", "eval_every", "eval_rows",
)  # fmt: skip
"""Param names (or `prefix.`es) that say where and how a run ran, not what it computed."""
SHORT = 8
DIGEST_TAGS = (
    "features_digest",
    "qembeds_digest",
    "tokens_digest",
    "stage1_digest",
    "tokenizer_digest",
)
_STAGE_OF_NAME = re.compile(r"^[^/]+/(features|qembeds|tokens)/")


def is_bookkeeping(param: str) -> bool:
    """Whether a (flattened) param is bookkeeping (module docstring)."""
    return any(param == b or (b.endswith(".") and param.startswith(b)) for b in BOOKKEEPING)


def experiment_digest(params: Mapping[str, Any], input_digests: Iterable[str]) -> str:
    """The identity of an experiment: its non-bookkeeping params and its inputs' digests."""
    defining = {k: str(v) for k, v in params.items() if not is_bookkeeping(k)}
    return digest_of({"params": defining, "inputs": sorted(input_digests)})


def job_run_name(*, job: str, corpus: str, folder: str, params: Mapping[str, Any],
                 input_digests: Iterable[str]) -> str:  # fmt: skip
    """`<job>-<corpus>[-<run.name>]-<short experiment digest>` (`folder` is the run folder name,
    `<job>-<corpus>` unless run.name was set; a run.name that already starts with `<job>-<corpus>-`,
    as `seedpipe demo` names its runs, is not prefixed twice)."""
    prefix = f"{job}-{corpus}"
    explicit = "" if folder == prefix else folder.removeprefix(f"{prefix}-")
    return "-".join(
        [
            prefix,
            *([explicit] if explicit else []),
            experiment_digest(params, input_digests)[:SHORT],
        ]
    )


def job_run_tags(config: Any, datasets: Iterable[Any]) -> dict[str, str]:
    """`preset` and the `<kind>_digest` tags of a training job, from its config and its input
    `DatasetRef`s (a `model:` input of context `stage1` is the stage-1 model)."""
    tags: dict[str, str] = {}
    if getattr(config, "preset", ""):
        tags["preset"] = str(config.preset)
    for ds in datasets:
        if ds.name.startswith("model:"):
            if ds.context in ("stage1", "tokenizer"):
                tags[f"{ds.context}_digest"] = ds.digest
            continue
        match = _STAGE_OF_NAME.match(ds.name)
        if match:
            tags[f"{match.group(1)}_digest"] = ds.digest
            if match.group(1) == "tokens" and (tokenizer := _tokenizer_digest(ds.uri)):
                tags["tokenizer_digest"] = tokenizer
    return tags


def stage_run_tags(stage: str, resolved: Mapping[str, Any], *, input_digest: str,
                   output_digest: str) -> dict[str, str]:  # fmt: skip
    """The tags of a derived stage's run, from what it resolved (`cli_common.run_stage`): the
    features it read (qembeds, tokens) or made (features, with its `encoder`), the model it applied."""
    tags = {k: str(resolved[k]) for k in ("stage1_digest", "tokenizer_digest") if resolved.get(k)}
    if stage == "features":
        tags["features_digest"] = output_digest
        if resolved.get("encoder"):
            tags["encoder"] = str(resolved["encoder"])
    else:
        tags["features_digest"] = input_digest
    return tags


def stage_run_name(stage: str, corpus: str, output_name: str, input_digest: str) -> str:
    """`<stage>-<corpus>-<output dataset>-<short input digest>`."""
    return f"{stage}-{corpus}-{output_name}-{input_digest[:SHORT]}"


def _tokenizer_digest(uri: str) -> str | None:
    """The `tokenizer_digest` a tokens dataset records in its parquet schema metadata (first
    shard); None when it cannot be read (a tag is not worth failing a job over)."""
    try:
        import pyarrow.fs as pafs
        import pyarrow.parquet as pq

        from pipelines.schemas import schema_meta

        fs, path = pafs.FileSystem.from_uri(uri)
        infos = fs.get_file_info(pafs.FileSelector(path))
        files = sorted(i.path for i in infos if i.path.endswith(".parquet"))
        return (
            schema_meta(pq.read_schema(files[0], filesystem=fs)).get("tokenizer_digest")
            if files
            else None
        )
    except Exception:  # noqa: BLE001 - see the docstring
        return None


EVALUATION_SUMMARY = ("i2t_r1_codes", "t2i_r1_codes", "i2t_r1_embeds", "t2i_r1_embeds", "codebook_usage",
                      "codebook_perplexity", "caption_cider", "t2i_r1")  # fmt: skip
"""The `seedpipe evaluate` metrics a registered model version carries as `eval.<name>` tags."""


def tag_version_evaluation(
    uri: str, version: Any, metrics: Mapping[str, float], split: str
) -> None:
    """Set the evaluation summary (`EVALUATION_SUMMARY` present in `metrics`, and `eval.split`) as
    tags of the registered `version`; a store that refuses is a warning, never a failed evaluation."""
    import logging

    from pipelines.tracking.store import mlflow_client

    tags = {f"eval.{k}": f"{metrics[k]:.4g}" for k in EVALUATION_SUMMARY if k in metrics}
    if not tags:
        return
    try:
        client = mlflow_client(uri)
        for key, value in (tags | {"eval.split": split}).items():
            client.set_model_version_tag(version.name, str(version.version), key, value)
    except Exception as err:  # noqa: BLE001 - see the docstring
        logging.getLogger(__name__).warning("could not tag %s/%s with its evaluation: %s",
                                            version.name, version.version, err)  # fmt: skip
