"""What MLflow knows about a catalog's runs and models, read once and indexed for lineage and compare.

`seedpipe lineage`, `compare` and `status` answer from MLflow alone (a machine with only the
tracking server and no catalog answers the same), so this module is their one reader of it:

- **One read, then a graph in memory.** Every run of the experiment (paged `search_runs`, inputs
  included) and every registered model version, indexed by what links them: a dataset is
  `(name, full digest)` (the input tag `digest`; MLflow's own dataset digest is cut to 36 hex), a
  run's outputs are its inputs of context `output`, a model version is found by its `digest` tag
  and by its source run. Thousands of runs are a few MB; it avoids one filter query per edge and
  MLflow's tag-key quoting rules for dataset names.
- **Models a run applied.** Jobs log them as `model:<uri>` inputs (stage 2's stage-1 model,
  evaluate's tokenizer); derived stages record them as tags/params (`stage1_digest`,
  `tokenizer_digest`, with the URI in the param of the same name without `_digest`): both become
  `ModelUse`s, found in the registry by digest first, by URI second.
- **Errors say what exists.** A run id, model, version or alias that the store does not have is
  a `ValueError` listing what it has (the commands print it as one `error:` line, exit 2).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from pipelines.tracking.fields import DATASET_CONTEXT_TAG

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
MODEL_CONTEXTS = ("stage1", "tokenizer", "lora")
"""Contexts of `model:` inputs, and the params/tags `<context>` / `<context>_digest` of stage runs."""


@dataclass(frozen=True)
class DatasetUse:
    """A dataset a run read or wrote."""

    name: str
    digest: str
    context: str
    uri: str = ""
    rows: int | None = None


@dataclass(frozen=True)
class ModelUse:
    """A model a run applied or trained from (`uri` as the run recorded it)."""

    uri: str
    digest: str
    context: str


@dataclass
class RunInfo:
    run_id: str
    name: str
    status: str
    stage: str
    corpus: str
    start_ms: int
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]
    inputs: list[DatasetUse] = field(default_factory=list)
    outputs: list[DatasetUse] = field(default_factory=list)
    models: list[ModelUse] = field(default_factory=list)

    @property
    def summary(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "run_name": self.name, "status": self.status.lower(),
                "stage": self.stage, "corpus": self.corpus,
                "code_version": self.tags.get("code_version", "")}  # fmt: skip


@dataclass
class VersionInfo:
    name: str
    version: str
    digest: str
    kind: str
    run_id: str
    tags: dict[str, str]
    description: str = ""

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


class RunIndex:
    """Every run and model version of one experiment in a store (module docstring)."""

    def __init__(self, client: Any, *, uri: str, experiment: str) -> None:
        self.client, self.uri, self.experiment = client, uri, experiment
        self.runs: dict[str, RunInfo] = {}
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            token = None
            while True:
                page = client.search_runs([found.experiment_id], max_results=1000, page_token=token)
                for run in page:
                    self.runs[run.info.run_id] = _run_info(run)
                token = page.token
                if not token:
                    break
        self.versions = registered_versions(client)
        self._producers: dict[tuple[str, str], list[RunInfo]] = defaultdict(list)
        self._consumers: dict[str, list[RunInfo]] = defaultdict(list)
        for run in sorted(self.runs.values(), key=lambda r: r.start_ms):
            for use in run.outputs:
                self._producers[(use.name, use.digest)].append(run)
            for digest in {u.digest for u in run.inputs} | {m.digest for m in run.models}:
                self._consumers[digest].append(run)

    @classmethod
    def open(cls, root: str, experiment: str | None = None) -> RunIndex:
        """The index of the catalog's store (`pipelines.tracking.tracking_uri`)."""
        from pipelines.catalog import Catalog
        from pipelines.tracking import EXPERIMENT, mlflow_client, tracking_uri

        uri = tracking_uri(Catalog(root))
        return cls(mlflow_client(uri), uri=uri, experiment=experiment or EXPERIMENT)

    # ---- lookups
    def run(self, run_id: str) -> RunInfo:
        if run_id not in self.runs:
            raise ValueError(
                f"run {run_id}: no such run in experiment {self.experiment!r} at {self.uri}"
            )
        return self.runs[run_id]

    def producer(self, name: str, digest: str) -> RunInfo | None:
        """The run that wrote dataset `name` with `digest` (the first finished one, else the first)."""
        runs = self._producers.get((name, digest), [])
        return next((r for r in runs if r.status == "FINISHED"), runs[0] if runs else None)

    def consumers(self, digest: str) -> list[RunInfo]:
        """Runs that read a dataset or applied a model with `digest`, oldest first."""
        return list(self._consumers.get(digest, []))

    def versions_of_run(self, run_id: str) -> list[VersionInfo]:
        return [v for v in self.versions if v.run_id == run_id]

    def version_for(self, use: ModelUse) -> VersionInfo | None:
        """The registered version a run's model input names: by digest, else by its URI."""
        by_digest = [v for v in self.versions if v.digest == use.digest]
        named = _parse_model_uri(use.uri)
        for v in by_digest:
            if named and (v.name, v.version) == named:
                return v
        if by_digest:
            return by_digest[0]
        return next((v for v in self.versions if named and (v.name, v.version) == named), None)

    def version(self, ref: str) -> VersionInfo:
        """`models:/name/<version|latest>` or `models:/name@alias`; ValueError when there is none."""
        body = ref[len("models:/") :].strip("/")
        name, _, alias = body.partition("@")
        name, _, number = name.partition("/")
        mine = [v for v in self.versions if v.name == name]
        if not mine:
            known = sorted({v.name for v in self.versions})
            raise ValueError(
                f"{ref}: no registered model {name!r} at {self.uri} (registered: {', '.join(known) or 'none'})"
            )
        if alias:
            try:
                number = str(self.client.get_model_version_by_alias(name, alias).version)
            except MlflowException:
                raise ValueError(f"{ref}: model {name!r} has no alias {alias!r}") from None
        elif number == "latest" or not number:
            return max(mine, key=lambda v: int(v.version))
        for v in mine:
            if v.version == number:
                return v
        versions = ", ".join(v.version for v in sorted(mine, key=lambda v: int(v.version)))
        raise ValueError(f"{ref}: model {name!r} has no version {number} (versions: {versions})")

    def dataset_names(self) -> set[str]:
        return {name for name, _ in self._producers} | {
            u.name for r in self.runs.values() for u in r.inputs
        }

    def dataset_digests(self, name: str) -> list[str]:
        """Every digest recorded for dataset `name`, the most recently written last."""
        digests = [d for (n, d), runs in sorted(self._producers.items(), key=lambda kv: kv[1][0].start_ms)
                   if n == name]  # fmt: skip
        seen = [u.digest for r in self.runs.values() for u in r.inputs if u.name == name]
        return [d for d in dict.fromkeys(seen) if d not in digests] + digests

    def ingest_runs(self, corpus: str, *, until_ms: int) -> list[RunInfo]:
        """The finished ingest runs of `corpus` that added shards, up to `until_ms`, oldest first."""
        return [r for r in sorted(self.runs.values(), key=lambda r: r.start_ms)
                if r.stage == "ingest" and r.corpus == corpus and r.start_ms <= until_ms
                and r.status == "FINISHED" and r.metrics.get("new_shards", 1) > 0]  # fmt: skip


def registered_versions(client: Any) -> list[VersionInfo]:
    """Every registered model version in the store (paged)."""
    out, token = [], None
    while True:
        page = client.search_model_versions(max_results=1000, page_token=token)
        out += [_version_info(v) for v in page]
        token = page.token
        if not token:
            return out


def _version_info(v: Any) -> VersionInfo:
    tags = dict(v.tags or {})
    return VersionInfo(name=v.name, version=str(v.version), digest=tags.get("digest", ""),
                       kind=tags.get("kind", ""), run_id=v.run_id or "", tags=tags,
                       description=v.description or "")  # fmt: skip


def _run_info(run: Any) -> RunInfo:
    tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
    info = RunInfo(run_id=run.info.run_id, name=run.info.run_name or "", status=run.info.status,
                   stage=tags.get("stage", ""), corpus=tags.get("corpus", ""),
                   start_ms=run.info.start_time or 0, params=dict(run.data.params), tags=tags,
                   metrics=dict(run.data.metrics))  # fmt: skip
    for item in run.inputs.dataset_inputs if run.inputs else ():
        itags = {t.key: t.value for t in item.tags}
        ds = item.dataset
        digest = itags.get("digest", ds.digest)
        context = itags.get(DATASET_CONTEXT_TAG, "input")
        if ds.name.startswith("model:"):
            info.models.append(
                ModelUse(uri=ds.name[len("model:") :], digest=digest, context=context)
            )
            continue
        rows = itags.get("rows")
        use = DatasetUse(name=ds.name, digest=digest, context=context, uri=_source_uri(ds.source),
                         rows=int(rows) if rows and rows.isdigit() else None)  # fmt: skip
        (info.outputs if context == "output" else info.inputs).append(use)
    have = {m.digest for m in info.models}
    # stage runs: the model they applied, from tag or param (a job's digest tags describe its
    # inputs' lineage, e.g. a LoRA run's tokenizer_digest, and are not inputs of its own)
    for context in MODEL_CONTEXTS if "job" not in tags else ():
        digest = tags.get(f"{context}_digest") or info.params.get(f"{context}_digest") \
            or info.params.get(f"resolved.{context}_digest")  # fmt: skip
        if digest and digest not in have:
            uri = info.params.get(context) or info.params.get(f"resolved.{context}") or ""
            info.models.append(ModelUse(uri=uri, digest=digest, context=context))
    return info


def _source_uri(source: str) -> str:
    try:
        return str(json.loads(source).get("uri", ""))
    except (ValueError, AttributeError):
        return source


def _parse_model_uri(uri: str) -> tuple[str, str] | None:
    m = re.fullmatch(r"models:/([^/@]+)/(\d+)", uri or "")
    return (m.group(1), m.group(2)) if m else None


def dataset_name_of(ref: str) -> str:
    """A dataset folder (path) or name as its MLflow name (`<corpus>/raw`, `<corpus>/<stage>/<name>`)."""
    path = Path(ref).expanduser()
    if path.is_dir() or "/corpora/" in ref:
        text = str(path.resolve()) if path.exists() else ref
        if "/corpora/" not in text:
            raise ValueError(f"{ref}: not a dataset folder (no corpora/ in its path)")
        return text.split("/corpora/", 1)[1].strip("/")
    return ref.strip("/")
