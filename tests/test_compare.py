"""`seedpipe compare` of two stage-1 runs that differ only in optim.lr, on a copy of the session's chain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from jobs.compare import direction, split_runs
from jobs.compare import main as compare_main
from tests.lineage_helpers import copy_chain, seedpipe, tracking_client

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


@pytest.fixture(scope="module")
def two_stage1_runs(cli_chain, tmp_path_factory):
    """(workdir, root, [run ids]): the chain's stage-1 run and a second one with optim.lr=0.002,
    trained on a copy of the chain (same `--root data`, so only the lr and the run name differ),
    plus an evaluate-shaped run of the first run's model (what `seedpipe evaluate` logs)."""
    workdir = tmp_path_factory.mktemp("compare")
    root = copy_chain(cli_chain.root, workdir)
    client = tracking_client(root)
    experiment = client.get_experiment_by_name("seedpipe")
    # other modules train more stage-1 runs on the session's chain (a killed one, an outage one):
    # in this copy only the chain's own run stays active, whichever modules ran before
    chain_run = (cli_chain.run_dir("stage1-chain") / "mlflow_run_id").read_text().strip()
    for other in client.search_runs([experiment.experiment_id], "tags.stage = 'stage1'"):
        if other.info.run_id != chain_run:
            client.delete_run(other.info.run_id)
    proc = seedpipe(["train-tokenizer", "--stage", "1", "--config", "tiny_stage1", "--root", "data", "--corpus", "chain",
                     "run.name=lr2", "optim.lr=0.002", "register_as=seed-tokenizer-stage1-lr2"], workdir, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = client.search_runs(
        [experiment.experiment_id], "tags.stage = 'stage1'", order_by=["attributes.start_time ASC"]
    )
    assert len(runs) == 2 and runs[0].info.run_id == chain_run
    _log_evaluation(root, client.get_model_version("seed-tokenizer-stage1", "1"))
    return workdir, root, [r.info.run_id for r in runs]


def _log_evaluation(root: Path, version) -> None:
    """A stage run shaped like `seedpipe evaluate`'s: the model as input, retrieval metrics."""
    from pipelines.catalog import Catalog
    from pipelines.tracking import stage_run
    from pipelines.tracking.run_tags import tag_version_evaluation

    with stage_run(
        Catalog(root), stage="evaluate", corpus="chain", config={"tokenizer": "x"}
    ) as run:
        run.log_dataset(name="model:models:/seed-tokenizer-stage1/1", digest=version.tags["digest"],
                        uri=root.as_uri(), context="tokenizer")  # fmt: skip
        metrics = {"i2t_r1_codes": 0.25, "codebook_usage": 0.5, "eval_rows": 10.0}
        run.log_metrics(metrics | {"chance/i2t_r1_codes": 0.1}, step=0)
        tag_version_evaluation(run.tracker.tracking_uri, version, metrics, "chain/holdout")


def test_compare_prints_only_the_differing_param_and_writes_a_png(two_stage1_runs, tmp_path):
    """The console script's table lists optim.lr as the one differing param (the run name as a
    bookkeeping setting), the same inputs, final/best metrics, and writes a PNG that opens and a
    Markdown table."""
    workdir, _, run_ids = two_stage1_runs
    out = tmp_path / "cmp"
    proc = seedpipe(["compare", *run_ids, "--root", "data", "--out", str(out)], workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    lines = text.splitlines()
    section = lines.index(next(line for line in lines if line.startswith("params that differ")))
    assert lines[section].startswith("params that differ (1 of "), text
    assert lines[section + 1].split() == ["optim.lr", "0.001", "0.002"], text
    assert lines[section + 2].startswith("settings that differ"), text
    assert "inputs: the same" in text and "chain/features/tiny" in text
    assert any(line.split()[:1] == ["loss"] and line.count("/") == 2 for line in lines), text
    with Image.open(out / "compare.png") as image:
        image.verify()
    with Image.open(out / "compare.png") as image:
        assert image.size[0] > 400 and image.size[1] > 200
    markdown = (out / "compare.md").read_text()
    assert (
        "| optim.lr | `0.001` | `0.002` |" in markdown
        and "![metric curves](compare.png)" in markdown
    )


def test_compare_by_stage_and_json(two_stage1_runs, tmp_path, capsys):
    """--stage stage1 --last 2 selects the same two runs; --json has the rows, the evaluate results
    of the first run's registered model, and the bookkeeping settings apart from the params."""
    _, root, run_ids = two_stage1_runs
    assert (
        compare_main(
            [
                "--stage",
                "stage1",
                "--last",
                "2",
                "--root",
                str(root),
                "--out",
                str(tmp_path),
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert [r["run_id"] for r in result["runs"]] == run_ids
    assert list(result["params_differ"]) == ["optim.lr"]
    assert "run.name" in result["settings_differ"] and "register_as" in result["settings_differ"]
    assert result["inputs_differ"] is False
    assert result["evaluations"]["i2t_r1_codes"] == [0.25, None]
    assert "chance/i2t_r1_codes" not in result["evaluations"]
    assert result["evaluated"][0].startswith("models:/seed-tokenizer-stage1/1 (evaluate run ")
    loss = result["metrics"]["loss"]
    assert all(x["best"] <= x["final"] for x in loss)
    assert Path(result["png"]).is_file()


def test_compare_accepts_model_uris_and_rejects_unknown_runs(two_stage1_runs, tmp_path, capsys):
    """A models:/ URI stands for the run that trained it; an unknown run or model is one error line, exit 2."""
    _, root, run_ids = two_stage1_runs
    args = ["--root", str(root), "--out", str(tmp_path), "--json"]
    assert (
        compare_main(
            ["models:/seed-tokenizer-stage1/1", "models:/seed-tokenizer-stage1-lr2/1", *args]
        )
        == 0
    )
    assert [r["run_id"] for r in json.loads(capsys.readouterr().out)["runs"]] == run_ids
    for bad in (["0" * 32, run_ids[0]], ["models:/nope/1", run_ids[0]], [run_ids[0]]):
        assert compare_main([*bad, *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


def test_model_versions_carry_their_evaluation_summary(two_stage1_runs, capsys):
    """The evaluation summary is version tags (eval.<metric>, eval.split), shown by lineage."""
    from jobs.lineage import main as lineage_main

    _, root, _ = two_stage1_runs
    tags = tracking_client(root).get_model_version("seed-tokenizer-stage1", "1").tags
    assert {k: v for k, v in tags.items() if k.startswith("eval.")} == {
        "eval.i2t_r1_codes": "0.25", "eval.codebook_usage": "0.5", "eval.split": "chain/holdout"}  # fmt: skip
    assert lineage_main(["models:/seed-tokenizer-stage1/1", "--root", str(root)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "evaluate: codebook_usage 0.5, i2t_r1_codes 0.25, split chain/holdout" in first, first


def test_unknown_run_through_the_console_script(cli_chain):
    proc = seedpipe(["compare", "a" * 32, "b" * 32, "--root", "data"], cli_chain.workdir)
    assert (
        proc.returncode == 2 and "error: run aaaa" in proc.stderr and "Traceback" not in proc.stderr
    )


def test_metric_directions_and_run_words():
    """Losses are minimised, recalls/usage maximised, rates have no best; RUN words are told from flag values."""
    assert [direction(k) for k in ("loss", "eval/loss", "gen_mse", "dead_codes", "eval/i2t_r1",
                                   "codebook_usage", "recon_cosine", "lr", "samples_per_s")] == [
        "min", "min", "min", "min", "max", "max", "max", None, None]  # fmt: skip
    assert split_runs(["r1", "--root", "data", "--json", "r2", "--out=x", "k.v=1", "models:/m/1"]) == (
        ["r1", "r2", "models:/m/1"], ["--root", "data", "--json", "--out=x", "k.v=1"])  # fmt: skip
