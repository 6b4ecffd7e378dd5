"""Unit tests of jobs.train_lora without Ray: prepare on a tmp catalog, collate, task, evaluate, export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from jobs import config as cfg
from jobs import train_lora
from jobs.config import CONFIG_DIR
from pipelines.catalog import Catalog, DoneRecord
from pipelines.schemas import to_fixed_list, tokens_schema

pytestmark = pytest.mark.timeout(120)
CORPUS = "demo"
TOKENS = "seed-tokenizer@0123456789ab"
DIGEST = "0123456789ab" + "f" * 52
NUM_CODES = 128
CAPTIONS = ["a red square", "a green square", "a blue square", "a yellow square on a table"]


def write_tokens(root, name: str = TOKENS, *, rows_per_shard: int = 24, shards: int = 2) -> Catalog:
    """A committed tokens dataset (tokens_schema, tiny codebook) in a tmp catalog."""
    catalog = Catalog(root)
    directory = catalog.stage_dir(CORPUS, "tokens", name)
    catalog.fs.create_dir(directory, recursive=True)
    schema = tokens_schema(meta={"tokenizer_id": name, "tokenizer_digest": DIGEST})
    rng = np.random.default_rng(0)
    for s in range(shards):
        n = rows_per_shard
        keys = [f"{s:05d}{i:04d}" for i in range(n)]
        table = pa.table(
            {
                "key": keys,
                "sha256": [f"{k}-sha" for k in keys],
                "caption": [CAPTIONS[(s * n + i) % len(CAPTIONS)] for i in range(n)],
                "codes": to_fixed_list(rng.integers(0, NUM_CODES, (n, 32)), pa.int16()),
            },
            schema=schema,
        )
        pq.write_table(table, f"{directory}/{s:05d}.parquet")
        catalog.commit(directory, DoneRecord(shard=f"{s:05d}", stage="tokens", digest=f"d{s}",
                                             files=[f"{s:05d}.parquet"], rows=n))  # fmt: skip
    return catalog


def tiny_config(root, *overrides: str) -> train_lora.LoraJobConfig:
    return cfg.load_config(
        train_lora.LoraJobConfig,
        CONFIG_DIR / "tiny_lora.yaml",
        [f"root={root}", f"tokens={CORPUS}@{TOKENS}", "corpus=elsewhere", *overrides],
    )


def job_dict(config, prepared) -> dict:
    """What jobs.launch hands the workers (minus the launch-only keys)."""
    config = train_lora.resolve_tokens(config)
    return cfg.to_dict(config) | prepared.extra


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """(config, job dict) of the tiny YAML on a 48-row tokens dataset in a tmp catalog."""
    root = tmp_path_factory.mktemp("lora")
    write_tokens(root)
    config = tiny_config(root)
    prepared = train_lora.prepare_lora(train_lora.resolve_tokens(config))
    return config, job_dict(config, prepared)


@pytest.fixture
def parts(env):
    """Fresh JobParts (rank 0 of 1) from the tiny job dict."""
    return train_lora.build_parts(env[1], rank=0, world=1)


def rows(job, n: int = 4) -> pa.Table:
    return pq.read_table(job["_train_files"][0]).slice(0, n)


def test_prepare_resolves_tokens_and_reuses_run_artifacts(env):
    """corpus@name sugar picks the corpus; the tokenizer, tiny LLM, shapes and lineage are resolved once."""
    config, job = env
    assert (job["corpus"], job["tokens"]) == (CORPUS, TOKENS)
    assert (job["_num_codes"], job["_num_tokens"]) == (NUM_CODES, 32)
    assert job["_tokens"]["tokenizer_digest"] == DIGEST and len(job["_train_files"]) == 2
    assert job["_llm"].endswith("tiny_llm") and job["_text_tokenizer"].endswith("text_tokenizer")
    (lineage,) = train_lora.prepare_lora(train_lora.resolve_tokens(config)).input_datasets
    assert lineage["name"] == f"{CORPUS}/tokens/{TOKENS}" and lineage["rows"] == 48
    before = {p: p.stat().st_mtime_ns for p in Path(job["_llm"]).iterdir()}
    again = train_lora.prepare_lora(train_lora.resolve_tokens(config))
    assert again.extra["_llm"] == job["_llm"]
    assert {p: p.stat().st_mtime_ns for p in before} == before  # a restart reuses, never retrains


def test_prepare_refuses_missing_or_inconsistent_inputs(env, tmp_path):
    """Empty tokens, an unknown dataset, an unknown codebook size and out-of-range codes each fail by name."""
    root = env[1]["root"]
    with pytest.raises(ValueError, match="tokens is required"):
        train_lora.prepare_lora(tiny_config(root, "tokens=''"))
    with pytest.raises(ValueError, match=f"available: \\['{TOKENS}'\\]"):
        train_lora.prepare_lora(tiny_config(root, "tokens=nope", f"corpus={CORPUS}"))
    with pytest.raises(ValueError, match="num_codes"):
        train_lora.prepare_lora(train_lora.resolve_tokens(tiny_config(root, "num_codes=0")))
    with pytest.raises(ValueError, match="codes in .* span"):
        train_lora.prepare_lora(train_lora.resolve_tokens(tiny_config(root, "num_codes=16")))
    with pytest.raises(ValueError, match="i2t_fraction"):
        tiny_config(root, "i2t_fraction=1.5")


def test_num_codes_comes_from_the_tokens_runs_tokenizer(tmp_path, monkeypatch):
    """With num_codes=0 the codebook size is read from the tokenizer logged by the tokens stage's MLflow run."""
    from pipelines.lineage import stage_run
    from seed_core.presets import tiny
    from seed_core.tokenizer import SeedTokenizer

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    catalog = write_tokens(tmp_path / "root", shards=1)
    torch.manual_seed(0)
    SeedTokenizer(tiny().tokenizer).save_pretrained(tmp_path / "tok")
    params = {"tokenizer": str(tmp_path / "tok"), "tokenizer_digest": DIGEST}
    with stage_run(catalog, stage="tokens", corpus=CORPUS, config=params):
        pass
    assert train_lora.tokenizer_num_codes(catalog, DIGEST) == (NUM_CODES, str(tmp_path / "tok"))
    assert train_lora.tokenizer_num_codes(catalog, "0" * 64) is None


def test_i2t_rows_mix_is_exact_and_deterministic():
    """round(f*B) rows are image-to-text, at least one per direction when 0<f<1, the same every call."""
    keys = [f"{i:09d}" for i in range(8)]
    mix = train_lora.i2t_rows(keys, 0.5, seed=0)
    assert mix.sum() == 4 and np.array_equal(mix, train_lora.i2t_rows(keys, 0.5, seed=0))
    assert not np.array_equal(mix, train_lora.i2t_rows(keys, 0.5, seed=1))
    assert train_lora.i2t_rows(keys[:4], 0.1, seed=0).sum() == 1
    assert train_lora.i2t_rows(keys[:4], 0.9, seed=0).sum() == 3
    assert train_lora.i2t_rows(keys, 0.0, seed=0).sum() == 0
    assert train_lora.i2t_rows(keys, 1.0, seed=0).all()


def test_collate_shapes_and_directions(env, parts):
    """The collate pads to max_length and builds half i2t rows (caption targets), half t2i rows (33 image targets)."""
    job = env[1]
    space = parts.task.space
    batch = parts.collate(rows(job))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "i2t"}
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].shape == (4, job["max_length"]) and batch[key].dtype == torch.long
    assert batch["i2t"].sum() == 2
    for ids, labels, i2t in zip(batch["input_ids"], batch["labels"], batch["i2t"], strict=True):
        target = ids[labels != -100]
        if i2t:  # caption + eos, all after </img>
            first_target = int((labels != -100).nonzero()[0])
            assert not space.is_code_id(target).any()
            assert int((ids == space.image_end_id).nonzero()[0]) < first_target
        else:  # 32 codes + </img>
            assert len(target) == 33 and space.is_code_id(target[:32]).all()
            assert target[-1] == space.image_end_id
    both = type(parts.collate)("both")(rows(job))
    assert (
        both["input_ids"].shape == (8, job["max_length"])
        and both["i2t"].tolist() == [True] * 4 + [False] * 4
    )


def test_forward_backward_trains_only_lora_and_image_rows(env, parts):
    """One forward/backward gives finite per-direction losses, the model's own loss, and gradients only on LoRA and image-token rows."""
    batch = parts.collate(rows(env[1]))
    out = parts.task(batch)
    assert set(out.terms) == {"loss_i2t", "loss_t2i"}
    assert all(torch.isfinite(t) for t in [out.loss, *out.terms.values()])
    model_loss = parts.task.model(**{k: v for k, v in batch.items() if k != "i2t"}).loss
    assert torch.allclose(out.loss, model_loss, atol=1e-5)
    out.loss.backward()
    grads = {n for n, p in parts.task.named_parameters() if p.grad is not None}
    trainable = {n for n, p in parts.task.named_parameters() if p.requires_grad}
    assert grads == trainable and grads
    assert all("lora_" in n or "trainable_tokens_delta" in n for n in grads)
    (delta,) = [p for n, p in parts.task.named_parameters() if "trainable_tokens_delta" in n]
    assert delta.shape[0] == NUM_CODES + 2 and delta.grad.abs().sum() > 0


def test_evaluate_returns_the_metric_keys(parts):
    """evaluate gives held-out losses, caption exact-match/BLEU-4 and image validity in range."""
    metrics = parts.evaluate(parts.task)
    assert set(metrics) == {"loss", "loss_i2t", "loss_t2i", "caption_exact_match", "caption_bleu4",
                            "t2i_valid", "t2i_valid_unconstrained", "t2i_code_acc", "rows"}  # fmt: skip
    assert metrics["rows"] > 0 and metrics["t2i_valid"] == 1.0
    for key in ("caption_exact_match", "caption_bleu4", "t2i_valid_unconstrained", "t2i_code_acc"):
        assert 0.0 <= metrics[key] <= 1.0


def test_export_writes_an_adapter_that_reloads(env, parts, tmp_path):
    """A trained adapter exported with the extended tokenizer reloads onto a fresh base with identical logits."""
    batch = parts.collate(rows(env[1]))
    params = [p for p in parts.task.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(2):  # LoRA B starts at zero: two steps move both A and B
        optimizer.zero_grad()
        parts.task(batch).loss.backward()
        optimizer.step()
    parts.export(parts.task, tmp_path / "export")
    names = {p.name for p in (tmp_path / "export").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "text_tokenizer", "base_model",
            train_lora.EXPORT_META} <= names  # fmt: skip
    keys = load_file(tmp_path / "export" / "adapter_model.safetensors").keys()
    assert all("lora_" in k or "trainable_tokens_delta" in k for k in keys)  # no embedding copy
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    parts.task.eval()
    expected = parts.task.model(**inputs).logits
    model, tokenizer, space = train_lora.load_exported(tmp_path / "export")
    model.eval()
    assert space == parts.task.space and len(tokenizer) == space.image_end_id + 1
    assert torch.equal(model(**inputs).logits, expected)


def test_corpus_bleu4_matches_hand_computed_values():
    """BLEU-4 is 1 for identical text, 0 without a 4-gram match, and applies the brevity penalty."""
    assert train_lora.corpus_bleu4(["a red square on a table"], ["a red square on a table"]) == 1.0
    assert train_lora.corpus_bleu4(["a red square"], ["a blue circle"]) == 0.0
    short = train_lora.corpus_bleu4(["a red square on a"], ["a red square on a table"])
    assert short == pytest.approx(np.exp(1 - 6 / 5))
