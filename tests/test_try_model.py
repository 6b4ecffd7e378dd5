"""`seedpipe caption` and `seedpipe generate` on the README chain's models (tiny, barely trained:
these tests assert what the commands print and write, not that the captions are good)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.synthetic import make_images
from tests.chain import CORPUS, seedpipe_exe, user_env

# the timeout counts fixture setup: the first test to use `cli_chain` also builds it
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3000)]


def seedpipe(chain, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([seedpipe_exe(), *argv], cwd=chain.workdir, env=user_env(), capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def image_files(tmp_path, n: int) -> list[str]:
    paths = []
    for name, data, _ in make_images(n, seed=7):
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    return paths


def corpus_captions(chain) -> set[str]:
    files = (chain.root / "corpora" / CORPUS / "features" / "tiny").glob("*.parquet")
    return {
        c
        for f in files
        for c in pq.read_table(f, columns=["caption"]).column("caption").to_pylist()
    }


def test_caption_console_script_prints_one_caption_per_image(cli_chain, tmp_path):
    """`seedpipe caption A B C --lora models:/seed-lora/1`: exit 0 and exactly one `PATH: caption`
    line per image on stdout, in order (the tokenizer defaults to the one the LoRA was trained on)."""
    paths = image_files(tmp_path, 3)
    proc = seedpipe(cli_chain, "caption", *paths, "--root", "data", "--lora", "models:/seed-lora/1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == len(paths), proc.stdout
    for path, line in zip(paths, lines, strict=True):
        assert line.startswith(f"{path}: "), line
    assert "models: tokenizer models:/seed-tokenizer/1" in proc.stderr
    assert sorted(p.name for p in cli_chain.workdir.iterdir()) == ["data"]


def test_caption_takes_local_directories_and_checks_the_encoder(
    cli_chain, mlflow_env, tmp_path, capsys
):
    """Export directories work like models:/ URIs; an encoder that did not make the tokenizer's
    feature set is refused (exit 2) before any caption is printed."""
    from jobs.try_model import caption_main
    from pipelines.catalog import Catalog
    from pipelines.models import resolve_model

    catalog = Catalog(cli_chain.root)
    lora = resolve_model("models:/seed-lora/1", catalog).directory
    tokenizer = resolve_model("models:/seed-tokenizer/1", catalog).directory
    paths = image_files(tmp_path, 2)
    common = ["--root", str(cli_chain.root), "--lora", lora, "--tokenizer", tokenizer]
    assert caption_main([*paths, *common]) == 0
    out = capsys.readouterr()
    assert [line.split(": ", 1)[0] for line in out.out.splitlines()] == paths
    assert caption_main([*paths, *common, "--encoder", "small"]) == 2
    err = capsys.readouterr()
    assert "is not the one that made" in err.err and err.out == ""


def test_generate_console_script_writes_a_contact_sheet(cli_chain, tmp_path):
    """`seedpipe generate "a red circle"`: exit 0, 32 codes, the nearest corpus captions printed, and
    a PNG contact sheet that opens."""
    out = tmp_path / "gen"
    proc = seedpipe(cli_chain, "generate", "a red circle", "--root", "data", "--lora", "models:/seed-lora/1",
                    "--out", str(out), "--num-images", "4")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    assert "-> 32 codes" in proc.stdout and "not rendered" in proc.stdout
    record = json.loads((out / "a-red-circle.json").read_text())
    assert len(record["codes"]) == 32 and len(record["nearest"]) == 4
    assert {r["caption"] for r in record["nearest"]} <= corpus_captions(cli_chain)
    for rank, row in enumerate(record["nearest"], 1):
        assert (
            f"{rank:2d}. {row['cosine']:.3f}  {row['caption']}  (key {row['key']})" in proc.stdout
        )
    with Image.open(out / "a-red-circle.png") as img:
        img.verify()
    with Image.open(out / "a-red-circle.png") as img:
        assert img.format == "PNG" and img.size[0] > 100


def test_nearest_rows_finds_a_row_from_its_own_target(cli_chain):
    """A query equal to a corpus row's target embedding finds that row first, at cosine 1."""
    from jobs.try_model import nearest_rows, raw_images
    from pipelines.catalog import Catalog
    from pipelines.schemas import from_fixed_list

    catalog = Catalog(cli_chain.root)
    first = sorted((cli_chain.root / "corpora" / CORPUS / "features" / "tiny").glob("*.parquet"))[0]
    table = pq.read_table(first, columns=["key", "target_image_embed"]).slice(3, 1)
    query = from_fixed_list(table.column("target_image_embed"), (-1,)).astype(np.float32)
    (rows,) = nearest_rows(catalog, CORPUS, "tiny", query, 5)
    assert len(rows) == 5 and rows[0]["cosine"] == pytest.approx(1.0, abs=1e-3)
    assert table.column("key")[0].as_py() in {r["key"] for r in rows if r["cosine"] > 0.999}
    assert [r["cosine"] for r in rows] == sorted((r["cosine"] for r in rows), reverse=True)
    images = raw_images(catalog, CORPUS, rows)
    assert set(images) == {r["key"] for r in rows}


@pytest.mark.parametrize("command", ["caption", "generate"])
def test_unknown_model_exits_2_with_a_clear_message(
    cli_chain, mlflow_env, tmp_path, capsys, command
):
    """A models:/ reference the catalog does not have: exit 2, one `error:` line naming it."""
    from jobs.try_model import caption_main, generate_main

    main = caption_main if command == "caption" else generate_main
    first = image_files(tmp_path, 1) if command == "caption" else ["a red circle"]
    assert main([*first, "--root", str(cli_chain.root), "--lora", "models:/no-such-lora/3"]) == 2
    err = capsys.readouterr().err
    assert (
        "error: models:/no-such-lora/3: not found in the tracking store" in err
        and "Traceback" not in err
    )
