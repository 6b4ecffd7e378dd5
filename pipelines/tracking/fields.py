"""How seedpipe's records become MLflow fields: names, tag keys, params, datasets, code version.

- **Names.** MLflow's documented rule for metric, param and tag names: alphanumerics, `_`, `-`,
  `.`, space, `:` and `/`, at most 250 characters, and not a path that normalises to another name
  (no `..`, `//`, leading `/`). `check_names` applies it when the call is made: a bad name is the
  caller's bug, raised at the call rather than rejected by the server after the training step has
  moved on (or, in an outage, only when the queue catches up). It is written out here because
  MLflow's own checks (`mlflow.utils.validation._validate_*_name`) are private.
- **Tag keys from data names.** Dataset names (corpus/stage/name) become tags such as
  `output.<name>` = digest (what `seedpipe lineage` walks); `tag_key` is the one sanitising rule.
- **Datasets.** `dataset_entity` is the one builder of a dataset as MLflow records it: a
  `MetaDataset(source=<uri>, name, digest=<first 36 hex of the content digest>)`; the full digest
  and the row count go in the input tags (`dataset_input_tags`).
"""

from __future__ import annotations

import posixpath
import re
import subprocess
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

MAX_NAME = 250
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_DIGEST = 36
DATASET_CONTEXT_TAG = "mlflow.data.context"  # MLflow's input tag for a dataset's context

_NAME_CHARS = re.compile(r"^[/\w.\- :]*$")


def name_problem(name: str) -> str | None:
    """Why `name` breaks MLflow's name rule (see the module docstring), or None when it is valid."""
    if not isinstance(name, str) or not name:
        return "names must be non-empty strings"
    if len(name) > MAX_NAME:
        return f"names are at most {MAX_NAME} characters"
    if not _NAME_CHARS.match(name):
        return (
            "names may only contain alphanumerics, underscores (_), dashes (-), periods (.), "
            "spaces ( ), colons (:) and slashes (/)"
        )
    norm = posixpath.normpath(name)
    if norm != name or norm == "." or norm.startswith("..") or norm.startswith("/"):
        return f"names must not resolve to another name as a path (this one is {norm!r})"
    return None


def check_names(names: Iterable[str], what: str) -> None:
    """ValueError naming the first of `names` (metric/param/tag names) that MLflow would refuse."""
    for name in names:
        problem = name_problem(name)
        if problem is not None:
            raise ValueError(f"invalid MLflow {what} name {name!r}: {problem}")


def tag_key(prefix: str, name: str) -> str:
    """`<prefix>.<name>` as a valid tag name: other characters become `_`, empty, `.` and `..`
    path segments too."""
    segments = [re.sub(r"[^A-Za-z0-9_.: -]", "_", s) for s in name.split("/")]
    segments = [s if s not in ("", ".", "..") else "_" for s in segments]
    return f"{prefix}.{'/'.join(segments)}"[:MAX_NAME]


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {'a.b.c': 'value'} params (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:MAX_PARAM_VALUE]
    return out


def dataset_entity(*, name: str, digest: str, uri: str) -> dict[str, Any]:
    """The MLflow dataset entity (as the dict `mlflow.entities.Dataset(**d)` takes) of a dataset
    identified by its content digest."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # file:// matches two equivalent local source classes
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(uri)
    return MetaDataset(source=source, name=name, digest=digest[:MAX_DIGEST]).to_dict()  # type: ignore[abstract]


def dataset_input_tags(*, context: str, digest: str, rows: int | None = None) -> dict[str, str]:
    """The input tags of a logged dataset: its context (input/output/eval/...), full digest, rows."""
    tags = {DATASET_CONTEXT_TAG: context, "digest": digest}
    if rows is not None:
        tags["rows"] = str(rows)
    return tags


def code_version() -> str:
    """git commit of the checkout (with +dirty), else the installed package version."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import version

        return version("seedpipe")
