"""Committed catalog datasets as the stages and jobs read them: naming, identity, the held-out split.

- A dataset is one catalog folder (`corpora/<corpus>/raw` or `corpora/<corpus>/<stage>/<name>`);
  its name in MLflow is that path below `corpora/` (`dataset_name`), its identity the digest of
  its committed shards (`catalog.dataset_digest`). `DatasetRef` is what lineage logs of it.
- The held-out split is a pure function of the row key (md5, not Python's salted `hash`), so the
  training filter (`drop_holdout`, a Ray Data map), the in-job eval (`load_holdout`) and
  `seedpipe evaluate` agree on every row without a stored list, on any number of workers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.catalog import Catalog, dataset_digest

HOLDOUT_BUCKETS = 10_000


@dataclass(frozen=True, kw_only=True)
class DatasetRef:
    """A dataset as lineage records it: MLflow `log_input` name, content digest and URI."""

    name: str
    """`<corpus>/raw` or `<corpus>/<stage>/<name>` (or `model:<uri>` for a model input)."""
    digest: str
    uri: str
    context: str
    """MLflow input context: `training`, `input`, `output`, `stage1`, ..."""
    rows: int | None = None

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the trackers' `log_dataset`."""
        return {"name": self.name, "digest": self.digest, "uri": self.uri,
                "context": self.context, "rows": self.rows}  # fmt: skip


def dataset_name(catalog: Catalog, directory: str) -> str:
    """`<corpus>/raw` or `<corpus>/<stage>/<name>`: a dataset folder's path below `corpora/`."""
    prefix = f"{catalog.base}/corpora/"
    if not directory.startswith(prefix):
        raise ValueError(f"{directory} is not a dataset folder of the catalog at {catalog.base}")
    return directory[len(prefix) :]


def dataset_ref(catalog: Catalog, directory: str, context: str) -> DatasetRef:
    """The committed state of a dataset folder (possibly empty) as a DatasetRef."""
    records = catalog.committed(directory)
    return DatasetRef(
        name=dataset_name(catalog, directory),
        digest=dataset_digest({s: r.digest for s, r in records.items()}),
        uri=catalog.uri(directory),
        context=context,
        rows=sum(r.rows for r in records.values()),
    )


def committed_dataset(catalog: Catalog, directory: str, what: str, context: str = "training") -> tuple[list[str], DatasetRef]:  # fmt: skip
    """(files, lineage) of a committed dataset; a clear error naming `what` when it is empty."""
    if not catalog.committed(directory):
        raise ValueError(f"no committed {what} shards in {directory}")
    # as locations (store URIs on an object-store root): pyarrow, Ray Data and the workers open
    # them without the catalog's filesystem object
    files = [catalog.location(f) for f in catalog.committed_files(directory)]
    return files, dataset_ref(catalog, directory, context)


def list_datasets(catalog: Catalog, corpus: str, stage: str) -> list[str]:
    """Names of the `stage` datasets of `corpus` that have at least one committed shard."""
    import pyarrow.fs as pafs

    selector = pafs.FileSelector(f"{catalog.corpus_dir(corpus)}/{stage}", allow_not_found=True)
    names = sorted(
        i.base_name
        for i in catalog.fs.get_file_info(selector)
        if i.type == pafs.FileType.Directory and not i.base_name.startswith(("_", "."))
    )
    return [n for n in names if catalog.committed(catalog.stage_dir(corpus, stage, n))]


def only_dataset(catalog: Catalog, corpus: str, stage: str, key: str) -> str:
    """The corpus's only committed `stage` dataset, as the default of config key `key`; an error
    listing the candidates when there are none or several."""
    names = list_datasets(catalog, corpus, stage)
    if len(names) != 1:
        raise ValueError(
            f"{key}: corpus {corpus!r} has {'no' if not names else 'several'} {stage} datasets "
            f"(available: {', '.join(names) or 'none'}); pass {key}=<name>"
        )
    return names[0]


def fixed_tensor(column: Any, shape: Sequence[int]) -> Any:
    """A fixed-size-list Arrow column -> float32 torch tensor of shape (N, *shape)."""
    import torch

    from pipelines.schemas import from_fixed_list

    return torch.from_numpy(from_fixed_list(column, shape).astype(np.float32))


def is_holdout(keys: Sequence[Any], fraction: float) -> np.ndarray:
    """(N,) bool: the rows whose key hashes into the held-out `fraction`."""
    cut = int(fraction * HOLDOUT_BUCKETS)
    return np.array(
        [int(hashlib.md5(str(k).encode()).hexdigest()[:8], 16) % HOLDOUT_BUCKETS < cut for k in keys],
        dtype=bool,
    )  # fmt: skip


def drop_holdout(batch: Any, fraction: float) -> Any:
    """Ray Data map over Arrow batches: keep the training split."""
    import pyarrow as pa

    return batch.filter(pa.array(~is_holdout(batch.column("key").to_pylist(), fraction)))


def load_holdout(files: Sequence[str], fraction: float, max_rows: int, columns: list[str]) -> Any:
    """The held-out rows of `files` (same rule as `drop_holdout`), at most `max_rows`, the first
    by key of the files read (a file's rows are in download order, which varies between ingests);
    None if no file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables, rows = [], 0
    for path in files:
        table = pq.read_table(path, columns=columns)
        table = table.filter(pa.array(is_holdout(table.column("key").to_pylist(), fraction)))
        tables.append(table)
        rows += table.num_rows
        if rows >= max_rows:
            break
    return pa.concat_tables(tables).sort_by("key").slice(0, max_rows) if tables else None
