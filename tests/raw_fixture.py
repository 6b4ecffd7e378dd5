"""Build img2dataset-shaped raw shards directly (tar of KEY.jpg/.txt/.json + completion record).

For stage tests that need a raw corpus without running a download; the ingest tests exercise the
real img2dataset path.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

from PIL import Image

from pipelines.catalog import Catalog, DoneRecord, sha256_text

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 200, 60),
    "blue": (40, 60, 220),
    "yellow": (230, 220, 40),
}


def jpeg(color: tuple[int, int, int], size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="JPEG")
    return buf.getvalue()


def write_raw_shard(
    catalog: Catalog, corpus: str, shard: int, samples: list[tuple[str, bytes, str]]
) -> DoneRecord:
    """samples: (key, image bytes, caption). Commits the shard like ingest does."""
    raw = catalog.raw_dir(corpus)
    catalog.fs.create_dir(raw, recursive=True)
    sid = f"{shard:05d}"
    buf = io.BytesIO()
    pairs = []
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, image, caption in samples:
            sha = hashlib.sha256(image).hexdigest()
            pairs.append((key, sha))
            meta = json.dumps(
                {"key": key, "sha256": sha, "status": "success", "caption": caption}
            ).encode()
            for ext, data in (("jpg", image), ("txt", caption.encode()), ("json", meta)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    catalog.write_atomic(f"{raw}/{sid}.tar", buf.getvalue())
    record = DoneRecord(shard=sid, stage="raw", digest=sha256_text(*(f"{k}:{s}" for k, s in sorted(pairs))),
                        files=[f"{sid}.tar"], rows=len(samples))  # fmt: skip
    catalog.commit(raw, record)
    return record


def make_raw_corpus(
    catalog: Catalog, corpus: str, *, num_shards: int, per_shard: int, start: int = 0
) -> list[DoneRecord]:
    """Seeded colour images with captions naming the colour, keys like img2dataset's (shard*N+i)."""
    names = list(COLORS)
    records = []
    for s in range(start, start + num_shards):
        samples = []
        for i in range(per_shard):
            color = names[(s * per_shard + i) % len(names)]
            samples.append((f"{s:05d}{i:04d}", jpeg(COLORS[color]), f"a {color} square"))
        records.append(write_raw_shard(catalog, corpus, s, samples))
    return records
