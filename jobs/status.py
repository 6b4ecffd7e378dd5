"""`seedpipe status`: the catalog at a glance, and what is stale.

    seedpipe status [--corpus C] [--root R] [--json]

For each corpus: the raw corpus and every derived dataset (name, digest, shards committed, rows,
bytes, the model or encoder that made it, from the parquet schema metadata), and for each derived
dataset the shards a run of its stage would build now. Then, for each registered tokenizer version
(MLflow, `kind` = seed_tokenizer), what `seedpipe tokenize --tokenizer models:/...` would do on
every corpus: nothing, some shards, or all of them (not tokenized with it yet).

Design choices:
- **Staleness is by input digest.** A derived shard records the digest of the input shard it was
  made from (`DoneRecord.input_digest`); `missing` = input shard without output, `stale` = input
  shard whose digest changed, `orphaned` = output whose input shard is gone, `after upstream` =
  shards that will need building once the input dataset's own missing/stale shards are built
  (appending a raw shard shows 1 missing in features and 1 after upstream in qembeds and tokens).
  A change of stage config is not visible here (the stage's own plan sees it).
- **The input of a qembeds/tokens dataset** is the corpus's feature set whose shard digests its
  records match most (the record does not name the folder).
- **Read-only and cheap**: completion records and one parquet footer per dataset; nothing is hashed
  (that is `seedpipe lineage --check`). MLflow is read only for the registered tokenizers, and a
  store that cannot be read is a note, not a failure.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.fs as pafs

from pipelines.catalog import STAGES, Catalog, DoneRecord, dataset_digest
from pipelines.config import cli_main, parse_command

SHORT = 12
STAGE_INPUT = {"features": "raw", "qembeds": "features", "tokens": "features"}


@dataclass(kw_only=True)
class StatusConfig:
    root: str = "./seed-data"
    """Catalog root."""
    corpus: str = ""
    """Only this corpus (default: every corpus of the root)."""
    json: bool = False
    """Print the status as JSON."""


@dataclass
class DatasetStatus:
    name: str
    """`raw` or `<stage>/<name>` inside the corpus."""
    digest: str
    shards: int
    rows: int
    bytes: int
    made_by: str = ""
    input: str = ""
    """The dataset it is built from (`raw`, `features/<name>`)."""
    missing: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    orphaned: list[str] = field(default_factory=list)
    after_upstream: list[str] = field(default_factory=list)
    damaged: dict[str, str] = field(default_factory=dict)
    sources: list[dict[str, Any]] = field(default_factory=list)
    """raw: the URL lists ingested (from raw/manifest.json)."""
    failures: dict[str, int] = field(default_factory=dict)
    """raw: failed samples by cause."""
    shard_ids: list[str] = field(default_factory=list)

    @property
    def to_build(self) -> list[str]:
        return sorted(set(self.missing) | set(self.stale) | set(self.after_upstream))


@dataclass
class CorpusStatus:
    corpus: str
    datasets: list[DatasetStatus]


def corpus_names(catalog: Catalog) -> list[str]:
    infos = catalog.fs.get_file_info(
        pafs.FileSelector(f"{catalog.base}/corpora", allow_not_found=True)
    )
    return sorted(
        i.base_name
        for i in infos
        if i.type == pafs.FileType.Directory and not i.base_name.startswith((".", "_"))
    )


def _folders(catalog: Catalog, directory: str) -> list[str]:
    infos = catalog.fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
    return sorted(
        i.base_name
        for i in infos
        if i.type == pafs.FileType.Directory and not i.base_name.startswith((".", "_"))
    )


def _bytes(catalog: Catalog, directory: str, records: dict[str, DoneRecord]) -> int:
    total = 0
    for record in records.values():
        for name in record.files:
            size = record.file_sizes.get(name)
            total += (
                size
                if size is not None
                else catalog.fs.get_file_info(f"{directory}/{name}").size or 0
            )
    return total


def _made_by(catalog: Catalog, directory: str, stage: str, records: dict[str, DoneRecord]) -> str:
    """The model or encoder that made a derived dataset, from its first shard's schema metadata."""
    import pyarrow.parquet as pq

    from pipelines.schemas import schema_meta

    files = [
        f"{directory}/{n}" for r in records.values() for n in r.files if n.endswith(".parquet")
    ]
    if not files:
        return ""
    try:
        meta = schema_meta(pq.read_schema(files[0], filesystem=catalog.fs))
    except Exception as err:  # noqa: BLE001 - a status line, not a failure
        return f"(schema unreadable: {str(err)[:80]})"
    if stage == "features":
        return f"vision {meta.get('vision_source', '?')}, target {meta.get('target_source', '?')}"
    if stage == "qembeds":
        return f"stage-1 model {meta.get('stage1_digest', '?')[:SHORT]}"
    return (
        f"tokenizer {meta.get('tokenizer_uri', '?')} ({meta.get('tokenizer_digest', '?')[:SHORT]})"
    )


def dataset_status(
    catalog: Catalog, corpus: str, stage: str, name: str
) -> tuple[DatasetStatus, dict[str, DoneRecord]]:
    directory = (
        catalog.raw_dir(corpus) if stage == "raw" else catalog.stage_dir(corpus, stage, name)
    )
    scan = catalog.scan(directory)
    records = scan.records
    status = DatasetStatus(name="raw" if stage == "raw" else f"{stage}/{name}",
                           digest=dataset_digest({s: r.digest for s, r in records.items()}),
                           shards=len(records), rows=sum(r.rows for r in records.values()),
                           bytes=_bytes(catalog, directory, records), damaged=dict(scan.problems),
                           shard_ids=sorted(records))  # fmt: skip
    if stage == "raw":
        from pipelines.rawcorpus import read_manifest

        for record in records.values():
            for cause, n in record.failures.items():
                status.failures[cause] = status.failures.get(cause, 0) + n
        try:
            sources = read_manifest(catalog, directory)["sources"]
        except ValueError as err:
            sources = {"?": {"uri": str(err)}}
        status.sources = [{"uri": s.get("uri", "?"), "sha256": d, "rows": s.get("rows"), "failed": s.get("failed"),
                           "shards": len(s.get("shards", []))} for d, s in sources.items()]  # fmt: skip
    else:
        status.made_by = _made_by(catalog, directory, stage, records)
    return status, records


def compare_to_input(status: DatasetStatus, records: dict[str, DoneRecord], inputs: dict[str, DoneRecord],
                     upstream: DatasetStatus | None) -> None:  # fmt: skip
    """Fill missing / stale / orphaned / after-upstream of a derived dataset from its input's shards."""
    status.missing = sorted(set(inputs) - set(records))
    status.stale = sorted(
        s for s in set(inputs) & set(records) if records[s].input_digest != inputs[s].digest
    )
    status.orphaned = sorted(set(records) - set(inputs))
    if upstream is not None:
        pending = set(upstream.to_build) - set(status.missing) - set(status.stale)
        status.after_upstream = sorted(pending)


def corpus_status(catalog: Catalog, corpus: str) -> CorpusStatus:
    raw, raw_records = dataset_status(catalog, corpus, "raw", "")
    done: dict[str, tuple[DatasetStatus, dict[str, DoneRecord]]] = {"raw": (raw, raw_records)}
    for stage in STAGES:  # features first: qembeds and tokens are built from it
        for name in _folders(catalog, f"{catalog.corpus_dir(corpus)}/{stage}"):
            status, records = dataset_status(catalog, corpus, stage, name)
            candidates = [
                k for k in done if k == STAGE_INPUT[stage] or k.startswith(f"{STAGE_INPUT[stage]}/")
            ]
            if candidates:
                best = max(candidates, key=lambda k: _matches(records, done[k][1]))
                status.input = best
                compare_to_input(status, records, done[best][1], done[best][0])
            done[status.name] = (status, records)
    return CorpusStatus(corpus=corpus, datasets=[s for s, _ in done.values()])


def _matches(records: dict[str, DoneRecord], inputs: dict[str, DoneRecord]) -> int:
    return sum(1 for s, r in records.items() if s in inputs and inputs[s].digest == r.input_digest)


def tokenizer_plans(
    catalog: Catalog, corpora: list[CorpusStatus]
) -> tuple[list[dict[str, Any]], str]:
    """For each registered tokenizer version: per corpus and feature set, what tokenize would do."""
    from jobs.run_index import registered_versions
    from pipelines.tracking import mlflow_client, tracking_uri

    try:
        uri = tracking_uri(catalog)
        versions = [
            v for v in registered_versions(mlflow_client(uri)) if v.kind == "seed_tokenizer"
        ]
    except Exception as err:  # noqa: BLE001 - see the module docstring
        return [], f"registered tokenizers: cannot read MLflow ({str(err)[:200]})"
    plans = []
    for version in sorted(versions, key=lambda v: (v.name, int(v.version))):
        for cs in corpora:
            feature_sets = [d for d in cs.datasets if d.name.startswith("features/")]
            for features in feature_sets:
                made = [d for d in cs.datasets if d.name.startswith("tokens/") and d.input == features.name
                        and version.digest[:SHORT] in d.made_by]  # fmt: skip
                tokens = made[0] if made else None
                now = (
                    sorted(set(tokens.missing) | set(tokens.stale))
                    if tokens
                    else list(features.shard_ids)
                )
                command = f"seedpipe tokenize --corpus {cs.corpus} --tokenizer {version.uri}"
                if len(feature_sets) > 1:
                    command += f" --features {features.name.split('/', 1)[1]}"
                plans.append({"tokenizer": version.uri, "digest": version.digest, "corpus": cs.corpus,
                              "features": features.name, "tokens": tokens.name if tokens else None,
                              "to_build": len(now), "shards": now,
                              "after_upstream": len(tokens.after_upstream) if tokens else len(features.to_build),
                              "command": command})  # fmt: skip
    return plans, ""


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


def _ids(shards: list[str], limit: int = 6) -> str:
    return ", ".join(shards[:limit]) + (f", ... ({len(shards)})" if len(shards) > limit else "")


def format_text(corpora: list[CorpusStatus], plans: list[dict[str, Any]], note: str) -> str:
    lines = []
    for cs in corpora:
        lines.append(f"corpus {cs.corpus}")
        width = max(len(d.name) for d in cs.datasets) + 2
        for d in cs.datasets:
            made = f"  {d.made_by}" if d.made_by else ""
            lines.append(f"  {d.name:{width}s} digest {d.digest[:SHORT]}  {d.shards} shards  {d.rows} rows  "
                         f"{_size(d.bytes)}{made}")  # fmt: skip
            for s in d.sources:
                lines.append(f"      URL list {s['uri']} (sha256 {s['sha256'][:SHORT]}): {s['rows']} rows, "
                             f"{s['failed']} failed, {s['shards']} shards")  # fmt: skip
            if d.failures:
                lines.append(
                    "      failed by cause: "
                    + ", ".join(f"{c} {n}" for c, n in sorted(d.failures.items()))
                )
            if d.input:
                if d.to_build or d.orphaned:
                    parts = [f"{label} {len(ids)} ({_ids(ids)})" for label, ids in
                             (("missing", d.missing), ("stale", d.stale), ("after upstream", d.after_upstream),
                              ("orphaned", d.orphaned)) if ids]  # fmt: skip
                    lines.append(
                        f"      from {d.input}: {len(d.to_build)} to build: " + "; ".join(parts)
                    )
                else:
                    lines.append(f"      from {d.input}: up to date")
            for sid, why in sorted(d.damaged.items()):
                lines.append(f"      damaged shard {sid}: {why}")
    if plans or note:
        lines.append("registered tokenizers: what `seedpipe tokenize` would do")
    for p in plans:
        later = f", {p['after_upstream']} more after upstream" if p["after_upstream"] else ""
        if p["tokens"] is None:
            what = f"not tokenized with it yet: {p['to_build']} shards to build{later}"
        elif p["to_build"] or later:
            now = (
                f"{p['to_build']} shards to build ({_ids(p['shards'])})"
                if p["to_build"]
                else "nothing to build now"
            )
            what = f"{p['tokens']}: {now}{later}"
        else:
            what = f"{p['tokens']}: up to date"
        hint = f"  (`{p['command']}`)" if p["to_build"] or later else ""
        lines.append(
            f"  {p['tokenizer']} ({p['digest'][:SHORT]}) on {p['corpus']} {p['features']}: {what}{hint}"
        )
    if note:
        lines.append(f"  {note}")
    return "\n".join(lines)


def status(config: StatusConfig) -> tuple[list[CorpusStatus], list[dict[str, Any]], str]:
    catalog = Catalog(config.root)
    names = corpus_names(catalog)
    if config.corpus and config.corpus not in names:
        raise ValueError(f"corpus {config.corpus!r} is not in the catalog at {catalog.base} "
                         f"(corpora: {', '.join(names) or 'none'})")  # fmt: skip
    if not names:
        raise ValueError(
            f"no corpora in the catalog at {catalog.base} (ingest one with `seedpipe ingest`)"
        )
    corpora = [corpus_status(catalog, c) for c in ([config.corpus] if config.corpus else names)]
    plans, note = tokenizer_plans(catalog, corpora)
    return corpora, plans, note


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    """The catalog at a glance: datasets, digests, shards, rows, bytes, and what is stale."""
    config = parse_command(
        StatusConfig, argv, prog="seedpipe status", description=__doc__.split("\n\n")[0]
    )
    corpora, plans, note = status(config)
    if config.json:
        out = {"corpora": [{"corpus": c.corpus, "datasets": [asdict(d) | {"to_build": d.to_build} for d in c.datasets]}
                           for c in corpora], "tokenizers": plans, "note": note}  # fmt: skip
        print(json.dumps(out, indent=1))
    else:
        print(format_text(corpora, plans, note))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
