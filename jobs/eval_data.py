"""The Ray Data side of `seedpipe evaluate`: per-row model outputs over the catalog's cached features.

    read_parquet(features) -> keep_split (tasks) -> map_batches(EvalWorker, actors) -> driver
    unique captions -> map_batches(TextToImageWorker, actors) -> driver       (only with --lora)

The workers are plain callables `pyarrow.Table -> dict[str, np.ndarray]` that load their models
once (Ray Data's stateful-transform idiom), so the tests call them without Ray. The ViT never runs:
`EvalWorker` starts from the cached patch features (fp16 in the parquet, as every stage reads
them). What crosses back to the driver is small per row (ITC features of width E, 32 codes, a few
scalars; the target embedding only when the LLM is evaluated), so a COCO-5k or CC3M-val split fits
in the driver's memory while the model work is spread over `--num-workers` actors with
`--num-gpus-per-worker` each.

Shapes: B batch, P ViT tokens, Dv ViT width, Q queries, D width, E ITC width, N codes per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.datasets import is_holdout


def keep_split(batch: Any, fraction: float, split: str) -> Any:
    """Ray Data map over Arrow batches: the held-out rows (the jobs' rule), or all for `all`."""
    import pyarrow as pa

    if split == "all":
        return batch
    return batch.filter(pa.array(is_holdout(batch.column("key").to_pylist(), fraction)))


def _device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


class EvalWorker:
    """Features rows -> codes, ITC features (continuous and from codes), decoder scores, captions.

    Output columns per row: key, image_id (the image's sha256, else its key: rows of one image
    share it), caption, codes (N,), img_embeds / img_codes / txt (E,),
    recon_cosine, gen_cosine, gen_mse; `target` (flattened) when `keep_target`; `hypothesis`
    (the LLM's caption of the codes) when `lora_dir`.
    """

    def __init__(self, *, tokenizer_dir: str, text_tokenizer_dir: str, patch_shape: Sequence[int],
                 target_column: str, target_shape: Sequence[int], max_text_len: int,
                 keep_target: bool = False, lora_dir: str | None = None, device: str | None = None) -> None:  # fmt: skip
        from transformers import AutoTokenizer

        from seed_core.tokenizer import SeedTokenizer

        self.device = _device(device)
        self.tokenizer = SeedTokenizer.from_pretrained(tokenizer_dir).eval().to(self.device)
        self.text_tok = AutoTokenizer.from_pretrained(text_tokenizer_dir)
        self.patch_shape, self.target_shape = tuple(patch_shape), tuple(target_shape)
        self.target_column, self.max_text_len, self.keep_target = (
            target_column,
            max_text_len,
            keep_target,
        )
        self.llm = load_llm(lora_dir, self.device) if lora_dir else None

    def _tensor(self, column: Any, shape: Sequence[int]) -> torch.Tensor:
        from pipelines.datasets import fixed_tensor

        return fixed_tensor(column, shape).to(self.device)

    @torch.no_grad()
    def __call__(self, batch: Any) -> dict[str, np.ndarray]:
        tok, qformer = self.tokenizer, self.tokenizer.qformer
        captions = [c or "" for c in batch.column("caption").to_pylist()]
        causal_BQD = tok.embed(self._tensor(batch.column("patch_features"), self.patch_shape))
        codes_BN = tok.encode_embeddings(causal_BQD)
        recon_BQD = tok.reconstruct(codes_BN)
        gen_BO = tok.decode(codes_BN).flatten(1).float()
        target_BO = self._tensor(batch.column(self.target_column), self.target_shape).flatten(1)
        text = self.text_tok(captions, padding="max_length", truncation=True, max_length=self.max_text_len,
                             return_tensors="pt").to(self.device)  # fmt: skip
        keys = batch.column("key").to_pylist()
        sha256 = (batch.column("sha256").to_pylist() if "sha256" in batch.column_names
                  else [None] * len(keys))  # fmt: skip
        out = {
            "key": np.array(keys, dtype=object),
            "image_id": np.array([s or k for s, k in zip(sha256, keys, strict=True)], dtype=object),
            "caption": np.array(captions, dtype=object),
            "codes": codes_BN.cpu().numpy().astype(np.int64),
            "img_embeds": qformer.image_feature(causal_BQD).float().cpu().numpy(),
            "img_codes": qformer.image_feature(recon_BQD).float().cpu().numpy(),
            "txt": qformer.text_feature(
                qformer.encode_text(text["input_ids"], text["attention_mask"])
            )
            .float()
            .cpu()
            .numpy(),  # fmt: skip
            "recon_cosine": F.cosine_similarity(recon_BQD, causal_BQD, dim=-1)
            .mean(1)
            .float()
            .cpu()
            .numpy(),
            "gen_cosine": F.cosine_similarity(gen_BO, target_BO, dim=-1).cpu().numpy(),
            "gen_mse": (gen_BO - target_BO).pow(2).mean(1).cpu().numpy(),
        }
        if self.keep_target:
            out["target"] = target_BO.cpu().numpy()
        if self.llm is not None:
            out["hypothesis"] = np.array(self.llm.captions(codes_BN), dtype=object)
        return out


class LoadedLlm:
    """A LoRA export loaded once: the PEFT model, its tokenizer and image-token space, and the
    caption length budget it was trained with (`max_length` in seed_lora.json)."""

    def __init__(self, directory: str, device: str) -> None:
        import json
        from pathlib import Path

        from jobs.lora_export import EXPORT_META, load_exported
        from seed_core.llm import IMAGE_TO_TEXT_PROMPT

        self.model, self.tokenizer, self.space = load_exported(directory)
        self.model.eval().to(device)
        self.meta = json.loads(Path(directory, EXPORT_META).read_text())
        self.max_length = int(self.meta["max_length"])
        n = self.space.num_tokens_per_image
        # <s> <img> N codes </img> prompt: what precedes the caption (as in jobs.lora_eval)
        prompt = (
            1 + n + 2 + len(self.tokenizer.encode(IMAGE_TO_TEXT_PROMPT, add_special_tokens=False))
        )
        self.max_new_tokens = max(1, self.max_length - prompt)

    def captions(self, codes_BN: torch.Tensor) -> list[str]:
        from seed_core.llm import generate_caption

        return generate_caption(
            self.model, self.tokenizer, self.space, codes_BN, max_new_tokens=self.max_new_tokens
        )

    def image_codes(self, captions: list[str], **sampling: Any) -> torch.Tensor:
        """(B, N) codes, constrained to be N valid codes (seed_core.llm.generate_image_codes)."""
        from seed_core.llm import generate_image_codes

        return generate_image_codes(self.model, self.tokenizer, self.space, captions, **sampling)


def load_llm(directory: str, device: str | None = None) -> LoadedLlm:
    return LoadedLlm(directory, _device(device))


def resolve_models(catalog: Any, tokenizer: str, lora: str) -> tuple[Any, Any, dict[str, Any]]:
    """(tokenizer ModelRef, LoRA ModelRef or None, the LoRA's seed_lora.json) of `--tokenizer` /
    `--lora`; the tokenizer defaults to the one whose codes the LoRA was trained on."""
    import json
    from pathlib import Path

    from jobs.lora_export import EXPORT_META
    from pipelines.models import resolve_model
    from seed_core.serialization import read_pretrained_config

    lora_ref = resolve_model(lora, catalog) if lora else None
    meta_path = Path(lora_ref.directory, EXPORT_META) if lora_ref else None
    if meta_path is not None and not meta_path.is_file():
        raise ValueError(f"{lora} is not a seedpipe LoRA export (no {EXPORT_META})")
    meta = json.loads(meta_path.read_text()) if meta_path else {}
    tokenizer = tokenizer or meta.get("tokens", {}).get("tokenizer_uri", "")
    if not tokenizer:
        raise ValueError(
            "tokenizer is required: --tokenizer <export directory or models:/seed-tokenizer/N>"
        )
    tokenizer_ref = resolve_model(tokenizer, catalog)
    try:
        read_pretrained_config(tokenizer_ref.directory, kind="seed_tokenizer")
    except (ValueError, KeyError, OSError) as err:
        raise ValueError(f"{tokenizer} is not a SeedTokenizer export (stage 2): {err}") from None
    return tokenizer_ref, lora_ref, meta


class TextToImageWorker:
    """Captions -> generated codes (constrained), their generation embedding, and whether plain
    greedy decoding would have given exactly N codes then `</img>` (the paper's valid-image count)."""

    def __init__(self, *, lora_dir: str, tokenizer_dir: str, device: str | None = None) -> None:
        from seed_core.tokenizer import SeedTokenizer

        self.device = _device(device)
        self.llm = load_llm(lora_dir, self.device)
        self.tokenizer = SeedTokenizer.from_pretrained(tokenizer_dir).eval().to(self.device)

    @torch.no_grad()
    def __call__(self, batch: Any) -> dict[str, np.ndarray]:
        from jobs.lora_eval import unconstrained_valid

        llm = self.llm
        captions = [c or "" for c in batch.column("caption").to_pylist()]
        codes_BN = llm.image_codes(captions).to(self.device)
        valid_B = unconstrained_valid(
            llm.model, llm.tokenizer, llm.space, captions, max_length=llm.max_length
        )
        return {
            "caption": np.array(captions, dtype=object),
            "gen_codes": codes_BN.cpu().numpy().astype(np.int64),
            "gen": self.tokenizer.decode(codes_BN).flatten(1).float().cpu().numpy(),
            "valid": valid_B.numpy().astype(bool),
        }


def _collect(ds: Any, *, sort_by: str) -> dict[str, np.ndarray]:
    """Every output batch of `ds`, concatenated per column on the driver, rows sorted by `sort_by`:
    the actors finish in any order, and a mean summed in another order differs in its last bits
    (two demo runs that trained identical models gave gen_mse 0.0026387554 and 0.0026387556)."""
    parts: dict[str, list[np.ndarray]] = {}
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for name, value in batch.items():
            parts.setdefault(name, []).append(np.asarray(value))
    rows = {name: np.concatenate(values) for name, values in parts.items()}
    if not rows:
        return rows
    order = np.argsort(rows[sort_by].astype(str), kind="stable")
    return {name: values[order] for name, values in rows.items()}


def _map(ds: Any, worker: type, kwargs: dict[str, Any], resources: Any) -> Any:
    import ray

    return ds.map_batches(
        worker, fn_constructor_kwargs=kwargs, batch_format="pyarrow", batch_size=resources.batch_size,
        compute=ray.data.ActorPoolStrategy(size=resources.num_workers),
        num_gpus=resources.num_gpus_per_worker or None, num_cpus=resources.num_cpus_per_worker,
    )  # fmt: skip


def run_eval_rows(files: Sequence[str], *, filesystem: Any, fraction: float, split: str,
                  worker_kwargs: dict[str, Any], resources: Any) -> dict[str, np.ndarray]:  # fmt: skip
    """EvalWorker over the split's rows of the features `files`, on Ray Data; {} for no rows."""
    import ray

    columns = ["key", "sha256", "caption", "patch_features", worker_kwargs["target_column"]]
    # the projection is pushed down into the read: only these columns are read from the files
    ds = ray.data.read_parquet(list(files), filesystem=filesystem).select_columns(columns)
    ds = ds.map_batches(
        keep_split, batch_format="pyarrow", fn_kwargs={"fraction": fraction, "split": split}
    )
    return _collect(_map(ds, EvalWorker, worker_kwargs, resources), sort_by="key")


def run_text_to_image(captions: Sequence[str], *, lora_dir: str, tokenizer_dir: str,
                      resources: Any) -> dict[str, np.ndarray]:  # fmt: skip
    """TextToImageWorker over `captions`, on Ray Data (order not kept: match on the caption column)."""
    import ray

    # several blocks, so that every actor of the pool gets some of the captions
    blocks = max(1, min(len(captions), 4 * resources.num_workers))
    ds = ray.data.from_items([{"caption": c} for c in captions], override_num_blocks=blocks)
    kwargs = {"lora_dir": lora_dir, "tokenizer_dir": tokenizer_dir}
    return _collect(_map(ds, TextToImageWorker, kwargs, resources), sort_by="caption")
