"""Derived stages end to end on a local Ray: features, qembeds, tokens; incremental behaviour; bad input."""

from __future__ import annotations

import io
import time

import mlflow
import pyarrow.parquet as pq
import pytest
import torch

from pipelines import features, qembeds, tokens
from pipelines.catalog import Catalog
from pipelines.schemas import schema_meta, schema_shapes
from seed_core.presets import tiny
from seed_core.tokenizer import SeedTokenizer
from tests.raw_fixture import jpeg, make_raw_corpus, write_raw_shard

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
CORPUS = "demo"


def read_rows(catalog: Catalog, directory: str) -> list[dict]:
    rows = []
    for path in catalog.committed_files(directory):
        with catalog.fs.open_input_file(path) as f:
            rows += pq.read_table(f).to_pylist()
    return rows


def mtimes(directory) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(directory.glob("*.parquet"))}


@pytest.fixture
def corpus(tmp_path, ray_session, mlflow_env):
    """A 2-shard raw corpus (4 images each) and its tiny features."""
    root = tmp_path / "data"
    catalog = Catalog(root)
    make_raw_corpus(catalog, CORPUS, num_shards=2, per_shard=4)
    assert (
        features.main(
            ["--root", str(root), "--corpus", CORPUS, "--encoder", "tiny", "--batch-size", "3"]
        )
        == 0
    )
    return root, catalog


def save_tokenizer(path, seed=0):
    torch.manual_seed(seed)
    tok = SeedTokenizer(tiny().tokenizer).eval()
    tok.save_pretrained(path)
    return tok


def test_features_artifacts_and_lineage(corpus):
    """features writes one committed parquet per raw shard with the schema, shapes, all keys, and an MLflow run."""
    root, catalog = corpus
    out = catalog.stage_dir(CORPUS, "features", "tiny")
    records = catalog.committed(out)
    assert sorted(records) == ["00000", "00001"] and all(r.rows == 4 for r in records.values())
    with catalog.fs.open_input_file(catalog.committed_files(out)[0]) as f:
        schema = pq.read_schema(f)
    assert schema_shapes(schema) == {"patch_features": (17, 32), "target_image_embed": (16,)}
    assert (
        schema_meta(schema)["vision_random_init"] == "true"
    )  # the random init is recorded, not hidden
    rows = read_rows(catalog, out)
    assert sorted(r["key"] for r in rows) == sorted(
        f"{s:05d}{i:04d}" for s in range(2) for i in range(4)
    )
    assert all(len(r["patch_features"]) == 17 * 32 and r["caption"].startswith("a ") for r in rows)
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    runs = mlflow.search_runs(
        experiment_names=["seedpipe"], filter_string="tags.stage = 'features'", output_format="list"
    )
    assert len(runs) == 1
    inputs = {d.dataset.name: d for d in runs[0].inputs.dataset_inputs}
    assert set(inputs) == {f"{CORPUS}/raw", f"{CORPUS}/features/tiny"}
    assert runs[0].data.metrics["rows_out"] == 8
    assert runs[0].data.params["vision.image_size"] == "32"


def test_rerun_is_a_fast_noop_and_dry_run_writes_nothing(corpus, capsys):
    """Re-running a finished stage builds nothing (no new run, files untouched); --dry-run only prints."""
    root, catalog = corpus
    out_dir = root / "corpora" / CORPUS / "features" / "tiny"
    before = mtimes(out_dir)
    start = time.monotonic()
    result = features.run(features.FeaturesConfig(root=str(root), corpus=CORPUS, encoder="tiny"))
    assert time.monotonic() - start < 10
    assert result.plan.to_build == [] and len(result.plan.up_to_date) == 2
    assert mtimes(out_dir) == before
    make_raw_corpus(catalog, CORPUS, num_shards=1, per_shard=4, start=2)
    capsys.readouterr()
    assert (
        features.main(["--root", str(root), "--corpus", CORPUS, "--encoder", "tiny", "--dry-run"])
        == 0
    )
    assert "1 to build, 2 up to date, 0 stale, 0 orphaned" in capsys.readouterr().out
    assert sorted(catalog.committed(str(out_dir))) == ["00000", "00001"]
    assert not list(out_dir.glob("00002*"))


def test_new_raw_shards_build_only_those_downstream(corpus, tmp_path):
    """A new raw shard makes features, qembeds and tokens build that shard only."""
    root, catalog = corpus
    tok = save_tokenizer(tmp_path / "tok")
    tok.qformer.save_pretrained(tmp_path / "qf")
    assert (
        tokens.main(
            [
                "--root",
                str(root),
                "--corpus",
                CORPUS,
                "--features",
                "tiny",
                "--tokenizer",
                str(tmp_path / "tok"),
            ]
        )
        == 0
    )
    assert (
        qembeds.main(
            [
                "--root",
                str(root),
                "--corpus",
                CORPUS,
                "--features",
                "tiny",
                "--stage1",
                str(tmp_path / "qf"),
            ]
        )
        == 0
    )
    dirs = {
        s: next((root / "corpora" / CORPUS / s).iterdir())
        for s in ("features", "tokens", "qembeds")
    }
    before = {s: mtimes(d) for s, d in dirs.items()}
    make_raw_corpus(catalog, CORPUS, num_shards=1, per_shard=4, start=2)
    assert features.run(
        features.FeaturesConfig(root=str(root), corpus=CORPUS, encoder="tiny")
    ).plan.to_build == ["00002"]
    assert tokens.run(
        tokens.TokensConfig(
            root=str(root), corpus=CORPUS, features="tiny", tokenizer=str(tmp_path / "tok")
        )
    ).plan.to_build == ["00002"]
    assert qembeds.run(
        qembeds.QEmbedsConfig(
            root=str(root), corpus=CORPUS, features="tiny", stage1=str(tmp_path / "qf")
        )
    ).plan.to_build == ["00002"]
    for stage, d in dirs.items():
        now = mtimes(d)
        assert {k: v for k, v in now.items() if k in before[stage]} == before[stage], stage
        assert "00002.parquet" in now
    codes = read_rows(catalog, str(dirs["tokens"]))
    assert len(codes) == 12 and all(
        len(r["codes"]) == 32 and min(r["codes"]) >= 0 and max(r["codes"]) < 128 for r in codes
    )
    q = read_rows(catalog, str(dirs["qembeds"]))
    assert (
        len(q) == 12
        and len(q[0]["causal_embeds"]) == 32 * 32
        and len(q[0]["target_image_embed"]) == 16
    )


def test_new_tokenizer_uses_cached_features_without_the_vision_encoder(
    corpus, tmp_path, monkeypatch
):
    """A second tokenizer is a new tokens dataset built from cached features; the vision encoder is never built.

    The raw tars are deleted first, so nothing could re-encode images; the worker is also run
    in-process with load_vision_encoder patched to fail.
    """
    root, catalog = corpus
    for tar in (root / "corpora" / CORPUS / "raw").glob("*.tar"):
        tar.unlink()
    save_tokenizer(tmp_path / "tok_a", seed=0)
    save_tokenizer(tmp_path / "tok_b", seed=1)
    a = tokens.run(
        tokens.TokensConfig(
            root=str(root), corpus=CORPUS, features="tiny", tokenizer=str(tmp_path / "tok_a")
        )
    )
    b = tokens.run(
        tokens.TokensConfig(
            root=str(root), corpus=CORPUS, features="tiny", tokenizer=str(tmp_path / "tok_b")
        )
    )
    assert a.ok and b.ok and a.output_dir != b.output_dir and a.rows_out == b.rows_out == 8

    import seed_core.encoders

    def forbidden(*args, **kwargs):
        raise AssertionError("the tokens stage constructed the vision encoder")

    monkeypatch.setattr(seed_core.encoders, "load_vision_encoder", forbidden)
    monkeypatch.setattr(seed_core.encoders.VisionEncoder, "forward", forbidden)
    plan, tasks = tokens.plan_stage(catalog, input_dir=catalog.stage_dir(CORPUS, "features", "tiny"),
                                    output_dir=str(tmp_path / "direct" / "tokens" / "x"), config_digest="c", model_digest="m")  # fmt: skip
    shapes = schema_shapes(
        tokens.read_features_schema(catalog, catalog.stage_dir(CORPUS, "features", "tiny"))
    )
    worker = tokens.TokensShardWorker(root=str(root), tokenizer_dir=str(tmp_path / "tok_a"),
                                      patch_shape=list(shapes["patch_features"]), tokenizer_id="x", batch_size=4)  # fmt: skip
    assert worker.build(tasks[0]) == (4, {})


def test_changed_raw_shard_rebuilds_only_its_downstream(corpus):
    """A raw shard re-downloaded with different content makes its features stale and rebuilt; the other is untouched."""
    root, catalog = corpus
    out_dir = root / "corpora" / CORPUS / "features" / "tiny"
    before = mtimes(out_dir)
    old = read_rows(catalog, str(out_dir))
    write_raw_shard(
        catalog,
        CORPUS,
        1,
        [(f"00001{i:04d}", jpeg((i * 40, 10, 200)), f"shade {i}") for i in range(4)],
    )
    result = features.run(features.FeaturesConfig(root=str(root), corpus=CORPUS, encoder="tiny"))
    assert result.plan.stale == ["00001"] and result.plan.up_to_date == ["00000"]
    after = mtimes(out_dir)
    assert after["00000.parquet"] == before["00000.parquet"]
    new = {r["key"]: r for r in read_rows(catalog, str(out_dir))}
    assert new["000010000"]["caption"] == "shade 0"
    assert (
        new["000000000"]["patch_features"]
        == next(r for r in old if r["key"] == "000000000")["patch_features"]
    )


def test_bad_images_are_counted_and_the_rest_kept(tmp_path, ray_session, mlflow_env):
    """Undecodable bytes and a decompression bomb in a shard are counted by cause; valid images are all kept."""
    from PIL import Image

    catalog = Catalog(tmp_path / "d")
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")  # ~400 M pixels: over PIL's bomb limit
    samples = [("000000000", jpeg((200, 0, 0)), "a red square"), ("000000001", b"this is not an image", "text"),
               ("000000002", jpeg((0, 0, 200))[:200], "truncated"), ("000000003", bomb.getvalue(), "bomb"),
               ("000000004", jpeg((0, 200, 0)), "")]  # fmt: skip
    write_raw_shard(catalog, CORPUS, 0, samples)
    result = features.run(
        features.FeaturesConfig(root=str(tmp_path / "d"), corpus=CORPUS, encoder="tiny")
    )
    assert result.ok
    assert result.failures == {"decode_error": 2, "image_too_large": 1}
    keys = sorted(
        r["key"] for r in read_rows(catalog, catalog.stage_dir(CORPUS, "features", "tiny"))
    )
    assert keys == ["000000000", "000000004"]
    assert (
        catalog.committed(catalog.stage_dir(CORPUS, "features", "tiny"))["00000"].failures
        == result.failures
    )


def test_corrupt_tar_fails_only_its_shard(tmp_path, ray_session, mlflow_env, capsys):
    """A corrupt raw tar fails that shard (non-zero exit, named in the summary); the others complete."""
    root = tmp_path / "d"
    catalog = Catalog(root)
    make_raw_corpus(catalog, CORPUS, num_shards=2, per_shard=3)
    tar_path = root / "corpora" / CORPUS / "raw" / "00001.tar"
    tar_path.write_bytes(tar_path.read_bytes()[:700] + b"\x00garbage" * 50)
    assert features.main(["--root", str(root), "--corpus", CORPUS, "--encoder", "tiny"]) == 1
    out = capsys.readouterr().out
    assert "FAILED shard 00001" in out
    committed = catalog.committed(catalog.stage_dir(CORPUS, "features", "tiny"))
    assert sorted(committed) == ["00000"]
    assert not list((root / "corpora" / CORPUS / "features" / "tiny").glob("00001*"))


def test_corrupt_features_parquet_fails_only_its_tokens_shard(corpus, tmp_path):
    """A corrupt committed features shard fails that tokens shard only, reported; the other is built."""
    root, catalog = corpus
    (root / "corpora" / CORPUS / "features" / "tiny" / "00000.parquet").write_bytes(
        b"PAR1 not really parquet"
    )
    save_tokenizer(tmp_path / "tok")
    result = tokens.run(
        tokens.TokensConfig(
            root=str(root), corpus=CORPUS, features="tiny", tokenizer=str(tmp_path / "tok")
        )
    )
    assert list(result.failed_shards) == ["00000"] and result.rows_out == 4
    assert sorted(catalog.committed(result.output_dir)) == ["00001"]
