"""Trying a model by hand: `seedpipe caption` and `seedpipe generate`.

    seedpipe caption IMAGE... --lora REF [--tokenizer REF] [--root R]
    seedpipe generate "a red circle" --lora REF [--tokenizer REF] [--out DIR] [--root R]

`caption`: image file -> the frozen vision encoder -> SeedTokenizer codes -> the LoRA LLM's caption,
one line per image on stdout (`PATH: caption`; everything else goes to stderr). The encoder is the
one that made the feature set the tokenizer was trained on (its lineage; `--encoder` to choose),
checked against that dataset's committed records (config and weights digests) when the catalog
has it, so the codes come from the features the tokenizer was trained on and not merely a
similar-looking encoder. Patch features are rounded through fp16 as the features stage stores them.

`generate`: prompt -> 32 codes (constrained decoding: always 32 valid codes) -> the tokenizer's
generation decoder -> the generation embedding, the space of the corpus's target embeddings
(SEED-2: the unCLIP image embedding). What that embedding means is shown by the corpus images
whose target embeddings are nearest to it (cosine over the whole feature set): printed with their
captions, and drawn as a contact-sheet PNG in `--out` (default `<root>/generated/`), with a JSON
beside it (codes, neighbours). Rendering the embedding itself into a picture (diffusers' unCLIP
decoder on a GPU) is not implemented in this build: it could not be run or tested here.

Both take `models:/` URIs (resolved against the catalog at `--root`) and local export directories;
`--tokenizer` defaults to the tokenizer whose codes the LoRA was trained on.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.catalog import Catalog
from pipelines.config import cli_main, parse_command
from pipelines.storage import RunFolder, join_uri


@dataclass(kw_only=True)
class ModelConfig:
    root: str = "./seed-data"
    """Catalog root: where models:/ references resolve and the corpus lives."""
    lora: str = ""
    """LoRA export directory or models:/ URI (e.g. models:/seed-lora/1). Required."""
    tokenizer: str = ""
    """SeedTokenizer export or models:/ URI; default: the one the LoRA was trained on."""
    corpus: str = ""
    """Corpus of the tokenizer's feature set; default: the tokenizer's lineage."""
    features: str = ""
    """Feature set the tokenizer was trained on; default: its lineage."""
    dry_run: bool = False
    """Resolve the models and stop."""
    address: str | None = None
    """Unused (no Ray): accepted as every command accepts it."""

    def __post_init__(self) -> None:
        if not self.lora:
            raise ValueError(
                "lora is required: --lora <LoRA export directory or models:/seed-lora/N>"
            )


@dataclass(kw_only=True)
class CaptionConfig(ModelConfig):
    images: list[str] = field(default_factory=list)
    """Image files to caption."""
    encoder: str = ""
    """Vision encoder preset or directory; default: the one that made the tokenizer's feature set."""


@dataclass(kw_only=True)
class GenerateConfig(ModelConfig):
    prompts: list[str] = field(default_factory=list)
    """Captions to generate images for."""
    out: str = ""
    """Folder for the contact sheets; default: <root>/generated."""
    num_images: int = 8
    """Nearest corpus images shown per prompt."""
    sample: bool = False
    """Sample the codes (temperature, top_k, seed) instead of greedy decoding."""
    temperature: float = 1.0
    top_k: int = 0
    """0 = no top-k."""
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {self.num_images}")


@dataclass
class Loaded:
    tokenizer: Any
    """SeedTokenizer (eval, on `device`)."""
    llm: Any
    """jobs.eval_data.LoadedLlm."""
    tokenizer_ref: Any
    corpus: str
    features: str


def load(config: ModelConfig) -> Loaded:
    """The tokenizer and LLM of `config`, and the corpus / feature set the tokenizer was trained on."""
    from jobs.eval_data import load_llm, resolve_models
    from seed_core.tokenizer import SeedTokenizer

    catalog = Catalog(config.root)
    tokenizer_ref, lora_ref, meta = resolve_models(catalog, config.tokenizer, config.lora)
    corpus = config.corpus or tokenizer_ref.lineage.get("corpus", "") or meta.get("corpus", "")
    features = config.features or tokenizer_ref.lineage.get("features", "")
    print(f"models: tokenizer {tokenizer_ref.uri}, LLM {lora_ref.uri}; corpus {corpus or '?'}, features "
          f"{features or '?'}", file=sys.stderr, flush=True)  # fmt: skip
    if config.dry_run:
        return Loaded(None, None, tokenizer_ref, corpus, features)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = SeedTokenizer.from_pretrained(tokenizer_ref.directory).eval().to(device)
    return Loaded(tokenizer, load_llm(lora_ref.directory, device), tokenizer_ref, corpus, features)


# ---- caption ---------------------------------------------------------------------------------
def vision_encoder(config: CaptionConfig, loaded: Loaded) -> Any:
    """The vision encoder that made the tokenizer's feature set, verified against its records."""
    from pipelines.catalog import digest_of
    from pipelines.features import model_digest, resolve_encoders
    from seed_core.encoders import VisionEncoderConfig, load_vision_encoder
    from seed_core.presets import PRESETS

    encoder = config.encoder or loaded.features
    if not encoder or (encoder not in PRESETS and not Path(encoder).is_dir()):
        raise ValueError(f"encoder: the tokenizer's feature set {loaded.features!r} is not an encoder preset "
                         f"({', '.join(PRESETS)}); pass --encoder <preset or vision-encoder directory>")  # fmt: skip
    spec = resolve_encoders(encoder, loaded.features if not config.encoder else "")
    catalog = Catalog(config.root)
    records = {}
    if loaded.corpus and loaded.features:
        records = catalog.committed(catalog.stage_dir(loaded.corpus, "features", loaded.features))
    if records:
        want = (digest_of({"vision": spec.vision, "target": spec.target}), model_digest(spec))
        if any((r.config_digest, r.model_digest) != want for r in records.values()):
            raise ValueError(f"encoder {encoder!r} is not the one that made {loaded.corpus}/features/"
                             f"{loaded.features} (config or weights digest differ); pass --encoder")  # fmt: skip
    else:
        print(f"caption: {loaded.corpus}/features/{loaded.features} is not in {config.root}: cannot check that "
              f"encoder {encoder!r} made the tokenizer's features", file=sys.stderr)  # fmt: skip
    device = loaded.tokenizer.quantizer.codebook.weight.device
    return load_vision_encoder(VisionEncoderConfig(**spec.vision)).to(device)


def read_images(paths: Sequence[str]) -> list[np.ndarray]:
    """HWC uint8 RGB arrays, decoded as the features stage decodes; ValueError naming a bad file."""
    from pipelines.features import decode_image

    images = []
    for path in paths:
        if not Path(path).is_file():
            raise ValueError(f"{path}: no such image file")
        image, cause = decode_image(Path(path).read_bytes())
        if image is None:
            raise ValueError(f"{path}: cannot read it as an image ({cause})")
        images.append(image)
    return images


@torch.no_grad()
def caption_images(images: Sequence[np.ndarray], vision: Any, loaded: Loaded) -> list[str]:
    """Captions of decoded images: encoder -> fp16 patch features (as stored) -> codes -> LLM."""
    from seed_core.encoders import preprocess_images

    pixels = preprocess_images(list(images), image_size=vision.config.image_size)
    patches = vision(pixels).half().float()  # the features stage stores patch features as fp16
    codes = loaded.tokenizer.encode(patches.to(loaded.tokenizer.quantizer.codebook.weight.device))
    return loaded.llm.captions(codes)


@cli_main
def caption_main(argv: Sequence[str] | None = None) -> int:
    """Caption image files with a tokenizer + LoRA LLM: encoder -> 32 codes -> caption."""
    config = parse_command(CaptionConfig, argv, prog="seedpipe caption", description=caption_main.__doc__ or "",
                           positional="images")  # fmt: skip
    images = read_images(config.images)
    loaded = load(config)
    if config.dry_run:
        return 0
    vision = vision_encoder(config, loaded)
    for path, text in zip(config.images, caption_images(images, vision, loaded), strict=True):
        print(f"{path}: {text}", flush=True)
    return 0


# ---- generate --------------------------------------------------------------------------------
def nearest_rows(catalog: Catalog, corpus: str, features: str, query_QO: np.ndarray,
                 k: int) -> list[list[dict[str, Any]]]:  # fmt: skip
    """Per query, the `k` rows of the feature set whose target embedding is most cosine-similar:
    {key, caption, cosine, shard}, best first. Streams the files (one target column in memory)."""
    import pyarrow.parquet as pq

    from pipelines.schemas import from_fixed_list

    directory = catalog.stage_dir(corpus, "features", features)
    records = catalog.committed(directory)
    if not records:
        raise ValueError(
            f"no committed features in {directory}: cannot show the nearest corpus images"
        )
    query = query_QO / (np.linalg.norm(query_QO, axis=1, keepdims=True) + 1e-12)
    best: list[list[tuple[float, dict[str, Any]]]] = [[] for _ in query]
    for sid, record in sorted(records.items()):
        for name in record.files:
            with catalog.fs.open_input_file(f"{directory}/{name}") as f:
                parquet = pq.ParquetFile(f)
                target = next(c for c in parquet.schema_arrow.names if c.startswith("target_"))
                table = parquet.read(columns=["key", "caption", target])
            if table.num_rows == 0:
                continue
            emb = from_fixed_list(table.column(target), (-1,)).astype(np.float32)
            emb /= np.linalg.norm(emb, axis=1, keepdims=True) + 1e-12
            sims_QN = query @ emb.T
            keys, captions = table.column("key").to_pylist(), table.column("caption").to_pylist()
            for q, sims in enumerate(sims_QN):
                for i in np.argsort(-sims)[:k]:
                    best[q].append(
                        (float(sims[i]), {"key": keys[i], "caption": captions[i], "shard": sid})
                    )
                best[q] = sorted(best[q], key=lambda t: -t[0])[:k]
    return [[row | {"cosine": cos} for cos, row in rows] for rows in best]


def raw_images(catalog: Catalog, corpus: str, wanted: Sequence[dict[str, Any]]) -> dict[str, bytes]:
    """{key: image bytes} of `wanted` rows from the raw shards they came from (same shard id)."""
    from pipelines.features import read_raw_tar

    raw_dir, records = catalog.raw_dir(corpus), catalog.committed(catalog.raw_dir(corpus))
    found: dict[str, bytes] = {}
    for sid in sorted({r["shard"] for r in wanted}):
        keys = {r["key"] for r in wanted if r["shard"] == sid}
        tars = [n for n in records[sid].files if n.endswith(".tar")] if sid in records else []
        for name in tars:
            with catalog.fs.open_input_file(f"{raw_dir}/{name}") as f:
                for sample in read_raw_tar(f):
                    if sample["key"] in keys and "image" in sample:
                        found[sample["key"]] = sample["image"]
    return found


def contact_sheet(
    prompt: str, rows: Sequence[dict[str, Any]], images: dict[str, bytes], path: Path
) -> Path:
    """A grid of the nearest corpus images, each with its cosine and caption, titled by the prompt."""
    import io

    from PIL import Image, ImageDraw, ImageFont

    cell, text_h, cols = 160, 54, min(4, len(rows))
    grid_rows = -(-len(rows) // cols)
    sheet = Image.new("RGB", (cols * cell, 40 + grid_rows * (cell + text_h)), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    draw.text((6, 6), textwrap.shorten(f"generated: {prompt!r}", 70), fill="black", font=font)
    draw.text((6, 22), "nearest corpus images by target embedding (cosine)", fill="gray", font=font)
    for i, row in enumerate(rows):
        x, y = (i % cols) * cell, 40 + (i // cols) * (cell + text_h)
        try:
            thumb = Image.open(io.BytesIO(images[row["key"]])).convert("RGB")
            thumb.thumbnail((cell - 8, cell - 8))
        except (KeyError, OSError):
            thumb = Image.new(
                "RGB", (cell - 8, cell - 8), "lightgray"
            )  # raw shard not in this root
        sheet.paste(thumb, (x + 4, y + 4))
        lines = [f"{i + 1}. {row['cosine']:.3f}", *textwrap.wrap(row["caption"] or "", 26)[:3]]
        draw.multiline_text((x + 4, y + cell), "\n".join(lines), fill="black", font=font, spacing=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "prompt"


@cli_main
def generate_main(argv: Sequence[str] | None = None) -> int:
    """Generate 32 image codes for each prompt and show what they mean: the nearest corpus images."""
    config = parse_command(GenerateConfig, argv, prog="seedpipe generate", description=generate_main.__doc__ or "",
                           positional="prompts")  # fmt: skip
    loaded = load(config)
    if not loaded.corpus or not loaded.features:
        raise ValueError(
            "the tokenizer records no corpus/feature set (lineage.json): pass --corpus and --features"
        )
    if config.dry_run:
        return 0
    catalog = Catalog(config.root)
    sampling = {"do_sample": True, "temperature": config.temperature, "top_k": config.top_k or None,
                "seed": config.seed} if config.sample else {}  # fmt: skip
    with torch.no_grad():
        codes_BN = loaded.llm.image_codes(list(config.prompts), **sampling)
        gen_BO = loaded.tokenizer.decode(
            codes_BN.to(loaded.tokenizer.quantizer.codebook.weight.device)
        )
    neighbours = nearest_rows(catalog, loaded.corpus, loaded.features, gen_BO.flatten(1).float().cpu().numpy(),
                              config.num_images)  # fmt: skip
    images = raw_images(catalog, loaded.corpus, [r for rows in neighbours for r in rows])
    # default `<root>/generated`; on an object-store root written in this node's mirror of that
    # folder and pushed to the store (never into the working folder)
    folder = (
        None if config.out else RunFolder(join_uri(catalog.location(catalog.base), "generated"))
    )
    out = Path(config.out) if config.out else folder.local
    print(
        "picture: not rendered (no diffusers unCLIP decoder in this build); showing the nearest corpus images"
    )
    for prompt, codes, rows in zip(config.prompts, codes_BN.tolist(), neighbours, strict=True):
        sheet = contact_sheet(prompt, rows, images, out / f"{slug(prompt)}.png")
        shown = folder.uri_of(sheet.name) if folder is not None else str(sheet)
        record = {"prompt": prompt, "codes": codes, "tokenizer": loaded.tokenizer_ref.uri, "lora": config.lora,
                  "corpus": loaded.corpus, "features": loaded.features, "nearest": rows, "sheet": shown}  # fmt: skip
        sheet.with_suffix(".json").write_text(json.dumps(record, indent=2))
        if folder is not None:
            for path in (sheet, sheet.with_suffix(".json")):
                folder.push(path.name)
        print(f"{prompt!r} -> {len(codes)} codes: {' '.join(map(str, codes))}")
        print(f"  nearest {loaded.corpus} images by target embedding (cosine):")
        for i, row in enumerate(rows, 1):
            print(f"  {i:2d}. {row['cosine']:.3f}  {row['caption']}  (key {row['key']})")
        print(f"  contact sheet: {shown}", flush=True)
    return 0
