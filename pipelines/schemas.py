"""Parquet schemas of the derived stages, defined once, checked on write and on read (DESIGN.md).

- features: key, sha256, caption, patch_features fixed_size_list<float16>[P*Dv], and the stage-2
  target: target_image_embed fixed_size_list<float16>[D] (v2) or target_text_cond
  fixed_size_list<float16>[77*768] (v1).
- qembeds: key, sha256, caption, causal_embeds fixed_size_list<float16>[Q*D] (+ the target).
- tokens: key, sha256, caption, codes fixed_size_list<int16>[32].
Shapes and provenance (encoder ids and digests, dtype) travel in the schema metadata under
`seedpipe.*` keys; `check_table` verifies columns, types and the declared shapes. Features also
record `seedpipe.patch_feature_std`, the vision encoder's feature scale on a fixed probe (~1 for a
working ViT; ~1e-6 means fp16 subnormals and nothing for stage 1 to learn from).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

META_PREFIX = "seedpipe."
TARGET_COLUMNS = {"clip_image": "target_image_embed", "clip_text": "target_text_cond"}


class SchemaError(ValueError):
    """A table does not match its stage's schema."""


def _fixed(value_type: pa.DataType, shape: Sequence[int]) -> pa.DataType:
    return pa.list_(value_type, int(np.prod(shape)))


def _with_meta(
    fields: list[pa.Field], stage: str, shapes: Mapping[str, Sequence[int]], meta: Mapping[str, Any]
) -> pa.Schema:
    metadata = {
        f"{META_PREFIX}stage": stage,
        f"{META_PREFIX}shapes": json.dumps({k: list(v) for k, v in shapes.items()}),
    }
    metadata.update(
        {f"{META_PREFIX}{k}": v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    )
    return pa.schema(fields, metadata=metadata)


def _base() -> list[pa.Field]:
    return [
        pa.field("key", pa.string(), nullable=False),
        pa.field("sha256", pa.string()),
        pa.field("caption", pa.string()),
    ]


def features_schema(
    *,
    patch_shape: Sequence[int],
    target_kind: str,
    target_shape: Sequence[int],
    meta: Mapping[str, Any] | None = None,
) -> pa.Schema:
    target = TARGET_COLUMNS[target_kind]
    fields = [
        *_base(),
        pa.field("patch_features", _fixed(pa.float16(), patch_shape)),
        pa.field(target, _fixed(pa.float16(), target_shape)),
    ]
    return _with_meta(
        fields, "features", {"patch_features": patch_shape, target: target_shape}, meta or {}
    )


def qembeds_schema(
    *,
    embed_shape: Sequence[int],
    target_kind: str,
    target_shape: Sequence[int],
    meta: Mapping[str, Any] | None = None,
) -> pa.Schema:
    target = TARGET_COLUMNS[target_kind]
    fields = [
        *_base(),
        pa.field("causal_embeds", _fixed(pa.float16(), embed_shape)),
        pa.field(target, _fixed(pa.float16(), target_shape)),
    ]
    return _with_meta(
        fields, "qembeds", {"causal_embeds": embed_shape, target: target_shape}, meta or {}
    )


def tokens_schema(*, num_tokens: int = 32, meta: Mapping[str, Any] | None = None) -> pa.Schema:
    fields = [*_base(), pa.field("codes", _fixed(pa.int16(), (num_tokens,)))]
    return _with_meta(fields, "tokens", {"codes": (num_tokens,)}, meta or {})


def schema_shapes(schema: pa.Schema) -> dict[str, tuple[int, ...]]:
    """{column: per-row shape} declared in a stage schema's metadata."""
    raw = (schema.metadata or {}).get(f"{META_PREFIX}shapes".encode())
    if raw is None:
        raise SchemaError("schema has no seedpipe.shapes metadata: not written by seedpipe")
    return {k: tuple(v) for k, v in json.loads(raw).items()}


def schema_meta(schema: pa.Schema) -> dict[str, str]:
    """The seedpipe.* metadata as {name: value} (values as stored: strings or JSON)."""
    return {
        k.decode()[len(META_PREFIX) :]: v.decode()
        for k, v in (schema.metadata or {}).items()
        if k.decode().startswith(META_PREFIX)
    }


def check_table(table: pa.Table, expected: pa.Schema) -> None:
    """Raise SchemaError unless `table` has exactly the expected columns, types and shapes."""
    names = [f.name for f in expected]
    if table.schema.names != names:
        raise SchemaError(f"columns {table.schema.names} != expected {names}")
    for f in expected:
        actual = table.schema.field(f.name).type
        if actual != f.type:
            raise SchemaError(f"column {f.name!r}: type {actual} != expected {f.type}")
    if table.column("key").null_count:
        raise SchemaError("column 'key' has nulls")


def to_fixed_list(array: np.ndarray, value_type: pa.DataType) -> pa.FixedSizeListArray:
    """(N, ...) numpy -> fixed_size_list column, flattened per row, cast to `value_type`."""
    n = array.shape[0]
    flat = np.ascontiguousarray(array.reshape(n, -1))
    values = pa.array(
        flat.reshape(-1).astype(value_type.to_pandas_dtype(), copy=False), type=value_type
    )
    return pa.FixedSizeListArray.from_arrays(values, flat.shape[1])


def from_fixed_list(column: pa.ChunkedArray | pa.Array, shape: Sequence[int]) -> np.ndarray:
    """fixed_size_list column -> (N, *shape) numpy (zero-copy where Arrow allows)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.values.to_numpy(zero_copy_only=False).reshape(len(column), *shape)
