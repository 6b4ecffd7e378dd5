"""The training jobs end to end, asserted on the chain the README's commands built (tests/chain.py).

One corpus flowed through the whole chain as a user runs it (the `seedpipe` console script from a
fresh folder, MLFLOW_TRACKING_URI unset): ingest -> features -> stage 1 -> qembeds -> stage 2 ->
tokenize -> LoRA, on a local Ray with 2 gloo workers and DeepSpeed ZeRO-2 (tiny preset). Each
test asserts one job's artifacts: loss going down, DeepSpeed checkpoints with the resolved config,
the exported model loading, and the MLflow run (params, metrics, inputs with digests, registered
model version, plots).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from jobs import train_tokenizer
from jobs.config import CONFIG_DIR
from pipelines.catalog import Catalog
from pipelines.models import resolve_model
from seed_core.qformer import CausalQFormer
from seed_core.tokenizer import SeedTokenizer
from tests.chain import CORPUS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


@pytest.fixture(scope="module")
def root(cli_chain):
    return cli_chain.root


def client_for(root: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{root}/mlflow.db")


def job_run(client: MlflowClient, run_dir: Path):
    return client.get_run((run_dir / "mlflow_run_id").read_text().strip())


def steps(client: MlflowClient, run_id: str, key: str) -> Counter:
    return Counter(m.step for m in client.get_metric_history(run_id, key))


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec["metrics"]:
            out[rec["step"]] = rec["metrics"]["loss"]
    return out


def assert_checkpoint(run_dir: Path, step: int) -> None:
    """Ray Train's merged checkpoint holds every rank's DeepSpeed state, the config and the trainer state."""
    ckpt = run_dir / f"step{step:08d}"
    names = {p.name for p in (ckpt / f"step{step:08d}").iterdir()}
    assert "mp_rank_00_model_states.pt" in names
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= names
    assert (ckpt / "config.yaml").is_file() and {"rng_rank0.pt", "rng_rank1.pt"} <= {
        p.name for p in ckpt.iterdir()
    }
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == step


def test_stage1_trains_checkpoints_exports_and_registers(root):
    """Stage 1: ITC loss goes down, checkpoints at 5/10/12, the Q-Former exports, loads, and is registered."""
    run_dir = root / "runs" / f"stage1-{CORPUS}"
    assert (
        run_dir / "text_tokenizer" / "tokenizer.json"
    ).is_file()  # trained once, in the run folder
    curve = losses(run_dir)
    assert sorted(curve) == list(range(1, 13))
    assert sum(curve[s] for s in (10, 11, 12)) < sum(curve[s] for s in (1, 2, 3))
    assert_checkpoint(run_dir, 12)
    qformer = CausalQFormer.from_pretrained(run_dir / "export").eval()
    assert qformer(torch.randn(2, 17, 32)).shape == (2, 32, 32)

    client = client_for(root)
    run = job_run(client, run_dir)
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["preset"] == "tiny"
    assert {"loss", "itc", "lr", "eval/i2t_r1", "eval/t2i_r5"} <= set(run.data.metrics)
    assert steps(client, run.info.run_id, "loss") == Counter(range(1, 13))
    inputs = {d.dataset.name: d.dataset for d in run.inputs.dataset_inputs}
    assert inputs[f"{CORPUS}/features/tiny"].digest
    version = client.get_model_version("seed-tokenizer-stage1", "1")
    assert version.run_id == run.info.run_id and version.tags["digest"] == qformer.digest
    # the export says what it was trained on: the default feature set of qembeds and tokenize
    assert json.loads((run_dir / "export" / "lineage.json").read_text())["features"] == "tiny"
    assert "loss_curves.png" in {
        Path(a.path).name for a in client.list_artifacts(run.info.run_id, "plots")
    }


def test_the_same_config_on_the_same_data_trains_the_same_model(root):
    """A second stage-1 run with the chain's config (another run name) logs the same loss at every
    step and exports a Q-Former of the same digest: the training set fits the epoch cache, so
    run.rank_rows=auto is global_shuffle and no rank's rows depend on Ray Data's streaming_split
    (which gave the ranks other rows on every run of the demo)."""
    base = ["--stage", "1", "--config", str(CONFIG_DIR / "tiny_stage1.yaml"), "--root", str(root),
            "--corpus", CORPUS, "register_as=seed-tokenizer-stage1-again"]  # fmt: skip
    assert train_tokenizer.main([*base, "run.name=again"]) == 0
    clean_dir, again_dir = root / "runs" / f"stage1-{CORPUS}", root / "runs" / "again"
    assert (
        yaml.safe_load((again_dir / "config.yaml").read_text())["run"]["rank_rows"]
        == "global_shuffle"
    )
    assert losses(again_dir) == losses(clean_dir)
    again = CausalQFormer.from_pretrained(again_dir / "export")
    assert again.digest == CausalQFormer.from_pretrained(clean_dir / "export").digest


def test_stage2_from_cached_embeddings(root):
    """Stage 2 trained from the qembeds of the registered stage-1 model (features defaulted from its
    lineage), reports codebook health, and exports a SeedTokenizer whose Q-Former stayed frozen."""
    qembeds = list((root / "corpora" / CORPUS / "qembeds").iterdir())
    assert [q.name.split("@")[0] for q in qembeds] == ["seed-tokenizer-stage1-v1"]
    run_dir = root / "runs" / f"stage2-{CORPUS}"
    curve = losses(run_dir)
    assert sum(curve[s] for s in (10, 11, 12)) < sum(curve[s] for s in (1, 2, 3))
    assert_checkpoint(run_dir, 12)
    tok = SeedTokenizer.from_pretrained(run_dir / "export").eval()
    stage1 = CausalQFormer.from_pretrained(
        resolve_model("models:/seed-tokenizer-stage1/1", Catalog(root)).directory
    )
    assert tok.qformer.digest == stage1.digest  # the Q-Former stayed frozen
    assert tok.encode(torch.randn(2, 17, 32)).shape == (2, 32)

    client = client_for(root)
    run = job_run(client, run_dir)
    assert {
        "codebook_usage",
        "perplexity",
        "recon_cosine",
        "target_mse",
        "dead_codes",
        "vq",
        "recon",
        "gen",
    } <= set(run.data.metrics)
    names = {d.dataset.name for d in run.inputs.dataset_inputs}
    assert any(n.startswith(f"{CORPUS}/qembeds/") for n in names)
    assert client.get_model_version("seed-tokenizer", "1").tags["digest"] == tok.digest
    plots = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"loss_curves.png", "codebook_usage.png"} <= plots


def history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_stage2_dead_code_reseeding_survives_a_killed_worker(root):
    """With the opt-in `dead_codes.reseed`, codes dead for a window are re-seeded and the remedy's
    counts survive a worker SIGKILLed at step 7: they resume from the step-5 checkpoint, not zero."""
    argv = ["--stage", "2", "--config", str(CONFIG_DIR / "tiny_stage2.yaml"), "--root", str(root), "--corpus", CORPUS,
            "stage1=models:/seed-tokenizer-stage1/1", "run.name=reseed", "register_as=seed-tokenizer-reseed",
            "dead_codes.reseed=true", "fault.kill_at_step=7", "fault.rank=1"]  # fmt: skip
    assert train_tokenizer.main(argv) == 0
    run_dir = root / "runs" / "reseed"
    assert (run_dir / "fault_injected_step7").exists()  # the kill really happened
    client = client_for(root)
    run = job_run(client, run_dir)
    assert steps(client, run.info.run_id, "loss") == Counter(range(1, 13))
    dead = history(client, run.info.run_id, "dead_codes")
    reseeded = history(client, run.info.run_id, "reseeded_total")
    assert sorted(dead) == [5, 10] and sorted(reseeded) == [5, 10]
    assert reseeded[5] == dead[5] > 0, "the tiny run had no dead code to re-seed"
    # Restored from the step-5 checkpoint, the running total carries on (a fresh counter would
    # give reseeded[10] == dead[10]).
    assert reseeded[10] == reseeded[5] + dead[10]
    state = json.loads((run_dir / "step00000012" / "job_state.json").read_text())["code_usage"]
    # steps x ranks x batch x codes: no step's counts lost or doubled across the restart
    assert sum(state["total"]) == 12 * 2 * 4 * 32
    assert state["reseeded"] == reseeded[10]

    paper = job_run(client, root / "runs" / f"stage2-{CORPUS}")  # the same job without the remedy
    paper_dead = history(client, paper.info.run_id, "dead_codes")
    print(f"dead codes (reseed / paper): {dead} / {paper_dead}")
    assert "reseeded_total" not in paper.data.metrics
    # The re-seeded codes are where the encoder outputs are: fewer are dead in the next window.
    assert dead[10] < paper_dead[10]
    tok = SeedTokenizer.from_pretrained(run_dir / "export").eval()
    assert tok.encode(torch.randn(2, 17, 32)).shape == (2, 32)


def test_lora_on_the_token_corpus(root):
    """LoRA on the tokens made by the registered tokenizer (tokens= defaulted to them): both
    directions' losses, eval metrics, seed-lora registered from its run."""
    (tokens,) = (root / "corpora" / CORPUS / "tokens").iterdir()
    assert tokens.name.startswith("seed-tokenizer-v1@")
    run_dir = root / "runs" / f"lora-{CORPUS}"
    assert {"text_tokenizer", "tiny_llm", "export"} <= {p.name for p in run_dir.iterdir()}
    client = client_for(root)
    run = job_run(client, run_dir)
    assert run.data.params["tokens"] == tokens.name
    assert {"loss", "loss_i2t", "loss_t2i"} <= set(run.data.metrics)
    assert {"eval/caption_bleu4", "eval/caption_cider", "eval/t2i_valid"} <= set(run.data.metrics)
    assert run.data.metrics["eval/t2i_valid"] == 1.0
    version = client.get_model_version("seed-lora", "1")
    assert version.run_id == run.info.run_id
    curve = losses(run_dir)
    assert sum(curve[s] for s in (8, 9, 10)) < sum(curve[s] for s in (1, 2, 3))
