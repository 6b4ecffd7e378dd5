"""Features stage: raw img2dataset shards -> frozen ViT patch features + stage-2 targets (parquet).

    seedpipe features --corpus cc3m --encoder paper-v2 [--feature-set NAME] [--dry-run]

One output shard per raw shard in `<root>/corpora/<corpus>/features/<feature_set>/`. Images are
decoded on a thread pool inside the worker actor (PIL releases the GIL), encoded in mini-batches
by the vision encoder the actor loaded once, and the configured target encoder (v2: CLIP image
embedding of the same pixels; v1: SD's CLIP text encoder on the caption). Undecodable or
oversized images are counted by cause and the rest of the shard completes; an unreadable tar
fails that shard only. This stage is the only one that ever runs the vision encoder.
"""

from __future__ import annotations

import io
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines import cli_common
from pipelines.catalog import Catalog, digest_of
from pipelines.config import cli_main
from pipelines.schemas import TARGET_COLUMNS, features_schema, to_fixed_list
from pipelines.stage import ShardTask, ShardWorker, StageResult, plan_stage


@dataclass(kw_only=True)
class EncoderSpec:
    """What determines the features' content (its digest names the stage config)."""

    encoder: str = "paper-v2"
    """A preset name (tiny, small, paper-v1, paper-v2) or a local vision-encoder directory."""
    feature_set: str = ""
    """Output folder name; default: the preset name (or 'custom-<digest>' for a path)."""
    vision: dict[str, Any] = field(default_factory=dict)
    target: dict[str, Any] = field(default_factory=dict)


def resolve_encoders(encoder: str, feature_set: str = "") -> EncoderSpec:
    """Encoder presets or a local vision-encoder directory (paper-v2 shapes and targets) -> config."""
    from seed_core.presets import get_preset

    if Path(encoder).is_dir():
        preset = get_preset("paper-v2")
        vision = asdict(preset.vision) | {"pretrained": str(Path(encoder).resolve())}
        name = feature_set or f"custom-{digest_of(vision)[:12]}"
    else:
        preset = get_preset(encoder)
        vision = asdict(preset.vision)
        name = feature_set or preset.name
    return EncoderSpec(
        encoder=encoder, feature_set=name, vision=vision, target=asdict(preset.target)
    )


def patch_feature_std(vision: Any) -> float:
    """The vision encoder's feature scale, recorded in the features' schema metadata: the mean
    per-image std of its patch tokens on a fixed probe (8 synthetic images), so that near-zero
    features (a stand-in init of ~1e-10 gives ~1e-6: fp16 subnormals once cached) are visible
    in every shard and warned about when the worker starts."""
    import torch

    from pipelines.synthetic import make_images
    from seed_core.encoders import preprocess_images

    size = vision.config.image_size
    probe = [decode_image(jpeg)[0] for _, jpeg, _ in make_images(8, seed=0, size=size)]
    with torch.inference_mode():
        patches = vision(preprocess_images(probe, image_size=size))[:, 1:].float()
    std = float(patches.std(dim=(1, 2)).mean())
    if std < 1e-3:  # fp16 keeps ~3 significant digits only above 6.1e-5
        warnings.warn(f"vision encoder {vision.source}: patch features of std {std:.2g} "
                      "barely survive the fp16 cache", stacklevel=2)  # fmt: skip
    return std


def weights_identity(pretrained: str | None, seed: int) -> str:
    """What the workers will load: a digest of a local directory's weight files, or the random init.

    Hashing file contents (not mtimes) keeps the features' provenance content-addressed; a hub id
    that is not in the local cache resolves to the same random init the workers will fall back to.
    """
    path = Path(pretrained) if pretrained else None
    if path is not None and not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(pretrained, local_files_only=True))
        except Exception:
            path = None
    if path is None:
        return f"random-init(seed={seed})"
    import hashlib

    h = hashlib.sha256()
    for file in sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in {".safetensors", ".bin", ".json"}
    ):
        h.update(str(file.relative_to(path)).encode())
        with file.open("rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def model_digest(config: EncoderSpec) -> str:
    return digest_of(
        {
            "vision": weights_identity(config.vision.get("pretrained"), config.vision["seed"]),
            "target": weights_identity(config.target.get("pretrained"), config.target["seed"]),
        }
    )


def read_raw_tar(fileobj: Any) -> Iterator[dict[str, Any]]:
    """Samples {key, image (bytes), caption, sha256} of an img2dataset webdataset tar, in order."""
    current: dict[str, Any] = {}
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.rpartition("/")[2].partition(".")
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            if current and current["key"] != key:
                yield current
                current = {}
            current.setdefault("key", key)
            if ext in ("jpg", "jpeg", "png", "webp"):
                current["image"] = data
            elif ext == "txt":
                current["caption"] = data.decode("utf-8", errors="replace")
            elif ext == "json":
                import json

                current["sha256"] = json.loads(data).get("sha256") or ""
    if current:
        yield current


def checked_samples(samples: Iterator[dict[str, Any]], raw: Any, expected: int,
                    failures: dict[str, int]) -> Iterator[dict[str, Any]]:  # fmt: skip
    """The samples of a raw tar; at its end, the tar must be the bytes its record names
    (`raw.verify()`, else the shard fails) and rows it lacks count `missing_in_tar`."""
    seen = 0
    for sample in samples:
        seen += 1
        yield sample
    raw.verify()
    if seen < expected:
        failures["missing_in_tar"] = failures.get("missing_in_tar", 0) + expected - seen


def decode_image(data: bytes) -> tuple[np.ndarray | None, str | None]:
    """(HWC uint8 RGB, None) or (None, cause): decode_error for broken/non-images, image_too_large for bombs."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return np.asarray(img.convert("RGB")), None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, "image_too_large"
    except Exception:  # PIL raises OSError, SyntaxError, ValueError... for broken bytes
        return None, "decode_error"


class FeaturesShardWorker(ShardWorker):
    """Loads the frozen encoders once; turns one raw shard into one features shard."""

    def __init__(self, *, root: str, config: dict[str, Any], batch_size: int, decode_threads: int = 4,
                 num_threads: int | None = None) -> None:  # fmt: skip
        super().__init__(root=root, num_threads=num_threads)
        import torch

        from seed_core.encoders import (
            TargetEncoderConfig,
            VisionEncoderConfig,
            load_target_encoder,
            load_vision_encoder,
        )

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        vision_cfg, target_cfg = (
            VisionEncoderConfig(**config["vision"]),
            TargetEncoderConfig(**config["target"]),
        )
        self.vision = load_vision_encoder(vision_cfg).to(self.device)
        self.target = load_target_encoder(target_cfg).to(self.device)
        self.target_column = TARGET_COLUMNS[target_cfg.kind]
        self.schema = features_schema(
            patch_shape=(vision_cfg.num_tokens, vision_cfg.hidden_size),
            target_kind=target_cfg.kind,
            target_shape=target_cfg.output_shape,
            meta={"vision_source": self.vision.source, "vision_random_init": self.vision.is_random_init,
                  "target_source": self.target.source, "target_random_init": self.target.is_random_init,
                  "patch_feature_std": patch_feature_std(self.vision)},
        )  # fmt: skip
        self.batch_size = batch_size
        self.pool = ThreadPoolExecutor(decode_threads)

    def build(self, task: ShardTask) -> tuple[int, dict[str, int]]:
        failures: dict[str, int] = {}
        with self.catalog.open_verified(task.input_dir, task.shard, f"{task.shard}.tar") as raw:
            samples = checked_samples(read_raw_tar(raw), raw, task.input_rows, failures)
            name, rows = self.write_parquet(task, self.schema, self._tables(samples, failures))
        self.commit(
            task, [name], rows, failures, extra={"vision_random_init": self.vision.is_random_init}
        )
        return rows, failures

    def _tables(
        self, samples: Iterator[dict[str, Any]], failures: dict[str, int]
    ) -> Iterator[pa.Table]:
        batch: list[dict[str, Any]] = []
        for sample in samples:
            if "image" not in sample:
                failures["missing_image"] = failures.get("missing_image", 0) + 1
                continue
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield self._encode(batch, failures)
                batch = []
        if batch:
            yield self._encode(batch, failures)

    def _encode(self, batch: list[dict[str, Any]], failures: dict[str, int]) -> pa.Table:
        import torch

        from seed_core.encoders import preprocess_images

        decoded = list(self.pool.map(decode_image, (s["image"] for s in batch)))
        good = [(s, img) for s, (img, cause) in zip(batch, decoded, strict=True) if img is not None]
        for _, cause in decoded:
            if cause:
                failures[cause] = failures.get(cause, 0) + 1
        samples, images = [s for s, _ in good], [img for _, img in good]
        captions = [s.get("caption", "") for s in samples]
        if not samples:
            return self.schema.empty_table()
        with torch.inference_mode():
            pixels = preprocess_images(images, image_size=self.vision.config.image_size)
            patches = self.vision(pixels).float().cpu().numpy()
            if self.target_column == "target_image_embed":
                if self.target.config.image_size != self.vision.config.image_size:
                    pixels = preprocess_images(images, image_size=self.target.config.image_size)
                target = self.target(pixels).float().cpu().numpy()
            else:
                target = self.target(captions).float().cpu().numpy()
        return pa.table(
            {
                "key": pa.array([s["key"] for s in samples], pa.string()),
                "sha256": pa.array([s.get("sha256", "") for s in samples], pa.string()),
                "caption": pa.array(captions, pa.string()),
                "patch_features": to_fixed_list(patches, pa.float16()),
                self.target_column: to_fixed_list(target, pa.float16()),
            }
        )


@dataclass(kw_only=True)
class FeaturesConfig(cli_common.StageConfig):
    encoder: str = "paper-v2"
    """A preset name (tiny, small, paper-v1, paper-v2) or a local vision-encoder directory."""
    feature_set: str = ""
    """Output dataset name (`features/<name>/`); default: the preset name (or custom-<digest>)."""


def run(config: FeaturesConfig) -> StageResult:
    """Plan and build the features of every raw shard that is missing or stale."""
    catalog = Catalog(config.root)
    spec = resolve_encoders(config.encoder, config.feature_set)
    config_digest = digest_of({"vision": spec.vision, "target": spec.target})
    input_dir = catalog.raw_dir(config.corpus)
    output_dir = catalog.stage_dir(config.corpus, "features", spec.feature_set)
    plan, tasks = plan_stage(catalog, input_dir=input_dir, output_dir=output_dir,
                             config_digest=config_digest, model_digest=model_digest(spec))  # fmt: skip
    return cli_common.run_stage(
        catalog, stage="features", config=config, plan=plan, tasks=tasks, resolved=asdict(spec),
        input_dir=input_dir, output_dir=output_dir, worker_cls=FeaturesShardWorker,
        worker_kwargs={"root": config.root, "config": {"vision": spec.vision, "target": spec.target},
                       "batch_size": config.resources.batch_size},
    )  # fmt: skip


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    config = cli_common.parse_stage(FeaturesConfig, argv, prog="seedpipe features", doc=__doc__)
    return 0 if run(config).ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
