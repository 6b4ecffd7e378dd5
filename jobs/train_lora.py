"""LoRA tuning of a causal LM on a tokens dataset: image-to-text and text-to-image (SEED's LLM side).

    python -m jobs.train_lora --config jobs/configs/tiny_lora.yaml tokens=demo@<tokenizer id>
    python -m jobs.train_lora --config jobs/configs/lora_opt2.7b.yaml tokens=cc3m@seed-tokenizer-v3@abcdef123456

Reads `tokens/<name>/` (32 codes + caption per image), extends the LLM's vocabulary with the image
tokens, wraps it with LoRA (seed_core.llm) and trains on a per-batch mix of image-to-text and
text-to-image examples on `jobs.trainer` (Ray Train + DeepSpeed). Exports the PEFT adapter, the
extended text tokenizer and a `seed_lora.json` that says how to rebuild the base; registers it.

Design choices:
- The mix is decided per batch, not per row: the round(i2t_fraction * B) rows with the smallest
  seeded key hashes become image-to-text, the others text-to-image. It is deterministic (a resumed
  run sees the same examples), every step has both loss terms, and since batches are reshuffled
  each epoch a pair is not tied to one direction for the whole run.
- `loss` is the mean over all target tokens of the batch (what the model's own loss computes);
  `loss_i2t`/`loss_t2i` are the same token-level mean restricted to one direction's rows. Only
  target positions go through the (B, T, V) -> float cross-entropy, to spare a vocabulary-wide
  fp32 copy of the logits.
- `tiny-opt` is a random OPT saved once into the run folder (like the caption-trained text
  tokenizer), so that every rank, every restart and the export agree on the base weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from jobs import config as cfg
from jobs.launch import Prepared, is_holdout, launch, run_paths
from jobs.train_tokenizer import committed_dataset, load_holdout, plot_losses
from seed_core.llm import LoraSettings

TINY_LLM = "tiny-opt"
EXPORT_META = "seed_lora.json"
JOB_NAME = "lora"

# ---------------------------------------------------------------------------------------------
# config


@dataclass(kw_only=True)
class LoraJobConfig:
    root: str = "./seed-data"
    corpus: str = "cc3m"
    tokens: str = ""
    """Tokens dataset (`tokens/<name>/`, e.g. seed-tokenizer-v3@abcdef123456), or `<corpus>@<name>`."""
    llm: str = "facebook/opt-2.7b"
    """Base causal LM: HF model directory or hub id (SEED-OPT2.7B), or `tiny-opt` (random, CPU tests)."""
    llm_tokenizer: str = ""
    """'' = the LLM's own; 'train' = byte-level BPE trained on the training captions; else a dir/hub id."""
    train_vocab_size: int = 1000
    """Vocabulary size of the caption-trained tokenizer (llm_tokenizer=train)."""
    num_codes: int = 0
    """Codebook size K of the image tokenizer; 0 = read it from the tokenizer that made the tokens
    (found through the tokens stage's MLflow run). Set it where that run is not reachable."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    i2t_fraction: float = 0.5
    """Share of each batch that is image-to-text (captioning); the rest is text-to-image (SEED: half)."""
    max_length: int = 96
    """Examples are padded to this length (static shapes); only captions are ever truncated."""
    holdout: float = 0.05
    """Fraction of rows (by key hash) held out for evaluation."""
    eval_every: int = 0
    eval_rows: int = 256
    register_as: str = "seed-lora"
    scaling: cfg.ScalingSettings = field(default_factory=cfg.ScalingSettings)
    run: cfg.RunSettings = field(default_factory=cfg.RunSettings)
    optim: cfg.OptimSettings = field(
        # Our choice: the SEED papers do not publish the LoRA optimiser; 2e-4 is the usual LoRA lr
        # (1e-4..3e-4) and weight decay 0 keeps the image-token row deltas from decaying to their init.
        default_factory=lambda: cfg.OptimSettings(
            lr=2e-4,
            min_lr=2e-5,
            warmup_steps=500,
            weight_decay=0.0,
            batch_size_per_worker=32,
            max_steps=10000,
        )  # fmt: skip
    )
    deepspeed: cfg.DeepSpeedSettings = field(default_factory=cfg.DeepSpeedSettings)
    fault: cfg.FaultSettings = field(default_factory=cfg.FaultSettings)

    def __post_init__(self) -> None:
        if not 0.0 <= self.i2t_fraction <= 1.0:
            raise ValueError(f"i2t_fraction must be in [0, 1], got {self.i2t_fraction}")
        if not 0 <= self.holdout < 0.5:
            raise ValueError(f"holdout must be in [0, 0.5), got {self.holdout}")
        if self.num_codes < 0:
            raise ValueError(
                f"num_codes must be >= 0 (0 = from the tokenizer), got {self.num_codes}"
            )
        if self.max_length < 16:
            raise ValueError(f"max_length must be >= 16, got {self.max_length}")
        if self.eval_every < 0 or self.eval_rows < 0:
            raise ValueError("eval_every and eval_rows must be >= 0")
        if self.llm == TINY_LLM and not self.llm_tokenizer:
            raise ValueError(
                f"llm_tokenizer: {TINY_LLM} has no tokenizer of its own; use 'train' or a tokenizer dir"
            )
        if self.train_vocab_size < 300:
            raise ValueError(f"train_vocab_size must be >= 300, got {self.train_vocab_size}")


# ---------------------------------------------------------------------------------------------
# driver


def resolve_tokens(config: LoraJobConfig) -> LoraJobConfig:
    """The config with `tokens=<corpus>@<name>` split into `corpus` and `tokens` (a no-op otherwise).

    A name is first looked up as is in `corpus` (tokenizer ids contain '@' themselves); only when
    no such dataset exists and `<prefix>/tokens/<rest>` does, the prefix is taken as the corpus.
    """
    from pipelines.catalog import Catalog

    if not config.tokens:
        raise ValueError(
            "tokens is required: tokens=<tokens dataset name> or tokens=<corpus>@<name>"
        )
    catalog = Catalog(config.root)
    if "@" not in config.tokens or catalog.committed(
        catalog.stage_dir(config.corpus, "tokens", config.tokens)
    ):
        return config
    corpus, name = config.tokens.split("@", 1)
    try:
        directory = catalog.stage_dir(corpus, "tokens", name)
    except ValueError:
        return config
    if not catalog.committed(directory):
        return config
    if corpus != config.corpus:
        print(
            f"lora: corpus {corpus!r} from tokens={config.tokens} (config said {config.corpus!r})"
        )
    return dataclasses.replace(config, corpus=corpus, tokens=name)


def tokenizer_num_codes(catalog: Any, tokenizer_digest: str) -> tuple[int, str] | None:
    """(codebook size, tokenizer URI) of the tokenizer with this digest, from the tokens stage's MLflow run.

    The tokens stage logs the tokenizer it used (`params.tokenizer`, a directory or models:/ URI)
    next to its digest; the size is read from that model's config.json. None when no run or model
    can be reached (a tracking server that is down must not stop a job that can be told `num_codes`).
    """
    import logging

    try:
        import mlflow

        from pipelines.lineage import EXPERIMENT, tracking_uri
        from pipelines.models import resolve_model

        uri = tracking_uri(catalog)
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
            return None  # no store yet: do not create one just to look
        client = mlflow.MlflowClient(uri)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            return None
        runs = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.stage = 'tokens' and params.tokenizer_digest = '{tokenizer_digest}'",
            order_by=["attributes.start_time DESC"],
            max_results=10,
        )
        for run in runs:
            ref_uri = run.data.params.get("tokenizer")
            if not ref_uri:
                continue
            try:
                ref = resolve_model(ref_uri)
                payload = json.loads(Path(ref.directory, "config.json").read_text())
                return int(payload["config"]["quantizer"]["num_codes"]), ref_uri
            except (OSError, ValueError, KeyError) as err:
                logging.getLogger(__name__).warning("tokenizer %s not readable: %s", ref_uri, err)
    except Exception as err:  # noqa: BLE001 - any tracking failure means "not found"
        logging.getLogger(__name__).warning("tokenizer lookup in MLflow failed: %s", err)
    return None


def build_tiny_llm(vocab_size: int, *, max_positions: int, tokenizer: Any, seed: int) -> Any:
    """A random 2-layer OPT (hidden 32, 4 heads, ffn 64): builds in milliseconds, for CPU tests."""
    import transformers

    config = transformers.OPTConfig(
        vocab_size=vocab_size, hidden_size=32, word_embed_proj_dim=32, num_hidden_layers=2, ffn_dim=64,
        num_attention_heads=4, max_position_embeddings=max_positions, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.OPTForCausalLM(config)


def prepare_lora(config: LoraJobConfig) -> Prepared:
    import pyarrow.compute as pc
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from pipelines.catalog import Catalog
    from pipelines.schemas import schema_meta, schema_shapes

    config = resolve_tokens(config)
    catalog = Catalog(config.root)
    directory = catalog.stage_dir(config.corpus, "tokens", config.tokens)
    if not catalog.committed(directory):
        selector = pafs.FileSelector(
            f"{catalog.corpus_dir(config.corpus)}/tokens", allow_not_found=True
        )
        infos = catalog.fs.get_file_info(selector)
        names = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)
        raise ValueError(
            f"tokens={config.tokens!r}: no committed tokens dataset in corpus {config.corpus!r} "
            f"(available: {names or 'none'})"
        )
    files, lineage = committed_dataset(catalog, directory, "tokens")
    schema = pq.read_schema(files[0])
    meta = schema_meta(schema)
    if meta.get("stage") != "tokens" or not {"key", "caption", "codes"} <= set(schema.names):
        raise ValueError(f"{directory} is not a tokens dataset (stage {meta.get('stage')!r})")
    (num_tokens,) = schema_shapes(schema)["codes"]
    tokenizer_digest = meta.get("tokenizer_digest", "")

    num_codes, tokenizer_uri = config.num_codes, ""
    found = tokenizer_num_codes(catalog, tokenizer_digest) if tokenizer_digest else None
    if found is not None:
        if num_codes and num_codes != found[0]:
            raise ValueError(
                f"num_codes={num_codes} but the tokenizer that made {config.tokens} ({found[1]}) has {found[0]} codes"
            )
        num_codes, tokenizer_uri = found
    if not num_codes:
        raise ValueError(
            f"num_codes: the tokenizer of {config.tokens} (digest {tokenizer_digest[:12] or '?'}) "
            "cannot be found through MLflow; set num_codes=<codebook size>"
        )
    sample = pq.read_table(files[0], columns=["codes"]).column("codes").combine_chunks().flatten()
    low, high = pc.min(sample).as_py(), pc.max(sample).as_py()
    if sample.null_count or low is None or low < 0 or high >= num_codes:
        raise ValueError(f"num_codes={num_codes}: codes in {files[0]} span [{low}, {high}]")
    if config.max_length < num_tokens + 10:
        raise ValueError(
            f"max_length={config.max_length} cannot hold <img> + {num_tokens} codes + </img> + prompt"
        )

    _, _, run_dir = run_paths(config, JOB_NAME)
    text_tokenizer = config.llm_tokenizer or config.llm
    if config.llm_tokenizer == "train":
        tokenizer_dir = run_dir / "text_tokenizer"
        if not tokenizer_dir.exists():  # a restarted run keeps its first tokenizer
            from seed_core.llm import train_caption_tokenizer

            captions = []
            for f in files:
                table = pq.read_table(f, columns=["key", "caption"])
                keep = ~is_holdout(table.column("key").to_pylist(), config.holdout)
                captions += [
                    c
                    for c, k in zip(table.column("caption").to_pylist(), keep, strict=True)
                    if k and c
                ]
            train_caption_tokenizer(captions, vocab_size=config.train_vocab_size).save_pretrained(
                tokenizer_dir
            )
        text_tokenizer = str(tokenizer_dir)
    llm, base_in_export = config.llm, False
    if config.llm == TINY_LLM:
        llm_dir = run_dir / "tiny_llm"
        if not llm_dir.exists():
            tok = AutoTokenizer.from_pretrained(text_tokenizer)
            build_tiny_llm(len(tok), max_positions=max(128, config.max_length), tokenizer=tok,
                           seed=config.run.seed).save_pretrained(llm_dir)  # fmt: skip
        llm, base_in_export = str(llm_dir), True
    tokens_info = {"name": lineage["name"], "digest": lineage["digest"],
                   "tokenizer_id": meta.get("tokenizer_id", ""), "tokenizer_digest": tokenizer_digest,
                   "tokenizer_uri": tokenizer_uri}  # fmt: skip
    return Prepared(train_files=files, input_datasets=[lineage], holdout_fraction=config.holdout,
                    extra={"_llm": llm, "_base_in_export": base_in_export, "_text_tokenizer": text_tokenizer,
                           "_num_codes": num_codes, "_num_tokens": num_tokens, "_tokens": tokens_info,
                           "_train_files": files})  # fmt: skip


# ---------------------------------------------------------------------------------------------
# workers


def i2t_rows(keys: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    """Which rows of a batch are image-to-text: the round(fraction * B) smallest seeded key hashes.

    With 0 < fraction < 1 and B >= 2 each direction gets at least one row, so both loss terms are
    defined on every step (and the per-rank term lists stay identical for the all-reduce).
    """
    b = len(keys)
    n = round(fraction * b)
    if 0 < fraction < 1 and b >= 2:
        n = min(max(n, 1), b - 1)
    hashes = [int(hashlib.md5(f"{seed}:{k}".encode()).hexdigest()[:12], 16) for k in keys]
    out = np.zeros(b, dtype=bool)
    out[np.argsort(hashes, kind="stable")[:n]] = True
    return out


def model_dtype(job: dict[str, Any]) -> torch.dtype:
    """The dtype DeepSpeed will train in (so a 2.7B base is loaded once in it, not in fp32 first)."""
    precision = job["deepspeed"]["precision"]
    if precision == "auto":
        precision = "bf16" if job["scaling"]["use_gpu"] else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


class LoraTask(nn.Module):
    """PEFT-wrapped causal LM + the token-level losses of both directions."""

    def __init__(self, model: nn.Module, space: Any) -> None:
        super().__init__()
        self.model = model
        self.space = space

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        from seed_core.tasks import TaskOutput

        logits_BTV = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
        labels_BT = batch["labels"][:, 1:]  # position t predicts token t + 1
        target_BT = labels_BT != -100
        logits_MV = logits_BTV[:, :-1][target_BT].float()  # M target positions of the batch
        labels_M = labels_BT[target_BT]
        nll_M = nn.functional.cross_entropy(logits_MV, labels_M, reduction="none")
        correct_M = (logits_MV.argmax(-1) == labels_M).float()
        i2t_M = batch["i2t"].bool()[:, None].expand_as(target_BT)[target_BT]
        zero = nll_M.sum() * 0  # keeps the graph (and the dtype) when a direction is absent

        def mean(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
            return values[where].mean() if bool(where.any()) else zero

        everywhere = torch.ones_like(i2t_M)
        terms = {"loss_i2t": mean(nll_M, i2t_M), "loss_t2i": mean(nll_M, ~i2t_M)}
        metrics = {
            "token_acc_i2t": mean(correct_M, i2t_M).detach(),
            "token_acc_t2i": mean(correct_M, ~i2t_M).detach(),
            "i2t_rows": batch["i2t"].float().mean(),
            "target_tokens": torch.tensor(float(labels_M.numel())),
        }
        return TaskOutput(loss=mean(nll_M, everywhere), terms=terms, metrics=metrics)


def load_llm(job: dict[str, Any]) -> tuple[nn.Module, Any, Any]:
    """(PEFT model, extended text tokenizer, ImageTokenSpace), seeded alike on every rank."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from seed_core.llm import add_image_tokens, apply_lora

    tokenizer = AutoTokenizer.from_pretrained(job["_text_tokenizer"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(job["run"]["seed"])  # LoRA A init: the same on every rank
        base = AutoModelForCausalLM.from_pretrained(job["_llm"], dtype=model_dtype(job))
        space = add_image_tokens(
            tokenizer, base, job["_num_codes"], num_tokens_per_image=job["_num_tokens"]
        )
        model = apply_lora(base, LoraSettings(**job["lora"]), space)
    return model, tokenizer, space


def build_parts(job: dict[str, Any], *, rank: int, world: int) -> Any:
    from ray.data.collate_fn import ArrowBatchCollateFn

    from jobs.trainer import JobParts
    from pipelines.schemas import from_fixed_list
    from seed_core.llm import build_image_to_text_example, build_text_to_image_example

    model, tokenizer, space = load_llm(job)
    task = LoraTask(model, space)
    max_len, num_tokens, seed = job["max_length"], job["_num_tokens"], job["run"]["seed"]
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )

    class Collate(ArrowBatchCollateFn):
        """Arrow rows (key, caption, codes) -> (B, max_length) input_ids/attention_mask/labels + i2t."""

        def __init__(self, directions: str = "mix") -> None:
            self.directions = directions  # "mix": the training mix; "both": every row both ways

        def __call__(self, batch: Any) -> dict[str, torch.Tensor]:
            codes = torch.from_numpy(
                from_fixed_list(batch.column("codes"), (num_tokens,)).astype(np.int64)
            )
            captions = [c or "" for c in batch.column("caption").to_pylist()]
            if self.directions == "both":
                i2t = np.array([True] * len(captions) + [False] * len(captions))
                codes, captions = torch.cat([codes, codes]), captions + captions
            else:
                i2t = i2t_rows(batch.column("key").to_pylist(), job["i2t_fraction"], seed)
            examples = [
                (build_image_to_text_example if d else build_text_to_image_example)(
                    c, cap, tokenizer, space, max_length=max_len
                )
                for c, cap, d in zip(codes, captions, i2t, strict=True)
            ]
            return pad_examples(examples, pad_id, max_len) | {"i2t": torch.from_numpy(i2t)}

    holdout = load_holdout(
        job["_train_files"], job["holdout"], job["eval_rows"], ["key", "caption", "codes"]
    )
    eval_bs = job["optim"]["batch_size_per_worker"]

    def evaluate(module: Any) -> dict[str, float]:
        # Only rank 0's numbers are logged; without ZeRO-3 the other ranks need not run the forward.
        if (
            holdout is None
            or holdout.num_rows == 0
            or (rank != 0 and job["deepspeed"]["zero_stage"] < 3)
        ):
            return {}
        return evaluate_lora(module, tokenizer, space, holdout, Collate("both"), batch_size=eval_bs,
                             max_length=max_len)  # fmt: skip

    def export(module: Any, out: Path) -> None:
        export_lora(module.model, tokenizer, space, out, job)

    return JobParts(task=task, collate=Collate(), export=export, evaluate=evaluate,
                    final_artifacts=lambda module, run_dir: [plot_losses(run_dir)])  # fmt: skip


def pad_examples(
    examples: Sequence[dict[str, list[int]]], pad_id: int, length: int
) -> dict[str, torch.Tensor]:
    """collate_examples, then right-padded to a fixed `length` (static shapes for every step)."""
    from seed_core.llm import IGNORE_INDEX, collate_examples

    batch = collate_examples(examples, pad_id)
    extra = length - batch["input_ids"].shape[1]
    assert extra >= 0, "examples are built with max_length"
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    return {k: nn.functional.pad(v, (0, extra), value=fill[k]) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# evaluation


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def corpus_bleu4(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 in [0, 1]: clipped 1..4-gram precisions, geometric mean, brevity penalty.

    Papineni et al. (2002), one reference per hypothesis, lower-cased word/punctuation tokens, no
    smoothing. Written here because no maintained implementation (nltk, sacrebleu, pycocoevalcap)
    is installed in this environment; pycocoevalcap's B@4 (the paper's COCO column) tokenises with
    PTB rules and takes several references, so numbers are comparable in kind, not to the digit.
    """
    matches, totals, hyp_len, ref_len = [0] * 4, [0] * 4, 0, 0
    for hyp, ref in zip(hypotheses, references, strict=True):
        h, r = _words(hyp), _words(ref)
        hyp_len, ref_len = hyp_len + len(h), ref_len + len(r)
        for n in range(1, 5):
            h_grams = Counter(tuple(h[i : i + n]) for i in range(len(h) - n + 1))
            r_grams = Counter(tuple(r[i : i + n]) for i in range(len(r) - n + 1))
            matches[n - 1] += sum((h_grams & r_grams).values())
            totals[n - 1] += max(len(h) - n + 1, 0)
    if min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals, strict=True)) / 4
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(log_precision)


def _normalise(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


@torch.no_grad()
def unconstrained_valid(
    model: Any, tokenizer: Any, space: Any, captions: Sequence[str], *, max_length: int
) -> torch.Tensor:
    """(B,) bool: would plain greedy decoding after `<img>` give exactly N codes then `</img>`?

    The paper's "valid 32-token images" count (causal 4997 / 5000); generate_image_codes itself is
    constrained and valid by construction, so this is the measure of what the model learned.
    """
    from seed_core.llm import build_text_to_image_example

    n = space.num_tokens_per_image
    dummy = torch.zeros(n, dtype=torch.long)
    prompts = [build_text_to_image_example(dummy, c, tokenizer, space, max_length=max_length)["input_ids"][: -n - 1]
               for c in captions]  # fmt: skip  # ends with <img>
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    was_training = model.training
    model.eval()
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n + 1,
                         pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    model.train(was_training)
    new = out[:, width:]
    if new.shape[1] < n + 1:  # every row stopped at eos early: none is valid
        return torch.zeros(len(captions), dtype=torch.bool)
    return (space.is_code_id(new[:, :n]).all(1) & (new[:, n] == space.image_end_id)).cpu()


@torch.no_grad()
def evaluate_lora(task: LoraTask, tokenizer: Any, space: Any, holdout: Any, collate: Any, *, batch_size: int,
                  max_length: int) -> dict[str, float]:  # fmt: skip
    """Held-out metrics: teacher-forced losses both ways, captions (exact match, BLEU-4), generated images.

    `t2i_valid` checks generate_image_codes' output (exactly N codes in [0, K): 1.0 unless the
    constrained decoder is broken); `t2i_valid_unconstrained` is what plain greedy would have given;
    `t2i_code_acc` is the share of generated codes equal to the tokenizer's codes of the true image.
    """
    from pipelines.schemas import from_fixed_list
    from seed_core.llm import IMAGE_TO_TEXT_PROMPT, generate_caption, generate_image_codes

    model, n = task.model, space.num_tokens_per_image
    prompt_len = 1 + n + 2 + len(tokenizer.encode(IMAGE_TO_TEXT_PROMPT, add_special_tokens=False))
    sums: dict[str, float] = Counter()
    hyps, refs = [], []
    valid = unconstrained = code_hits = 0
    device = next(model.parameters()).device
    for start in range(0, holdout.num_rows, batch_size):
        rows = holdout.slice(start, batch_size)
        weight = rows.num_rows
        out = task({k: v.to(device) for k, v in collate(rows).items()})
        for name, value in {"loss": out.loss, **out.terms}.items():
            sums[name] += float(value) * weight
        codes = torch.from_numpy(from_fixed_list(rows.column("codes"), (n,)).astype(np.int64))
        captions = [c or "" for c in rows.column("caption").to_pylist()]
        hyps += generate_caption(model, tokenizer, space, codes.to(device),
                                 max_new_tokens=max(1, max_length - prompt_len))  # fmt: skip
        refs += captions
        generated = generate_image_codes(model, tokenizer, space, captions).cpu()
        valid += (
            int(((generated >= 0) & (generated < space.num_codes)).all(1).sum())
            if generated.shape[1] == n
            else 0
        )
        code_hits += int((generated == codes).sum()) if generated.shape == codes.shape else 0
        unconstrained += int(
            unconstrained_valid(model, tokenizer, space, captions, max_length=max_length).sum()
        )
    rows_total = holdout.num_rows
    metrics = {k: v / rows_total for k, v in sums.items()}
    metrics |= {
        "caption_exact_match": float(np.mean([_normalise(h) == _normalise(r) for h, r in zip(hyps, refs, strict=True)])),
        "caption_bleu4": corpus_bleu4(hyps, refs),
        "t2i_valid": valid / rows_total,
        "t2i_valid_unconstrained": unconstrained / rows_total,
        "t2i_code_acc": code_hits / (rows_total * n),
        "rows": float(rows_total),
    }  # fmt: skip
    return metrics


# ---------------------------------------------------------------------------------------------
# export


def export_lora(model: Any, tokenizer: Any, space: Any, out: Path, job: dict[str, Any]) -> None:
    """The PEFT adapter (+ image-token row deltas), the extended tokenizer, and how to rebuild the base.

    out/adapter_config.json, adapter_model.safetensors   PeftModel.save_pretrained
    out/text_tokenizer/                                  text vocabulary + <img_xxxxx>, <img>, </img>
    out/base_model/                                      only for tiny-opt (a random base)
    out/seed_lora.json                                   base, image-token space, prompts, lineage
    """
    import shutil

    from seed_core.llm import IMAGE_TO_TEXT_PROMPT, TEXT_TO_IMAGE_PROMPT

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # PEFT would add the whole resized embedding matrix when it can find the base config; the rows
    # are rebuilt by add_image_tokens (seeded) and only their deltas are trained, so never save it.
    model.save_pretrained(out, save_embedding_layers=False)
    tokenizer.save_pretrained(out / "text_tokenizer")
    base = job["_llm"]
    if job["_base_in_export"]:
        shutil.copytree(job["_llm"], out / "base_model", dirs_exist_ok=True)
        base = "base_model"
    meta = {"kind": "lora_adapter", "base_model": base, "llm": job["llm"], "num_codes": space.num_codes,
            "num_tokens_per_image": space.num_tokens_per_image, "space": dataclasses.asdict(space),
            "prompts": {"image_to_text": IMAGE_TO_TEXT_PROMPT, "text_to_image": TEXT_TO_IMAGE_PROMPT},
            "max_length": job["max_length"], "lora": job["lora"], "tokens": job["_tokens"]}  # fmt: skip
    (out / EXPORT_META).write_text(json.dumps(meta, indent=2, sort_keys=True))


def load_exported(
    directory: str | Path, *, dtype: torch.dtype = torch.float32
) -> tuple[Any, Any, Any]:
    """(PeftModel, extended tokenizer, ImageTokenSpace) from an `export_lora` directory."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from seed_core.llm import ImageTokenSpace, add_image_tokens

    directory = Path(directory)
    meta = json.loads((directory / EXPORT_META).read_text())
    base_ref = (
        directory / meta["base_model"]
        if (directory / meta["base_model"]).is_dir()
        else meta["base_model"]
    )
    tokenizer = AutoTokenizer.from_pretrained(directory / "text_tokenizer")
    base = AutoModelForCausalLM.from_pretrained(base_ref, dtype=dtype)
    # The tokenizer already holds the image tokens; this grows the base's rows exactly as in training.
    space = add_image_tokens(
        tokenizer, base, meta["num_codes"], num_tokens_per_image=meta["num_tokens_per_image"]
    )
    if space != ImageTokenSpace(**meta["space"]):
        raise ValueError(
            f"{directory}: image-token ids differ from the ones the adapter was trained with"
        )
    return PeftModel.from_pretrained(base, directory), tokenizer, space


# ---------------------------------------------------------------------------------------------
# entry point


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="seedpipe train-lora", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--config", help="YAML job config (jobs/configs/*lora*.yaml)")
    parser.add_argument(
        "--address", default=None, help="Ray address (default: RAY_ADDRESS or local)"
    )
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    config = resolve_tokens(cfg.load_config(LoraJobConfig, args.config, args.overrides))
    prepared = prepare_lora(config)
    result = launch(config, job_name=JOB_NAME, job_module="jobs.train_lora", export_kind="lora_adapter",
                    prepared=prepared, address=args.address)  # fmt: skip
    return 0 if result.error is None else 1


if __name__ == "__main__":
    raise SystemExit(main())
