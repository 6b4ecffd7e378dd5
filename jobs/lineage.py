"""`seedpipe lineage`: where a model's or dataset's data came from, and what was built from it.

    seedpipe lineage REF... [--downstream] [--check] [--json] [--root R] [--experiment NAME]

REF: an MLflow run id (or run name), `models:/name/<version|latest>`, `models:/name@alias`, or a
dataset: its folder, or its name `<corpus>/raw` / `<corpus>/<stage>/<name>`, optionally
`@<digest prefix>` (default: the digest the catalog holds now when MLflow has it, else the last
one recorded).

Upstream (default), the chain back to the URL list, one node per line:
LoRA run -> tokens dataset -> tokenizer version -> stage-2 run -> qembeds dataset -> stage-1 model
-> stage-1 run -> features dataset (encoder, random init or weights) -> raw corpus -> the URL lists
ingested (digest, rows, downloaded, failed by cause, shards). Each node shows its MLflow run id and
status. Downstream (`--downstream`): every run that read the dataset or applied the model, what
those runs wrote and registered, recursively (what would be stale if it were replaced).

Design choices:
- **MLflow alone.** The walk reads only the tracking store (`jobs.run_index`): runs, their dataset
  inputs/outputs by full digest, registered versions by `digest` tag. Deleting the catalog (or
  running on another machine with only the server) gives the same tree. The catalog is read for
  two things only: the default digest of a dataset REF, and `--check`.
- **A dataset is linked to the run that wrote that exact digest**, not to the latest run on the
  folder: an incremental re-run writes a new digest and starts a new branch. The raw corpus lists
  every finished ingest of its corpus up to the run that wrote its digest (a corpus grows by ingests).
- **A node is expanded once**; later references say `(see above)` (the features dataset feeds both
  the stage-1 run and the tokens stage).
- **`--check`** re-hashes every committed file of every dataset on the chain against its
  completion record (`Catalog.open_verified`) and recomputes the dataset digest from the sound
  shards; a URL list is re-hashed. A node whose data no longer matches is reported with the shards
  at fault, and the exit status is 1. Unknown references are an `error:` line, exit 2.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.lineage_tree import SHORT, Node, describe, render
from jobs.run_index import (
    RUN_ID,
    DatasetUse,
    ModelUse,
    RunIndex,
    RunInfo,
    VersionInfo,
    dataset_name_of,
)
from pipelines.catalog import Catalog, IntegrityError, RecordError, dataset_digest
from pipelines.config import cli_main, parse_command


@dataclass(kw_only=True)
class LineageConfig:
    refs: list[str] = field(default_factory=list)
    """What to trace: run ids or names, models:/ URIs, dataset folders or names (name@digest)."""
    root: str = "./seed-data"
    """Catalog root: its tracking store (unless MLFLOW_TRACKING_URI), and its data for --check."""
    experiment: str = "seedpipe"
    """MLflow experiment the runs are in."""
    downstream: bool = False
    """List what was built from REF instead of what it was built from."""
    check: bool = False
    """Verify every dataset digest on the chain against the catalog (exit 1 on a mismatch)."""
    json: bool = False
    """Print the tree as JSON."""


# ---- resolving a reference
def resolve_ref(
    ref: str, index: RunIndex, catalog: Catalog | None
) -> RunInfo | VersionInfo | DatasetUse:
    """What `ref` names (module docstring); ValueError saying what exists when it names nothing."""
    if RUN_ID.match(ref):
        return index.run(ref)
    if ref.startswith("models:/"):
        return index.version(ref)
    named = [r for r in index.runs.values() if r.name == ref]
    if len(named) == 1:
        return named[0]
    name, prefix = dataset_name_of(ref), ""
    known = index.dataset_names()
    if name not in known and "@" in name:
        name, prefix = name.rsplit("@", 1)
    if name not in known:
        raise ValueError(
            f"{ref}: not a run id, a registered model or a dataset recorded in {index.uri} "
            f"(datasets: {', '.join(sorted(n for n in known if '/url-list/' not in n)) or 'none'})"
        )
    digests = index.dataset_digests(name)
    if prefix:
        matching = [d for d in digests if d.startswith(prefix)]
        if len(matching) != 1:
            raise ValueError(f"{ref}: {len(matching)} recorded digests of {name} start with {prefix!r} "
                             f"(recorded: {', '.join(d[:SHORT] for d in digests)})")  # fmt: skip
        return DatasetUse(name=name, digest=matching[0], context="ref")
    current = _catalog_digest(catalog, name) if catalog else None
    digest = current if current in digests else digests[-1]
    return DatasetUse(name=name, digest=digest, context="ref")


def _catalog_digest(catalog: Catalog, name: str) -> str | None:
    directory = f"{catalog.base}/corpora/{name}"
    if not catalog.exists(directory):
        return None
    return dataset_digest({s: r.digest for s, r in catalog.committed(directory).items()})


# ---- the walks
class Walk:
    """Builds the tree upstream or downstream from one node; each node is expanded once."""

    def __init__(self, index: RunIndex, *, downstream: bool = False) -> None:
        self.index, self.downstream = index, downstream
        self._seen: set[tuple[str, ...]] = set()

    def _first(self, key: tuple[str, ...], node: Node) -> bool:
        if key in self._seen:
            node.seen = True
            return False
        self._seen.add(key)
        return True

    def start(self, target: RunInfo | VersionInfo | DatasetUse) -> Node:
        if isinstance(target, RunInfo):
            return self.run_node(target)
        if isinstance(target, VersionInfo):
            return self.version_node(target)
        return self.dataset_node(target)

    def run_node(self, run: RunInfo) -> Node:
        node = Node("run", run.name or run.run_id, _run_fields(run), run=run.summary)
        if not self._first(("run", run.run_id), node):
            return node
        if self.downstream:
            node.children = [self.dataset_node(u) for u in run.outputs]
            node.children += [self.version_node(v) for v in self.index.versions_of_run(run.run_id)]
        elif run.stage == "ingest":
            node.children = [self.url_list_node(run)]
        else:
            node.children = self._inputs(run)
        return node

    def _inputs(self, run: RunInfo, skip: str = "") -> list[Node]:
        """Upstream children of a run: what it trained on, the models it applied, other inputs."""
        training = [u for u in run.inputs if u.context == "training" and u.name != skip]
        others = [u for u in run.inputs if u.context != "training" and u.name != skip]
        return ([self.dataset_node(u) for u in training] + [self.model_node(m) for m in run.models]
                + [self.dataset_node(u) for u in others])  # fmt: skip

    def version_node(self, version: VersionInfo, as_uri: str = "") -> Node:
        training = self.index.runs.get(version.run_id)
        fields = {"model_kind": version.kind, "digest": version.digest, "model": version.uri}
        if as_uri and as_uri != version.uri:
            fields["used_as"] = as_uri
        evaluation = {
            k[len("eval.") :]: v for k, v in sorted(version.tags.items()) if k.startswith("eval.")
        }
        if evaluation:  # `seedpipe evaluate`'s summary tags (pipelines.tracking.run_tags)
            fields["evaluation"] = evaluation
        node = Node("model", version.uri, fields, run=training.summary if training else None)
        if not self._first(("model", version.uri), node):
            return node
        if self.downstream:
            node.children = [self.run_node(r) for r in self.index.consumers(version.digest)]
        elif training is not None:
            node.children = [self.run_node(training)]
        return node

    def model_node(self, use: ModelUse) -> Node:
        version = self.index.version_for(use)
        if version is not None:
            return self.version_node(version, as_uri=use.uri)
        node = Node("model", use.uri or use.digest[:SHORT], {"digest": use.digest,
                    "note": "not a registered version in this store"})  # fmt: skip
        self._first(("model", use.digest), node)
        return node

    def dataset_node(self, use: DatasetUse) -> Node:
        producer = self.index.producer(use.name, use.digest)
        rows = use.rows if use.rows is not None else _rows_of(producer, use)
        fields: dict[str, Any] = {
            "name": use.name,
            "digest": use.digest,
            "rows": rows,
            "uri": use.uri,
        }
        node = Node("dataset", use.name, fields, run=producer.summary if producer else None)
        if not self._first(("dataset", use.name, use.digest), node):
            return node
        if producer is None:
            fields["note"] = "no recorded run wrote this digest"
        elif producer.stage == "features":
            fields["encoder"] = _encoder_text(producer)
        if self.downstream:
            node.children = [
                self.run_node(r) for r in self.index.consumers(use.digest) if r is not producer
            ]
        elif producer is not None and use.name.endswith("/raw"):
            ingests = self.index.ingest_runs(producer.corpus, until_ms=producer.start_ms) or [
                producer
            ]
            fields["shards"] = int(sum(r.metrics.get("new_shards", 0) for r in ingests))
            node.children = [self.url_list_node(r) for r in ingests]
        elif producer is not None:
            node.children = self._inputs(producer, skip=use.name)
        return node

    def url_list_node(self, run: RunInfo) -> Node:
        source = next(
            iter(run.inputs), DatasetUse(name="(unknown list)", digest="", context="input")
        )
        failures = {
            k[len("failures.") :]: int(v)
            for k, v in run.metrics.items()
            if k.startswith("failures.") and v
        }
        fields = {"name": source.name, "digest": source.digest, "uri": source.uri, "rows": source.rows,
                  "downloaded": int(run.metrics.get("successes", 0)),
                  "failed": int(run.metrics.get("failed_samples", sum(failures.values()))),
                  "failed_by_cause": failures, "shards": int(run.metrics.get("new_shards", 0))}  # fmt: skip
        node = Node(
            "url_list", source.uri.removeprefix("file://") or source.name, fields, run=run.summary
        )
        self._first(("url_list", run.run_id), node)
        return node


def _rows_of(producer: RunInfo | None, use: DatasetUse) -> int | None:
    if producer is None:
        return None
    return next(
        (u.rows for u in producer.outputs if u.name == use.name and u.digest == use.digest), None
    )


def _run_fields(run: RunInfo) -> dict[str, Any]:
    fields = {"stage": run.stage, "corpus": run.corpus}
    fields |= {k: run.tags[k] for k in ("preset", "encoder") if k in run.tags}
    return fields


def _encoder_text(run: RunInfo) -> str:
    """`tiny (vision: random init, target: random init)` from a features run's params."""
    p = run.params
    name = p.get("encoder") or p.get("resolved.encoder") or "?"
    parts = []
    for side in ("vision", "target"):
        weights = p.get(f"{side}.pretrained", p.get(f"resolved.{side}.pretrained"))
        if weights is not None:
            parts.append(f"{side}: {'random init' if weights in ('None', '') else weights}")
    return f"{name} ({', '.join(parts)})" if parts else name


# ---- --check
def check_tree(tree: Node, catalog: Catalog) -> int:
    """Verify every dataset and URL list of `tree` against the catalog; returns the nodes at fault."""
    bad = 0
    for node in tree.walk():
        if node.seen or node.kind not in ("dataset", "url_list"):
            continue
        node.checked = True
        node.problems = (check_dataset(catalog, node.label, node.fields["digest"]) if node.kind == "dataset"
                         else check_url_list(node))  # fmt: skip
        bad += bool(node.problems)
    return bad


def check_dataset(catalog: Catalog, name: str, digest: str) -> list[str]:
    """Why the catalog's `name` is no longer the data with `digest` (empty: it still is)."""
    directory = f"{catalog.base}/corpora/{name}"
    if not catalog.exists(directory):
        return [f"not in the catalog at {catalog.base}"]
    scan = catalog.scan(directory)
    problems = {sid: why for sid, why in scan.problems.items()}
    for sid, record in scan.records.items():
        for file in record.files:
            try:
                with catalog.open_verified(directory, sid, file) as reader:
                    reader.verify()
            except (IntegrityError, RecordError, OSError) as err:
                problems[sid] = str(err)
    sound = {s: r.digest for s, r in scan.records.items() if s not in problems}
    out = [f"shard {sid}: {why}" for sid, why in sorted(problems.items())]
    now = dataset_digest(sound)
    if now != digest:
        out.append(f"the catalog's sound shards ({len(sound)}) have digest {now[:SHORT]}, "
                   f"lineage recorded {digest[:SHORT]}")  # fmt: skip
    return out


def check_url_list(node: Node) -> list[str]:
    """A URL list that changed since it was ingested; one that is not here is noted, not a fault
    (it is input to the catalog, not part of it)."""
    uri, digest = node.fields.get("uri", ""), node.fields["digest"]
    path = Path(uri.removeprefix("file://"))
    if not uri.startswith("file://") or not path.is_file():
        node.fields["note"] = "not a file here: not checked"
        return []
    with open(path, "rb") as f:
        now = hashlib.file_digest(f, "sha256").hexdigest()
    return (
        []
        if now == digest
        else [f"{path} changed: sha256 {now[:SHORT]}, recorded {digest[:SHORT]}"]
    )


def describe_run(client: Any, uri: str, experiment: str, run_id: str) -> str:
    """One paragraph of a run's upstream lineage, read from MLflow (for `jobs.export`)."""
    index = RunIndex(client, uri=uri, experiment=experiment)
    return describe(Walk(index).run_node(index.run(run_id)))


def lineage(config: LineageConfig) -> tuple[list[Node], int]:
    """The trees of `config.refs` and the number of nodes --check found at fault."""
    if not config.refs:
        raise ValueError("give what to trace: a run id, models:/name/version, or a dataset")
    catalog = Catalog(config.root)
    index = RunIndex.open(config.root, config.experiment)
    targets = [resolve_ref(ref, index, catalog) for ref in config.refs]
    walk = Walk(index, downstream=config.downstream)
    trees = [walk.start(t) for t in targets]
    bad = sum(check_tree(t, catalog) for t in trees) if config.check else 0
    return trees, bad


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    """Print where a run, model or dataset came from (or, --downstream, what was built from it)."""
    config = parse_command(LineageConfig, argv, prog="seedpipe lineage", description="\n\n".join(__doc__.split("\n\n")[:3]),
                           positional="refs")  # fmt: skip
    trees, bad = lineage(config)
    if config.json:
        print(json.dumps([t.to_json() for t in trees], indent=1))
    else:
        for tree in trees:
            print("\n".join(render(tree)))
    if config.check:
        verdict = (
            f"check: {bad} node(s) whose data no longer matches"
            if bad
            else "check: every digest matches the catalog"
        )
        print(verdict, file=sys.stderr if config.json else sys.stdout)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
