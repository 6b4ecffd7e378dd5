"""`seedpipe lineage` on the chain the suite builds once (tests/chain.py), and the MLflow tags it relies on."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from jobs.lineage import main as lineage_main
from tests.lineage_helpers import copy_chain, seedpipe, tracking_client

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

MODELS = ("models:/seed-tokenizer-stage1/1", "models:/seed-tokenizer/1", "models:/seed-lora/1")


def _nodes(tree: dict) -> list[dict]:
    return [tree, *(n for c in tree["children"] for n in _nodes(c))]


def _chain_digests(chain) -> dict[str, str]:
    """Every digest on the chain, read from the catalog and the registry (not from lineage)."""
    from pipelines.catalog import Catalog
    from pipelines.datasets import dataset_name, dataset_ref

    catalog = Catalog(chain.root)
    corpus = catalog.corpus_dir("chain")
    folders = [f"{corpus}/raw"] + [str(p) for stage in ("features", "qembeds", "tokens")
                                   for p in sorted((chain.root / "corpora/chain" / stage).iterdir())]  # fmt: skip
    digests = {dataset_name(catalog, f): dataset_ref(catalog, f, "x").digest for f in folders}
    client = tracking_client(chain.root)
    for uri in MODELS:
        name, version = uri.removeprefix("models:/").split("/")
        digests[uri] = client.get_model_version(name, version).tags["digest"]
    with open(chain.url_list, "rb") as f:
        digests["url list"] = hashlib.file_digest(f, "sha256").hexdigest()
    return digests


def test_lineage_from_lora_reaches_the_url_list_naming_every_digest(cli_chain):
    """The console script's tree from models:/seed-lora/1 goes back to the URL list and names every
    dataset, model and URL-list digest of the chain, each node with a run id and status."""
    proc = seedpipe(["lineage", "models:/seed-lora/1", "--root", "data"], cli_chain.workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    for what, digest in _chain_digests(cli_chain).items():
        assert digest[:12] in text, f"{what} digest {digest[:12]} missing from:\n{text}"
    assert f"URL list {cli_chain.url_list}" in text
    assert "encoder tiny (vision: random init" in text
    lines = text.splitlines()
    assert all(
        re.search(r"[0-9a-f]{32} (finished|failed|running|killed)", line) for line in lines
    ), text
    order = [next(i for i, line in enumerate(lines) if key in line) for key in
             ("model models:/seed-lora/1", "dataset chain/tokens/", "model models:/seed-tokenizer/1",
              "(stage2 on chain", "dataset chain/qembeds/", "model models:/seed-tokenizer-stage1/1",
              "(stage1 on chain", "dataset chain/features/tiny", "dataset chain/raw", "URL list")]  # fmt: skip
    assert order == sorted(order), text


def test_lineage_answers_the_same_without_the_catalog(cli_chain, tmp_path, capsys):
    """With only mlflow.db left (no corpora, runs or artifacts), --json gives the same tree."""
    full = tmp_path / "full"
    bare = copy_chain(cli_chain.root, tmp_path / "bare", corpora=False)
    assert sorted(p.name for p in bare.iterdir()) == ["mlflow.db"]
    trees = []
    for root in (cli_chain.root, bare):
        assert lineage_main(["models:/seed-lora/1", "--root", str(root), "--json"]) == 0
        trees.append(json.loads(capsys.readouterr().out))
    assert trees[0] == trees[1]
    kinds = {n["kind"] for n in _nodes(trees[0][0])}
    assert kinds == {"model", "run", "dataset", "url_list"}
    assert not full.exists()


def test_check_flags_a_shard_changed_after_the_fact(cli_chain, tmp_path):
    """--check passes on an intact copy; after one byte of a features shard changes (same size, so
    only its hash tells), it names that shard under the features node and exits 1."""
    root = copy_chain(cli_chain.root, tmp_path)
    ok = seedpipe(["lineage", "models:/seed-lora/1", "--root", "data", "--check"], tmp_path)
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    assert "check: every digest matches the catalog" in ok.stdout
    assert "[check: ok]" in ok.stdout and "DATA CHANGED" not in ok.stdout

    shard = root / "corpora/chain/features/tiny/00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = seedpipe(["lineage", "models:/seed-lora/1", "--root", "data", "--check"], tmp_path)
    assert bad.returncode == 1, bad.stdout[-3000:] + bad.stderr[-3000:]
    lines = bad.stdout.splitlines()
    flagged = [line for line in lines if "DATA CHANGED" in line]
    assert len(flagged) == 1 and "dataset chain/features/tiny" in flagged[0], bad.stdout
    below = lines[lines.index(flagged[0]) + 1]
    assert "! shard 00001:" in below and "changed since it was committed" in below, bad.stdout
    assert "check: 1 node(s) whose data no longer matches" in bad.stdout


def test_downstream_from_the_tokenizer_lists_its_tokens_and_lora(cli_chain, capsys):
    """--downstream from the tokenizer: the tokens stage run, the tokens dataset it wrote, the LoRA
    run trained on it and the LoRA version registered from that run."""
    assert (
        lineage_main(
            ["--downstream", "models:/seed-tokenizer/1", "--root", str(cli_chain.root), "--json"]
        )
        == 0
    )
    (tree,) = json.loads(capsys.readouterr().out)
    nodes = _nodes(tree)
    labels = [(n["kind"], n["label"]) for n in nodes]
    assert labels[0] == ("model", "models:/seed-tokenizer/1")
    assert any(
        k == "dataset" and lab.startswith("chain/tokens/seed-tokenizer-v1@") for k, lab in labels
    )
    assert ("model", "models:/seed-lora/1") in labels
    stages = {n["stage"] for n in nodes if n["kind"] == "run"}
    assert {"tokens", "lora"} <= stages and not stages & {"stage1", "ingest", "features"}
    assert lineage_main(["--downstream", "chain/tokens/" + next(lab.split("/")[-1] for k, lab in labels if k == "dataset"),
                         "--root", str(cli_chain.root)]) == 0  # fmt: skip
    assert "model models:/seed-lora/1" in capsys.readouterr().out


@pytest.mark.parametrize("ref", ["0" * 32, "models:/no-such-model/1", "models:/seed-lora/99",
                                 "models:/seed-lora@nope", "chain/features/nope", "chain/features/tiny@ffffff"])  # fmt: skip
def test_unknown_references_are_a_clear_error(cli_chain, capsys, ref):
    """A run id, model, version, alias or dataset that the store does not have: one error line, exit 2."""
    assert lineage_main([ref, "--root", str(cli_chain.root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


def test_unknown_run_through_the_console_script(cli_chain):
    """The console script says what was not found, without a traceback, exit 2."""
    proc = seedpipe(["lineage", "f" * 32, "--root", "data"], cli_chain.workdir)
    assert proc.returncode == 2
    assert "error: run ffff" in proc.stderr and "Traceback" not in proc.stderr


def test_runs_carry_the_tags_that_make_mlflow_comparison_useful(cli_chain):
    """Run names say what a run is; stage/corpus/preset/digest tags are set; model versions carry
    their lineage as a one-paragraph description."""
    client = tracking_client(cli_chain.root)
    experiment = client.get_experiment_by_name("seedpipe")
    runs = {r.data.tags["stage"]: r for r in client.search_runs([experiment.experiment_id])}
    features_digest = runs["features"].data.tags["features_digest"]
    assert re.fullmatch(r"stage1-chain-[0-9a-f]{8}", runs["stage1"].info.run_name)
    assert runs["stage1"].data.tags["preset"] == "tiny"
    assert runs["stage1"].data.tags["features_digest"] == features_digest
    assert runs["stage2"].data.tags["stage1_digest"] == runs["qembeds"].data.tags["stage1_digest"]
    tokens = runs["tokens"]
    assert tokens.info.run_name.startswith("tokens-chain-seed-tokenizer-v1@")
    assert tokens.data.tags["features_digest"] == features_digest
    tokenizer = client.get_model_version("seed-tokenizer", "1")
    assert tokens.data.tags["tokenizer_digest"] == tokenizer.tags["digest"]
    assert runs["lora"].data.tags["tokenizer_digest"] == tokenizer.tags["digest"]
    for uri in MODELS:
        name, version = uri.removeprefix("models:/").split("/")
        description = client.get_model_version(name, version).description
        assert description.startswith("Lineage: run ") and "URL list" in description, description
