"""Unit tests of the LoRA job (jobs.lora.LoraJob) without Ray: prepare on a tmp catalog, collate, task, evaluate, export."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file

from jobs.config import CONFIG_DIR
from jobs.job import RunContext, run_location
from jobs.lora import LoraJob, LoraJobConfig, i2t_rows, resolve_tokens
from jobs.lora_export import EXPORT_META, build_tiny_llm, load_exported
from pipelines.catalog import Catalog, DoneRecord
from pipelines.config import load_config, to_yaml
from pipelines.datasets import is_holdout
from pipelines.schemas import to_fixed_list, tokens_schema

pytestmark = pytest.mark.timeout(120)
CORPUS = "demo"
TOKENS = "seed-tokenizer@0123456789ab"
DIGEST = "0123456789ab" + "f" * 52
NUM_CODES = 128
CAPTIONS = ["a red square", "a green square", "a blue square", "a yellow square on a table"]


def write_tokens(root, name: str = TOKENS, *, rows_per_shard: int = 24, shards: int = 2,
                 num_codes: int | None = NUM_CODES, informative: bool = False) -> Catalog:  # fmt: skip
    """A committed tokens dataset (tokens_schema, tiny codebook) in a tmp catalog; its schema
    metadata records `num_codes` as the tokens stage writes it (None: not recorded).
    `informative`: a caption's codes are its own fixed 32 codes with a quarter of them resampled
    (learnable both ways); else every code is random."""
    catalog = Catalog(root)
    directory = catalog.stage_dir(CORPUS, "tokens", name)
    catalog.fs.create_dir(directory, recursive=True)
    meta = {"tokenizer_id": name, "tokenizer_digest": DIGEST}
    if num_codes is not None:
        meta["num_codes"] = num_codes
    schema = tokens_schema(meta=meta)
    rng = np.random.default_rng(0)
    codes_of_caption = rng.integers(0, NUM_CODES, (len(CAPTIONS), 32))
    for s in range(shards):
        n = rows_per_shard
        keys = [f"{s:05d}{i:04d}" for i in range(n)]
        table = pa.table(
            {
                "key": keys,
                "sha256": [f"{k}-sha" for k in keys],
                "caption": [CAPTIONS[(s * n + i) % len(CAPTIONS)] for i in range(n)],
                "codes": to_fixed_list(
                    _codes(rng, codes_of_caption, s * n, n, informative), pa.int16()
                ),
            },
            schema=schema,
        )
        pq.write_table(table, f"{directory}/{s:05d}.parquet")
        catalog.commit(directory, DoneRecord(shard=f"{s:05d}", stage="tokens", digest=f"d{s}",
                                             files=[f"{s:05d}.parquet"], rows=n))  # fmt: skip
    return catalog


def _codes(rng, codes_of_caption, first: int, n: int, informative: bool) -> np.ndarray:
    codes = rng.integers(0, NUM_CODES, (n, 32))
    if informative:
        own = codes_of_caption[[(first + i) % len(CAPTIONS) for i in range(n)]]
        codes = np.where(rng.random((n, 32)) < 0.75, own, codes)
    return codes


def tiny_config(root, *overrides: str) -> LoraJobConfig:
    """The tiny YAML on the tmp catalog, with `tokens` given as `<corpus>@<name>` (not resolved)."""
    return load_config(
        LoraJobConfig,
        CONFIG_DIR / "tiny_lora.yaml",
        [f"root={root}", f"tokens={CORPUS}@{TOKENS}", "corpus=elsewhere", *overrides],
    )


def context(config: LoraJobConfig) -> RunContext:
    """What jobs.launch hands rank 0 of 1 (no tracking: the parts never log)."""
    name, storage = run_location(config, LoraJob.name)
    return RunContext(run_name=name, storage_path=storage, tracking_uri="", code_version="test",
                      resolved_yaml=to_yaml(config))  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """(resolved config, Prepared) of the tiny YAML on a 48-row tokens dataset in a tmp catalog."""
    root = tmp_path_factory.mktemp("lora")
    write_tokens(root)
    config = LoraJob().resolve(tiny_config(root))
    return config, LoraJob().prepare(config)


@pytest.fixture
def parts(env):
    """Fresh JobParts (rank 0 of 1) built from the tiny config and its prepared inputs."""
    config, prepared = env
    return LoraJob().build(config, prepared.inputs, context(config))


def rows(prepared, n: int = 4) -> pa.Table:
    return pq.read_table(prepared.train_files[0]).slice(0, n)


def test_prepare_resolves_tokens_and_reuses_run_artifacts(env):
    """corpus@name sugar picks the corpus; the tokenizer, tiny LLM, shapes and lineage are resolved once."""
    config, prepared = env
    inputs = prepared.inputs
    assert (config.corpus, config.tokens) == (CORPUS, TOKENS)
    assert (inputs.num_codes, inputs.num_tokens) == (NUM_CODES, 32)
    assert inputs.tokens.tokenizer_digest == DIGEST and len(prepared.train_files) == 2
    assert inputs.train_files == prepared.train_files
    assert inputs.llm.endswith("tiny_llm") and inputs.text_tokenizer.endswith("text_tokenizer")
    (lineage,) = prepared.input_datasets
    assert lineage.name == f"{CORPUS}/tokens/{TOKENS}" and lineage.rows == 48
    assert lineage.context == "training" and inputs.tokens.digest == lineage.digest
    before = {p: p.stat().st_mtime_ns for p in Path(inputs.llm).iterdir()}
    again = LoraJob().prepare(config)
    assert again.inputs == inputs
    assert {p: p.stat().st_mtime_ns for p in before} == before  # a restart reuses, never retrains


def test_resolve_defaults_to_the_corpus_only_tokens_dataset(env, monkeypatch):
    """An empty `tokens` resolves to the corpus's only tokens dataset, and fails naming the key in a corpus with none."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # no registry: the only-dataset rule
    root = env[0].root
    assert resolve_tokens(tiny_config(root, "tokens=''", f"corpus={CORPUS}")).tokens == TOKENS
    with pytest.raises(ValueError, match="tokens: corpus 'elsewhere' has no tokens datasets"):
        resolve_tokens(tiny_config(root, "tokens=''"))


def test_prepare_refuses_missing_or_inconsistent_inputs(env):
    """An unknown dataset, too short a max_length and a bad i2t_fraction each fail by name."""
    root = env[0].root
    with pytest.raises(ValueError, match=f"available: {re.escape(TOKENS)}"):
        LoraJob().prepare(resolve_tokens(tiny_config(root, "tokens=nope", f"corpus={CORPUS}")))
    with pytest.raises(ValueError, match="max_length=20 cannot hold"):
        LoraJob().prepare(resolve_tokens(tiny_config(root, "max_length=20")))
    with pytest.raises(ValueError, match="i2t_fraction"):
        tiny_config(root, "i2t_fraction=1.5")
    with pytest.raises(ValueError, match="num_codes must be >= 0"):
        tiny_config(root, "num_codes=-1")


def test_num_codes_comes_from_the_tokens_schema_metadata(tmp_path):
    """With num_codes=0 the codebook size is the tokens schema's `num_codes`; an explicit value
    that disagrees with it, or that the codes exceed, is refused; without the metadata it is required."""
    write_tokens(tmp_path / "recorded", shards=1)
    config = resolve_tokens(tiny_config(tmp_path / "recorded", "num_codes=0"))
    assert LoraJob().prepare(config).inputs.num_codes == NUM_CODES
    with pytest.raises(
        ValueError,
        match=f"num_codes=256 but the tokenizer that made {re.escape(TOKENS)} has {NUM_CODES}",
    ):
        LoraJob().prepare(resolve_tokens(tiny_config(tmp_path / "recorded", "num_codes=256")))

    write_tokens(tmp_path / "unrecorded", shards=1, num_codes=None)
    with pytest.raises(ValueError, match="does not record its codebook size; set num_codes"):
        LoraJob().prepare(resolve_tokens(tiny_config(tmp_path / "unrecorded", "num_codes=0")))
    with pytest.raises(ValueError, match="num_codes=16: codes in .* span"):
        LoraJob().prepare(resolve_tokens(tiny_config(tmp_path / "unrecorded", "num_codes=16")))
    explicit = resolve_tokens(tiny_config(tmp_path / "unrecorded", f"num_codes={NUM_CODES}"))
    assert LoraJob().prepare(explicit).inputs.num_codes == NUM_CODES


def test_i2t_rows_mix_is_exact_and_deterministic():
    """round(f*B) rows are image-to-text, at least one per direction when 0<f<1, the same every call."""
    keys = [f"{i:09d}" for i in range(8)]
    mix = i2t_rows(keys, 0.5, seed=0)
    assert mix.sum() == 4 and np.array_equal(mix, i2t_rows(keys, 0.5, seed=0))
    assert not np.array_equal(mix, i2t_rows(keys, 0.5, seed=1))
    assert i2t_rows(keys[:4], 0.1, seed=0).sum() == 1
    assert i2t_rows(keys[:4], 0.9, seed=0).sum() == 3
    assert i2t_rows(keys, 0.0, seed=0).sum() == 0
    assert i2t_rows(keys, 1.0, seed=0).all()


def test_collate_shapes_and_directions(env, parts):
    """The collate pads to max_length and builds half i2t rows (caption targets), half t2i rows (33 image targets)."""
    config, prepared = env
    space = parts.task.space
    batch = parts.collate(rows(prepared))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "i2t"}
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].shape == (4, config.max_length) and batch[key].dtype == torch.long
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
    both = type(parts.collate)("both")(rows(prepared))
    assert (
        both["input_ids"].shape == (8, config.max_length)
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
    """evaluate gives held-out losses, caption exact match/BLEU-4/CIDEr-D and image validity in range."""
    metrics = parts.evaluate(parts.task)
    assert set(metrics) == {"loss", "loss_i2t", "loss_t2i", "caption_exact", "caption_bleu4", "caption_cider",
                            "t2i_valid", "t2i_valid_unconstrained", "t2i_code_acc", "rows"}  # fmt: skip
    assert metrics["rows"] > 0 and metrics["t2i_valid"] == 1.0
    for key in ("caption_exact", "caption_bleu4", "t2i_valid_unconstrained", "t2i_code_acc"):
        assert 0.0 <= metrics[key] <= 1.0
    assert 0.0 <= metrics["caption_cider"] <= 10.0  # CIDEr-D is x10


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
            EXPORT_META} <= names  # fmt: skip
    keys = load_file(tmp_path / "export" / "adapter_model.safetensors").keys()
    assert all("lora_" in k or "trainable_tokens_delta" in k for k in keys)  # no embedding copy
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    parts.task.eval()
    expected = parts.task.model(**inputs).logits
    model, tokenizer, space = load_exported(tmp_path / "export")
    model.eval()
    assert space == parts.task.space and len(tokenizer) == space.image_end_id + 1
    assert torch.equal(model(**inputs).logits, expected)


DEMO_LORA = [
    f"lora.{k}={v}"
    for k, v in yaml.safe_load((CONFIG_DIR / "demo_lora.yaml").read_text())["lora"].items()
]
"""The LoRA settings of demo_lora.yaml, as overrides."""


@pytest.mark.slow
def test_lora_on_the_tiny_llm_learns_to_caption_and_to_draw(tmp_path):
    """On codes that determine the caption, a plain AdamW loop over the job's parts brings the
    held-out image-to-text loss far below ln(V) and captions exactly; text-to-image codes beat
    chance. Guards the tiny OPT's init: with OPT's default N(0, 0.02) tied embeddings no text
    logit could exceed ~0.6 and the caption loss sat near ln(V) whatever LoRA learned."""
    write_tokens(tmp_path, rows_per_shard=96, informative=True)
    config = LoraJob().resolve(tiny_config(tmp_path, "holdout=0.2", "eval_rows=32", *DEMO_LORA))
    prepared = LoraJob().prepare(config)
    parts = LoraJob().build(config, prepared.inputs, context(config))
    table = pa.concat_tables(pq.read_table(f) for f in prepared.train_files)
    table = table.filter(pa.array(~is_holdout(table.column("key").to_pylist(), config.holdout)))
    params = [p for p in parts.task.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    rng = np.random.default_rng(0)
    parts.task.train()
    for _ in range(150):
        batch = parts.collate(table.take(rng.choice(table.num_rows, 16, replace=False)))
        optimizer.zero_grad()
        parts.task(batch).loss.backward()
        optimizer.step()
    parts.task.eval()
    with torch.no_grad():
        metrics = parts.evaluate(parts.task)
    vocab = config.train_vocab_size
    report = ", ".join(f"{k}={v:.3g}" for k, v in metrics.items())
    assert metrics["loss_i2t"] < 0.2 * np.log(vocab), report
    assert metrics["caption_exact"] > 0.5, report  # 4 captions: chance 0.25
    assert metrics["t2i_code_acc"] > 0.3, report  # a random code is right 1/128 of the time


def test_memoized_encoder_gives_the_tokenizers_examples_and_encodes_each_text_once():
    """The collate's MemoizedEncoder builds exactly the examples the tokenizer builds (both
    directions, repeated and empty captions, truncation), encodes each distinct text once, and
    hands out lists a caller may change without changing the cache."""
    from jobs.lora import MemoizedEncoder
    from seed_core import llm

    tokenizer = llm.train_caption_tokenizer(CAPTIONS, vocab_size=300)
    model = build_tiny_llm(len(tokenizer), max_positions=128, tokenizer=tokenizer, seed=0)
    space = llm.add_image_tokens(tokenizer, model, 16)
    calls: list[str] = []
    encode = tokenizer.encode

    def counting(text, **kwargs):
        calls.append(text)
        return encode(text, **kwargs)

    encoder = MemoizedEncoder(tokenizer)
    tokenizer.encode = counting
    codes = torch.randint(0, 16, (32,), generator=torch.Generator().manual_seed(0))
    captions = [*CAPTIONS, CAPTIONS[0], "", CAPTIONS[3]]
    for build in (llm.build_image_to_text_example, llm.build_text_to_image_example):
        tokenizer.encode = encode
        full = len(build(codes, CAPTIONS[3], tokenizer, space)["input_ids"])
        for caption in captions:
            for max_length in (None, full - 2):  # full - 2: the longest caption is cut
                tokenizer.encode = encode
                want = build(codes, caption, tokenizer, space, max_length=max_length)
                tokenizer.encode = counting
                assert build(codes, caption, encoder, space, max_length=max_length) == want
    assert len(calls) == len(set(calls)), f"encoded again: {calls}"
    first = encoder.encode(CAPTIONS[1], add_special_tokens=False)
    first.append(-1)
    assert encoder.encode(CAPTIONS[1], add_special_tokens=False) == encode(
        CAPTIONS[1], add_special_tokens=False
    )
    assert encoder.eos_token_id == tokenizer.eos_token_id
