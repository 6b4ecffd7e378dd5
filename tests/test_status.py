"""`seedpipe status` on the session's chain, and on copies of it with a raw shard appended or replaced."""

from __future__ import annotations

import json

import pytest

from jobs.status import main as status_main
from pipelines.catalog import Catalog
from tests.lineage_helpers import copy_chain, seedpipe
from tests.raw_fixture import COLORS, jpeg, make_raw_corpus, write_raw_shard

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


def _status(root, capsys) -> dict:
    assert status_main(["--root", str(root), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _by_stage(result: dict) -> dict[str, dict]:
    (corpus,) = result["corpora"]
    return {d["name"].split("/")[0]: d for d in corpus["datasets"]}


def test_status_of_the_chain_is_up_to_date(cli_chain):
    """The console script lists raw, features, qembeds and tokens with digest, shards, rows, bytes
    and what made them, every derived dataset up to date, and the registered tokenizer applied."""
    proc = seedpipe(["status", "--root", "data"], cli_chain.workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert text.startswith("corpus chain\n")
    for prefix in (
        "raw ",
        "features/tiny ",
        "qembeds/seed-tokenizer-stage1-v1@",
        "tokens/seed-tokenizer-v1@",
    ):
        assert any(line.strip().startswith(prefix) and "3 shards" in line and "96 rows" in line
                   for line in text.splitlines()), (prefix, text)  # fmt: skip
    assert text.count("up to date") == 4, text
    assert "vision random-init" in text and "tokenizer models:/seed-tokenizer/1" in text
    assert "URL list" in text and "96 rows, 0 failed, 3 shards" in text


def test_status_after_appending_a_raw_shard_shows_stale_shards_per_stage(
    cli_chain, tmp_path, capsys
):
    """A new raw shard is 1 missing in features and 1 after upstream in qembeds and tokens; a raw
    shard replaced with other images makes that shard stale in features and pending downstream;
    the registered tokenizer's plan says tokenize has that much to do."""
    root = copy_chain(cli_chain.root, tmp_path)
    make_raw_corpus(Catalog(root), "chain", num_shards=1, per_shard=4, start=3)
    stages = _by_stage(_status(root, capsys))
    assert stages["raw"]["shards"] == 4
    assert stages["features"]["missing"] == ["00003"] and stages["features"]["stale"] == []
    for stage in ("qembeds", "tokens"):
        assert stages[stage]["missing"] == [] and stages[stage]["after_upstream"] == ["00003"]
        assert stages[stage]["input"] == "features/tiny"

    write_raw_shard(Catalog(root), "chain", 1, [("000010000", jpeg(COLORS["red"]), "a red square")])
    result = _status(root, capsys)
    stages = _by_stage(result)
    assert stages["features"]["stale"] == ["00001"] and stages["features"]["to_build"] == [
        "00001",
        "00003",
    ]
    assert stages["tokens"]["after_upstream"] == ["00001", "00003"]
    # Other tests of the session may register more tokenizers on the chain (the reseed run's
    # `seed-tokenizer-reseed`); the chain's own one is the one this asserts on.
    plans = {p["tokenizer"]: p for p in result["tokenizers"]}
    plan = plans["models:/seed-tokenizer/1"]
    assert plan["to_build"] == 0 and plan["after_upstream"] == 2, plans

    assert status_main(["--root", str(root)]) == 0
    text = capsys.readouterr().out
    assert "from raw: 2 to build: missing 1 (00003); stale 1 (00001)" in text, text
    assert "from features/tiny: 2 to build: after upstream 2 (00001, 00003)" in text, text


def test_unknown_corpus_is_a_clear_error(cli_chain, capsys):
    """--corpus that the catalog does not have: one error line naming the corpora, exit 2."""
    assert status_main(["--root", str(cli_chain.root), "--corpus", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: corpus 'nope' is not in the catalog") and "chain" in err
    proc = seedpipe(["status", "--root", "empty-root"], cli_chain.workdir)
    assert proc.returncode == 2 and "error: no corpora" in proc.stderr
