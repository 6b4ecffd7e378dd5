"""The numbers and the report of `seedpipe evaluate`: metrics from the workers' rows, beside chance.

Rows are what `jobs.eval_data`'s workers return, one per (image, caption) row of the split; the
metric functions are `jobs.metrics`'s. Ground truth is many-to-many (`ImageCaptionIndex`): rows are
grouped into distinct images by their sha256 (a COCO-style corpus has one row per caption of an
image) and captions are deduplicated as candidates, so an image's hit is any caption equal to one
of its captions, a caption's hit is any image it describes, and a generated caption is scored
against all of its image's captions. Each image is a query once; per-row scores (decoder cosines)
stay per row.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

KS = (1, 5, 10)


def compute_metrics(rows: dict[str, np.ndarray], num_codes: int,
                    t2i: dict[str, np.ndarray] | None = None) -> tuple[dict[str, float], dict[str, float]]:  # fmt: skip
    """(metrics, chance) from EvalWorker rows (and TextToImageWorker rows of their distinct captions).

    `rows["image_id"]` (the image's sha256) groups rows into images; without it every row is an image.
    """
    from jobs.metrics import (
        ImageCaptionIndex,
        caption_scores,
        chance_at_k,
        codebook_stats,
        recall_at_k,
    )

    image_ids = rows["image_id"] if "image_id" in rows else rows["key"]
    index = ImageCaptionIndex.build(list(image_ids), list(rows["caption"]))
    images, captions = index.image_row_I, index.caption_row_U
    base = chance_at_k(index.relevance, KS)
    metrics: dict[str, float] = {}
    chance: dict[str, float] = {}
    for kind in ("embeds", "codes"):
        recall = recall_at_k(
            rows[f"img_{kind}"][images], rows["txt"][captions], index.relevance, KS
        )
        metrics |= {f"{k}_{kind}": v for k, v in recall.items()}
        chance |= {f"{k}_{kind}": base[k] for k in recall}
    metrics |= codebook_stats(rows["codes"][images], num_codes)
    metrics |= {k: float(np.mean(rows[k])) for k in ("recon_cosine", "gen_cosine", "gen_mse")}
    if "hypothesis" in rows:
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", UserWarning
            )  # CIDEr-D of one image: 0, said in the docs
            metrics |= caption_scores(list(rows["hypothesis"][images]), index.references_I())
    if t2i is not None:
        order = {c: i for i, c in enumerate(t2i["caption"])}
        at_U = np.array([order[c] for c in index.captions_U])
        gen_UO, target_RO = t2i["gen"][at_U], rows["target"]
        # each row's generation (from its caption) against that row's target
        gen_RO = gen_UO[index.row_caption_R]
        cos_R = (gen_RO * target_RO).sum(1) / (
            np.linalg.norm(gen_RO, axis=1) * np.linalg.norm(target_RO, axis=1) + 1e-12
        )
        # t2i: each distinct caption's generation ranks the split's images by their targets
        recall = recall_at_k(target_RO[images], gen_UO, index.relevance, (1, 5))
        t2i_chance = chance_at_k(index.relevance, (1, 5))
        metrics |= {"t2i_valid_fraction": float(t2i["valid"][at_U][index.row_caption_R].mean()),
                    "t2i_gen_cosine": float(cos_R.mean()), "t2i_r1": recall["t2i_r1"], "t2i_r5": recall["t2i_r5"]}  # fmt: skip
        chance |= {"t2i_r1": t2i_chance["t2i_r1"], "t2i_r5": t2i_chance["t2i_r5"]}
    return metrics, chance


SECTIONS = [
    ("tokenizer retrieval, continuous causal embeddings", [f"{d}_r{k}_embeds" for d in ("i2t", "t2i") for k in KS]),
    ("tokenizer retrieval, embeddings reconstructed from codes", [f"{d}_r{k}_codes" for d in ("i2t", "t2i") for k in KS]),
    ("codebook", ["codebook_usage", "codebook_perplexity", "dead_codes"]),
    ("decoders", ["recon_cosine", "gen_cosine", "gen_mse"]),
    ("LLM: image-to-text", ["caption_bleu4", "caption_cider", "caption_exact"]),
    ("LLM: text-to-image", ["t2i_valid_fraction", "t2i_gen_cosine", "t2i_r1", "t2i_r5"]),
]  # fmt: skip


def format_table(metrics: dict[str, float], chance: dict[str, float], title: str) -> str:
    """The results table: one line per metric, its chance level and the ratio where there is one."""
    lines = [title, f"  {'metric':24s} {'value':>9s} {'chance':>9s} {'x chance':>9s}"]
    for section, names in SECTIONS:
        present = [n for n in names if n in metrics]
        if not present:
            continue
        lines.append(f"  -- {section}")
        for name in present:
            value, base = metrics[name], chance.get(name)
            text = f"{int(value):9d}" if name == "dead_codes" else f"{value:9.4f}"
            extra = f" {base:9.4f} {value / base:9.2f}" if base else ""
            lines.append(f"  {name:24s} {text}{extra}")
    return "\n".join(lines)


def usage_plot(codes: np.ndarray, num_codes: int, path: Path, stats: dict[str, float]) -> Path:
    """Bar chart of how often each code is used over the split (sorted by use)."""
    from jobs.plots import pyplot

    plt = pyplot()

    counts = np.sort(np.bincount(codes.reshape(-1), minlength=num_codes))[::-1]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(np.arange(num_codes), counts, width=1.0)
    ax.set(xlabel="code (sorted by use)", ylabel="uses", title=f"codebook usage {stats['codebook_usage']:.3f}, "
           f"perplexity {stats['codebook_perplexity']:.1f}, dead {int(stats['dead_codes'])} of {num_codes}")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


LLM_METRICS = frozenset(n for _, names in SECTIONS[4:] for n in names)
