"""What an ingest run will download: rows refused by address, rows done before, rows to retry.

Every function here decides from the URL table and the raw corpus's state (`rawcorpus.RawState`:
sound shards, lost shards, per-sample outcomes) and writes nothing; the catalog is read through
its filesystem (`catalog.fs`: a local root or an object store).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow.parquet as pq

from pipelines.catalog import Catalog
from pipelines.netguard import Resolver, host_refusals
from pipelines.rawcorpus import SOURCES, RawState, is_retryable
from pipelines.urllists import UrlTable


def refuse_blocked(
    table: UrlTable,
    *,
    allow_private_hosts: bool,
    resolver: Resolver | None = None,
    threads: int = 16,
) -> tuple[UrlTable, Counter[str]]:
    """Drop rows whose host is refused (`blocked_address`); each distinct host is resolved once.

    With `allow_private_hosts` only literals and metadata names can be refused, so nothing is
    resolved here (the download workers' connection guard still checks every address).
    """
    causes = host_refusals(
        table.url, allow_private_hosts=allow_private_hosts, resolver=resolver, threads=threads
    )
    reasons: Counter[str] = Counter(cause for cause in causes if cause)
    kept = table.subset([cause is None for cause in causes])
    kept.counts["blocked_address"] += sum(reasons.values())
    return kept, reasons


def skip_earlier_rows(state: RawState, table: UrlTable, *, retry_failed: bool) -> UrlTable:
    """Drop rows this corpus has downloaded (`already_ingested`) or, unless retrying, attempted
    (`failed_before`). Rows of lost shards are neither: they are downloaded again."""
    success, failed = state.success, state.latest
    if not (success or failed):
        return table
    # Earlier failures are re-attempted by --retry-failed only (which knows which are transient).
    seen = [u in success or (not retry_failed and u in failed) for u in table.uid]
    table.counts["already_ingested"] += sum(u in success for u in table.uid)
    table.counts["failed_before"] += sum(s and u not in success for s, u in zip(seen, table.uid))
    return table.subset([not s for s in seen])


def retry_table(
    catalog: Catalog,
    raw: str,
    manifest: dict[str, Any],
    state: RawState,
    list_digest: str | None,
    url_list: Any,
) -> tuple[UrlTable | None, str, list[str]]:
    """The rows to retry: submitted earlier, not recovered, last failure transient (or shard lost)."""
    sources = {d: s for d, s in manifest["sources"].items() if s.get("kind") == "list"}
    if list_digest is not None:
        if list_digest not in sources:
            raise ValueError(
                f"{url_list} was never ingested into this corpus: nothing to retry from"
            )
        sources = {list_digest: sources[list_digest]}
    table = UrlTable()
    for digest in sorted(sources):
        path = f"{raw}/{SOURCES}/{digest[:16]}.parquet"
        if not catalog.exists(path):
            continue
        rows = UrlTable.from_arrow(pq.read_table(path, filesystem=catalog.fs))
        for i, uid in enumerate(rows.uid):
            if uid in state.success or uid in table:
                continue
            if uid in state.latest and not is_retryable(*state.latest[uid]):
                continue
            table.add_normalized(rows.url[i], rows.caption[i], uid, rows.note[i])
    table.rows_in = len(table)
    return (table if len(table) else None), "retry", sorted(sources)


def lost_of_source(manifest: dict[str, Any], digest: str) -> list[str]:
    """Lost shards of one source (list digest) not yet rebuilt by a later run."""
    lost = manifest.get("lost_shards", {})
    return sorted(s for s, n in lost.items() if n.get("source") == digest and not n.get("rebuilt"))
