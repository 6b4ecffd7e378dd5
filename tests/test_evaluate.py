"""`seedpipe evaluate`: the metrics and their chance levels, the held-out split, the command on the chain.

Unit tests build the metrics from hand-made worker rows and run `EvalWorker` on a tiny random
tokenizer without Ray; the slow tests run the command on the README chain (`cli_chain`: tiny,
barely trained models), so they assert structure and correctness, not quality.
"""

from __future__ import annotations

import json
import subprocess
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from jobs.eval_data import EvalWorker, keep_split
from jobs.eval_report import compute_metrics, format_table
from jobs.evaluate import EvaluateConfig, split_fraction
from jobs.metrics import Relevance, chance_at_k, dedupe_captions, retrieval_chance
from pipelines.datasets import drop_holdout, is_holdout
from tests.chain import CORPUS, seedpipe_exe, user_env

RETRIEVAL = [
    f"{d}_r{k}_{kind}" for kind in ("embeds", "codes") for d in ("i2t", "t2i") for k in (1, 5, 10)
]
TOKENIZER_METRICS = {*RETRIEVAL, "codebook_usage", "codebook_perplexity", "dead_codes", "recon_cosine",
                     "gen_cosine", "gen_mse"}  # fmt: skip
LLM_METRICS = {"caption_bleu4", "caption_cider", "caption_exact", "t2i_valid_fraction", "t2i_gen_cosine",
               "t2i_r1", "t2i_r5"}  # fmt: skip
CHANCE = {*RETRIEVAL, "t2i_r1", "t2i_r5"}
RECALLS = CHANCE
# pytest-timeout counts fixture setup: the first test to use `cli_chain` also builds it (7 steps, on
# a loaded 2-core machine about 20 minutes)
CHAIN_TIMEOUT_S = 3000


def fake_rows(captions: list[str], *, num_codes: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """EvalWorker-like rows whose continuous image embedding is exactly its caption's text embedding."""
    rng = np.random.default_rng(seed)
    unique, group = dedupe_captions(captions)
    eye = np.eye(8, dtype=np.float32)
    n = len(captions)
    return {
        "key": np.array([f"{i:09d}" for i in range(n)], dtype=object),
        "caption": np.array(captions, dtype=object),
        "codes": rng.integers(0, num_codes, size=(n, 32)),
        "img_embeds": eye[group],
        "img_codes": rng.normal(size=(n, 8)).astype(np.float32),
        "txt": eye[group],
        "recon_cosine": rng.uniform(0, 1, n),
        "gen_cosine": rng.uniform(-1, 1, n),
        "gen_mse": rng.uniform(0, 2, n),
        "target": eye[group] + 0.01 * rng.normal(size=(n, 8)).astype(np.float32),
        "hypothesis": np.array(
            [c if i % 2 else "a blue square" for i, c in enumerate(captions)], dtype=object
        ),
    }


CAPTIONS = [
    "a red circle",
    "a blue square",
    "a red circle",
    "a green star",
    "a pink ring",
    "a blue square",
]


def test_metrics_have_every_named_key_beside_its_chance():
    """compute_metrics gives exactly the issue's metric names; every recall has the chance level of
    this split's caption groups, and a perfect embedding scores 1.0 both ways."""
    rows = fake_rows(CAPTIONS)
    unique = list(dict.fromkeys(CAPTIONS))
    t2i = {"caption": np.array(unique[::-1], dtype=object),  # worker order is not kept
           "gen": np.eye(8, dtype=np.float32)[[unique.index(c) for c in unique[::-1]]],
           "valid": np.array([True, False, True, True])}  # fmt: skip
    metrics, chance = compute_metrics(rows, 16, t2i)
    assert set(metrics) == TOKENIZER_METRICS | LLM_METRICS
    assert set(chance) == CHANCE
    _, group = dedupe_captions(CAPTIONS)
    expected = retrieval_chance(group, np.arange(len(unique)), (1, 5, 10))
    for name in RETRIEVAL:
        assert chance[name] == pytest.approx(expected[name.rsplit("_", 1)[0]])
    for name in RECALLS:
        assert 0.0 <= metrics[name] <= 1.0 and 0.0 < chance[name] <= 1.0
    assert all(metrics[f"{d}_r{k}_embeds"] == 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10))
    assert metrics["t2i_r1"] == 1.0 and metrics["t2i_gen_cosine"] > 0.99
    # row-weighted: "a green star" (1 row) is the invalid generation of the reversed order
    invalid = unique[::-1][1]
    assert metrics["t2i_valid_fraction"] == pytest.approx(
        1 - CAPTIONS.count(invalid) / len(CAPTIONS)
    )
    assert metrics["caption_exact"] == pytest.approx(3 / 6)  # the odd rows repeat their caption
    assert metrics["dead_codes"] == 16 - len(np.unique(rows["codes"]))


def test_an_image_with_several_captions_is_one_query_that_hits_any_of_them():
    """COCO-style rows (one per caption, the same sha256): each image is one query and one
    candidate, its hit is any of its captions, and its generated caption is scored against all of
    them; one row per image would have counted the second image's own caption as a miss."""
    eye = np.eye(4, dtype=np.float32)
    # image "a" has captions 0 and 1, image "b" captions 2 and 3; each image's embedding is its
    # *second* caption's text embedding, and its hypothesis that second caption
    captions = ["a red circle", "a round red shape", "a blue square", "a square in blue"]
    rows = {
        "key": np.array(["k0", "k1", "k2", "k3"], dtype=object),
        "image_id": np.array(["a", "a", "b", "b"], dtype=object),
        "caption": np.array(captions, dtype=object),
        "codes": np.array([[1] * 32, [1] * 32, [2] * 32, [2] * 32]),
        "img_embeds": eye[[1, 1, 3, 3]],
        "img_codes": eye[[1, 1, 3, 3]],
        "txt": eye,
        "recon_cosine": np.ones(4),
        "gen_cosine": np.ones(4),
        "gen_mse": np.zeros(4),
        "hypothesis": np.array([captions[1], captions[1], captions[3], captions[3]], dtype=object),
    }
    metrics, chance = compute_metrics(rows, 16)
    assert metrics["i2t_r1_embeds"] == 1.0 and metrics["i2t_r1_codes"] == 1.0
    # t2i: captions 1 and 3 find their image first; 0 and 2 are orthogonal to both (ties)
    assert chance["i2t_r1_embeds"] == pytest.approx(2 / 4)  # 2 of 4 captions match each image
    assert chance["t2i_r1_embeds"] == pytest.approx(1 / 2)  # each caption matches 1 of 2 images
    assert metrics["caption_exact"] == 1.0
    assert metrics["codebook_usage"] == pytest.approx(2 / 16)
    # the same rows without image ids: four images, two of them missing their only caption
    one_per_row = {k: v for k, v in rows.items() if k != "image_id"}
    assert compute_metrics(one_per_row, 16)[0]["i2t_r1_embeds"] == pytest.approx(2 / 4)


def test_metrics_without_an_llm_have_only_the_tokenizer_rows():
    """Without --lora there are no LLM metrics and no LLM chance levels."""
    rows = {k: v for k, v in fake_rows(CAPTIONS).items() if k not in ("hypothesis", "target")}
    metrics, chance = compute_metrics(rows, 16)
    assert set(metrics) == TOKENIZER_METRICS and set(chance) == set(RETRIEVAL)


def test_table_lists_each_metric_with_chance_and_ratio():
    """The printed table has one line per metric; recalls carry their chance level and the ratio."""
    metrics, chance = compute_metrics(fake_rows(CAPTIONS), 16)
    table = format_table(metrics, chance, "title")
    lines = {
        line.split()[0]: line.split()[1:]
        for line in table.splitlines()[2:]
        if not line.strip().startswith("--")
    }
    assert set(lines) == set(metrics)
    assert len(lines["i2t_r1_embeds"]) == 3 and float(lines["i2t_r1_embeds"][1]) == pytest.approx(
        chance["i2t_r1_embeds"], abs=1e-4
    )
    assert len(lines["codebook_usage"]) == 1


def test_eval_split_is_the_complement_of_the_training_split():
    """keep_split(holdout) keeps exactly the rows the jobs' drop_holdout removes: no key in both."""
    keys = [f"{i:09d}" for i in range(5000)]
    table = pa.table({"key": keys, "x": np.arange(5000)})
    held = set(keep_split(table, 0.1, "holdout").column("key").to_pylist())
    trained = set(drop_holdout(table, 0.1).column("key").to_pylist())
    assert held and not held & trained and held | trained == set(keys)
    assert 0.08 < len(held) / len(keys) < 0.12
    assert keep_split(table, 0.1, "all").num_rows == 5000


def test_split_fraction_is_the_smallest_one_any_model_was_trained_without():
    """The default split is the smallest recorded holdout (held out from every model); an explicit
    larger --holdout warns that it evaluates trained-on rows; nothing recorded -> the jobs' 0.05."""
    config = EvaluateConfig(corpus="c", tokenizer="t")
    assert split_fraction(config, {"a": 0.1, "b": 0.05, "c": None})[0] == 0.05
    with pytest.warns(UserWarning, match="jobs' default"):
        assert split_fraction(config, {"a": None})[0] == 0.05
    with pytest.warns(UserWarning, match="trained on"):
        assert (
            split_fraction(EvaluateConfig(corpus="c", tokenizer="t", holdout=0.2), {"a": 0.1})[0]
            == 0.2
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (
            split_fraction(EvaluateConfig(corpus="c", tokenizer="t", holdout=0.02), {"a": 0.1})[0]
            == 0.02
        )
    with pytest.raises(ValueError, match="split"):
        EvaluateConfig(corpus="c", tokenizer="t", split="train")


def test_eval_worker_without_ray(tmp_path, tiny):
    """EvalWorker maps a features table to per-row codes, ITC features and decoder scores (no Ray)."""
    import torch

    from pipelines.schemas import features_schema, to_fixed_list
    from seed_core.llm import train_caption_tokenizer
    from seed_core.tokenizer import SeedTokenizer

    torch.manual_seed(0)
    SeedTokenizer(tiny.tokenizer).save_pretrained(tmp_path / "tok")
    train_caption_tokenizer(CAPTIONS * 5, vocab_size=300).save_pretrained(tmp_path / "text")
    p, dv, (o,) = tiny.vision.num_tokens, tiny.vision.hidden_size, tiny.target.output_shape
    rng = np.random.default_rng(0)
    n = len(CAPTIONS)
    table = pa.table({"key": [f"{i:09d}" for i in range(n)], "sha256": [""] * n, "caption": CAPTIONS,
                      "patch_features": to_fixed_list(rng.normal(size=(n, p, dv)), pa.float16()),
                      "target_image_embed": to_fixed_list(rng.normal(size=(n, o)), pa.float16())},
                     schema=features_schema(patch_shape=(p, dv), target_kind="clip_image", target_shape=(o,)))  # fmt: skip
    worker = EvalWorker(tokenizer_dir=str(tmp_path / "tok"), text_tokenizer_dir=str(tmp_path / "text"),
                        patch_shape=(p, dv), target_column="target_image_embed", target_shape=(o,),
                        max_text_len=16, keep_target=True, device="cpu")  # fmt: skip
    out = worker(table)
    e = tiny.tokenizer.qformer.embed_dim
    assert out["codes"].shape == (n, 32) and out["codes"].max() < tiny.tokenizer.quantizer.num_codes
    assert out["img_embeds"].shape == out["img_codes"].shape == out["txt"].shape == (n, e)
    assert np.allclose(np.linalg.norm(out["img_embeds"], axis=1), 1, atol=1e-5)
    assert out["target"].shape == (n, o) and np.all(np.abs(out["gen_cosine"]) <= 1 + 1e-6)
    assert list(out["key"]) == table.column("key").to_pylist()


# ---- the command on the README chain ---------------------------------------------------------
def run_config(chain, name: str) -> dict:
    return yaml.safe_load((chain.run_dir(name) / "config.yaml").read_text())


def split_relation(chain, fraction: float) -> tuple[list[str], Relevance, int]:
    """Keys, the image-caption relation (images by sha256, distinct captions) and the
    distinct-caption count of the chain's held-out features rows, built with plain sets."""
    files = sorted((chain.root / "corpora" / CORPUS / "features" / "tiny").glob("*.parquet"))
    table = pa.concat_tables(pq.read_table(f, columns=["key", "sha256", "caption"]) for f in files)
    keep = is_holdout(table.column("key").to_pylist(), fraction)
    rows = [(k, s, c) for k, s, c, m in zip(*(table.column(n).to_pylist() for n in ("key", "sha256", "caption")),
                                           keep, strict=True) if m]  # fmt: skip
    images = sorted({s for _, s, _ in rows})
    captions = sorted({c for _, _, c in rows})
    pairs = sorted({(images.index(s), captions.index(c)) for _, s, c in rows})
    relation = Relevance.from_pairs([i for i, _ in pairs], [t for _, t in pairs],
                                    num_images=len(images), num_texts=len(captions))  # fmt: skip
    return [k for k, _, _ in rows], relation, len(captions)


@pytest.mark.slow
@pytest.mark.timeout(CHAIN_TIMEOUT_S)
def test_evaluate_console_script_writes_every_metric_beside_chance(cli_chain, tmp_path):
    """`seedpipe evaluate --lora ... --json` as a user runs it: exit 0, a printed table, and a JSON with
    every named metric, recalls in [0, 1], chance computed for the held-out split the jobs used,
    and the metrics in an MLflow `evaluate` stage run."""
    from mlflow import MlflowClient

    out = tmp_path / "eval.json"
    proc = subprocess.run([seedpipe_exe(), "evaluate", "--root", "data", "--corpus", CORPUS, "--tokenizer",
                           "models:/seed-tokenizer/1", "--lora", "models:/seed-lora/1", "--json", str(out)],
                          cwd=cli_chain.workdir, env=user_env(), capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout)
    assert (
        "i2t_r1_embeds" in proc.stdout
        and "x chance" in proc.stdout
        and "caption_cider" in proc.stdout
    )
    result = json.loads(out.read_text())
    assert set(result["metrics"]) == TOKENIZER_METRICS | LLM_METRICS
    assert set(result["chance"]) == CHANCE
    for name in RECALLS:
        assert 0.0 <= result["metrics"][name] <= 1.0, name
    trained = {
        run_config(cli_chain, n)["holdout"] for n in ("stage1-chain", "stage2-chain", "lora-chain")
    }
    assert result["split"]["name"] == "holdout" and result["split"]["fraction"] == min(trained)
    keys, relation, num_unique = split_relation(cli_chain, result["split"]["fraction"])
    assert result["split"]["rows"] == len(keys) and result["split"]["captions"] == num_unique
    # the chain's images repeat (same bytes, so the same sha256): each is one candidate
    expected = chance_at_k(relation, (1, 5, 10))
    for name in RETRIEVAL:
        assert result["chance"][name] == pytest.approx(expected[name.rsplit("_", 1)[0]])
    assert result["chance"]["t2i_r1"] == pytest.approx(expected["t2i_r1"])
    runs = MlflowClient(cli_chain.tracking_uri).search_runs(
        [MlflowClient(cli_chain.tracking_uri).get_experiment_by_name("seedpipe").experiment_id],
        filter_string="tags.stage = 'evaluate'",
    )  # fmt: skip
    assert runs, "no evaluate stage run in the catalog's store"
    logged = runs[0].data.metrics
    assert logged["i2t_r1_codes"] == pytest.approx(result["metrics"]["i2t_r1_codes"])
    assert logged["chance/t2i_r5"] == pytest.approx(result["chance"]["t2i_r5"])
    assert sorted(p.name for p in cli_chain.workdir.iterdir()) == ["data"]


@pytest.mark.slow
@pytest.mark.timeout(CHAIN_TIMEOUT_S)
def test_evaluate_split_shares_no_key_with_any_training_split(cli_chain, mlflow_env):
    """The split evaluate resolves for the chain's models holds out the fraction their training runs
    used, and none of its keys is in any model's training rows."""
    from jobs.evaluate import resolve

    inputs = resolve(EvaluateConfig(root=str(cli_chain.root), corpus=CORPUS, tokenizer="models:/seed-tokenizer/1",
                                    lora="models:/seed-lora/1"))  # fmt: skip
    table = pa.concat_tables(pq.read_table(f, columns=["key"]) for f in inputs.files)
    evaluated = set(keep_split(table, inputs.fraction, "holdout").column("key").to_pylist())
    assert evaluated
    for name in ("stage1-chain", "stage2-chain", "lora-chain"):
        holdout = run_config(cli_chain, name)["holdout"]
        trained = set(drop_holdout(table, holdout).column("key").to_pylist())
        assert not evaluated & trained, name


@pytest.mark.slow
@pytest.mark.timeout(CHAIN_TIMEOUT_S)
def test_evaluate_all_rows_without_lora_in_process(
    cli_chain, ray_session, mlflow_env, tmp_path, capsys
):
    """`main([...])` with --split all and no --lora: every row is scored, only tokenizer metrics."""
    from jobs.evaluate import main

    out = tmp_path / "all.json"
    assert main(["--root", str(cli_chain.root), "--corpus", CORPUS, "--tokenizer", "models:/seed-tokenizer/1",
                 "--split", "all", "--json", str(out), "--batch-size", "16"]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    assert set(result["metrics"]) == TOKENIZER_METRICS and set(result["chance"]) == set(RETRIEVAL)
    rows = sum(
        pq.read_metadata(f).num_rows
        for f in (cli_chain.root / "corpora" / CORPUS / "features" / "tiny").glob("*.parquet")
    )
    assert result["split"]["rows"] == rows and result["split"]["fraction"] is None
    assert 0 < result["metrics"]["codebook_usage"] <= 1 and "all rows" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.timeout(CHAIN_TIMEOUT_S)
@pytest.mark.parametrize(("argv", "message"), [
    (["--tokenizer", "models:/no-such-tokenizer/1"], "models:/no-such-tokenizer/1: not found in the tracking store"),
    (["--tokenizer", "models:/seed-tokenizer-stage1/1"], "not a SeedTokenizer export"),
    (["--tokenizer", "models:/seed-tokenizer/1", "--features", "nope"], "nope"),
], ids=["unknown-model", "stage1-as-tokenizer", "unknown-features"])  # fmt: skip
def test_evaluate_mistakes_exit_2_with_one_line(cli_chain, mlflow_env, capsys, argv, message):
    """An unknown model, the wrong kind of model or a missing feature set: exit 2, one `error:` line."""
    from jobs.evaluate import main

    assert main(["--root", str(cli_chain.root), "--corpus", CORPUS, *argv]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err and "Traceback" not in err, err


def test_collected_rows_do_not_depend_on_the_order_the_actors_finish_in():
    """The driver's rows come out sorted by key whichever batch an actor returned first, so the
    metrics' sums run in one order (two demo runs with identical models differed in gen_mse's last
    bits before)."""
    from jobs.eval_data import _collect

    class Finished:
        def __init__(self, batches):
            self.batches = batches

        def iter_batches(self, **_):
            return iter(self.batches)

    first = {"key": np.array(["b", "d"], dtype=object), "x": np.array([1.0, 3.0])}
    second = {"key": np.array(["a", "c"], dtype=object), "x": np.array([0.0, 2.0])}
    rows = [
        _collect(Finished(order), sort_by="key") for order in ([first, second], [second, first])
    ]
    for collected in rows:
        assert collected["key"].tolist() == ["a", "b", "c", "d"]
        assert collected["x"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert _collect(Finished([]), sort_by="key") == {}
