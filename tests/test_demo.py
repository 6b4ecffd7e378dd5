"""`seedpipe demo` end to end and its reuse: a CI-sized run (the tiny job configs, a few hundred
images) through `jobs.demo.main`, in a fresh working folder with MLFLOW_TRACKING_URI unset.

What this guards is the demo's plumbing: eight steps that each did their work, every metric the
issue names in the results, a second run on the same root that builds nothing, skips every job
and reuses the evaluation, and nothing written outside the demo root. That the tokenizer learns
(held-out retrieval from its codes well above chance) is guarded in seconds, without Ray, by
`tests/test_learning.py`; what the full demo reaches is measured by `benchmarks/bench_demo.py`.
"""

from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.slow

ARGV = ["--root", "demo", "--num-images", "240", "--samples-per-shard", "120",
        "--stage1-config", "tiny_stage1", "--stage2-config", "tiny_stage2", "--lora-config", "tiny_lora"]  # fmt: skip
METRICS = ("i2t_r1_embeds", "i2t_r5_embeds", "i2t_r10_embeds", "t2i_r1_embeds", "i2t_r1_codes",
           "t2i_r1_codes", "t2i_r10_codes", "codebook_usage", "codebook_perplexity", "recon_cosine",
           "gen_cosine", "gen_mse", "caption_bleu4", "caption_cider", "caption_exact",
           "t2i_valid_fraction", "t2i_gen_cosine", "t2i_r1", "t2i_r5")  # fmt: skip


def run(argv: list[str]) -> dict:
    from jobs.demo import main

    assert main(argv) == 0
    return json.loads(open("demo/demo/summary.json").read())


@pytest.mark.timeout(1200)
def test_demo_runs_every_step_and_a_rerun_reuses_everything(tmp_path, monkeypatch, ray_session):
    """Every step does its work and every named metric is reported beside its chance level; a
    second run builds nothing, skips every job, reuses the evaluation, takes a fraction of the
    time, and nothing lands outside the demo root."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = run(ARGV)

    assert [s["status"] for s in first["steps"]] == ["built", "built", "trained", "built", "trained",
                                                     "built", "trained", "measured"], first["steps"]  # fmt: skip
    metrics, chance, split = first["metrics"], first["chance"], first["split"]
    assert set(METRICS) <= set(metrics), sorted(metrics)
    assert {"i2t_r1_codes", "t2i_r1_codes", "t2i_r1"} <= set(chance)
    assert 0 < split["rows"] < 240 and 0 < metrics["codebook_usage"] <= 1
    stage2 = next(s for s in first["steps"] if s["name"] == "stage2")["info"]
    assert stage2["loss_last"] < stage2["loss_first"], stage2
    assert first["models"]["lora"] == "models:/seed-lora/1"

    second = run(ARGV)
    assert [s["status"] for s in second["steps"]] == [
        "up to date", "up to date", "skipped", "up to date", "skipped", "up to date", "skipped", "reused"
    ], second["steps"]  # fmt: skip
    assert second["models"] == first["models"]
    assert second["metrics"] == first["metrics"]
    assert second["seconds"] < first["seconds"] / 2, (second["seconds"], first["seconds"])

    assert sorted(os.listdir(work)) == ["demo"], "something was written outside the demo root"
    assert (work / "demo" / "mlflow.db").is_file()
