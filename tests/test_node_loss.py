"""A node dies (issue 23, section 3): a training job and a data stage lose a Ray node mid-run.

One cluster for the module (tests/ray_nodes.py): a head without CPUs and node_a, node_b of one CPU
each, every node with its own scratch folder (`SEEDPIPE_SCRATCH`: nothing node-local is shared).
The catalog, the run folders and Ray Train's checkpoints are in a bucket of a real S3 API server
(tests/s3_server.py), MLflow is a real `mlflow server` whose artifacts are in the same bucket;
every node and every driver gets the store's variables and `MLFLOW_TRACKING_URI`. The corpora are
written straight into the bucket and featurized on the cluster by the `seedpipe` console script.
Training: node_b dies under an elastic stage-1 job, which goes on alone on node_a and finishes; a
relaunch with node_b back grows the finished run to 2 workers. Data: node_a dies for good under a
2-actor features stage, which finishes in the same run on node_b.

The GCS notices a dead node by its health check, by default after 5 failed checks 3 s apart
(`ray_config_def.h` of Ray 2.60: `health_check_initial_delay_ms` 5000, `health_check_period_ms`
3000, `health_check_timeout_ms` 10000, `health_check_failure_threshold` 5; each is read from
`RAY_<name>` by the process, here the GCS on the head). Until then the dead node's CPUs still
count as free, and Ray Train's elastic policy would restart the group at its old size and wait for
a placement group that cannot be placed. A SIGKILLed node refuses connections at once, so a 1 s
period finds it dead in about 5 s; the timeout stays at its default, so a node that is merely slow
to answer on these 2 busy cores is not declared dead.

Even then Ray Train's first restart after the loss asks for the old size: its elastic policy reads
the cluster from Ray Data's AutoscalingCoordinator, which refreshes its view of the nodes every
20 s (`TICK_INTERVAL_S`, Ray 2.60), so the 2-worker placement group waits out the start timeout
(`RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`, 60 s by default; a time-out is retried without limit for
an elastic group, `jobs.scheduling`) before the next decision sees one node. The drivers here set
it to 20 s: a placement group on a cluster with room is ready in well under a second.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from jobs.scheduling import START_TIMEOUT_ENV
from pipelines.catalog import Catalog
from pipelines.datasets import drop_holdout
from tests.chain import seedpipe_exe
from tests.mlflow_server import MlflowServer
from tests.raw_fixture import make_raw_corpus
from tests.ray_nodes import HEAD, RayNodes
from tests.s3_server import REGION, S3Server

# one xdist worker runs the module: its cluster and servers (a module fixture) start once
pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.xdist_group("node-loss")]
BUCKET = "nodeloss"
ROOT = f"s3://{BUCKET}/data"
STAGE_BUCKET = "nodeloss-stage"  # versioned: every write of a completion record is kept
STAGE_ROOT = f"s3://{STAGE_BUCKET}/data"
TRAIN_CORPUS, STAGE_CORPUS = "train", "stage"
HEALTH_CHECK = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "5"}
"""Ray's GCS health check for the test cluster (module docstring)."""
START_TIMEOUT = {START_TIMEOUT_ENV: "20"}
"""Ray Train's bound on one wait for a worker group's placement group, in the drivers."""
RUN = "nodeloss"
MAX_STEPS, EVERY, PER_WORKER = 24, 2, 4
GLOBAL_BATCH = PER_WORKER * 2  # batch_size_per_worker x the largest worker count
TRAIN = ["train-tokenizer", "--stage", "1", "--config", "tiny_stage1", "--root", ROOT,
         "--corpus", TRAIN_CORPUS, f"run.name={RUN}", "scaling.num_workers=[1,2]",
         f"optim.max_steps={MAX_STEPS}", f"run.checkpoint_every={EVERY}", "run.max_failures=3",
         "run.keep_checkpoints=100", f"optim.batch_size_per_worker={PER_WORKER}", "eval_every=0",
         "register_as=nodeloss-stage1"]  # fmt: skip
"""Stage 1 (cheaper than stage 2, which needs a stage-1 model and its qembeds first). 320 images
less the held-out tenth: ~288 training rows, so 24 steps of 8 stay in epoch 0 at any size."""


@dataclass
class World:
    s3: S3Server
    mlflow: MlflowServer
    cluster: RayNodes
    base: Path
    killed: set[str] = field(default_factory=set)
    """Nodes a test killed and did not bring back: the next test restarts them first."""

    def seedpipe(
        self, name: str, argv: list[str], *, timeout_s: float
    ) -> subprocess.CompletedProcess[str]:
        """`seedpipe ARGV --address <head>` from an empty folder, as a cluster user runs it."""
        proc = subprocess.run([seedpipe_exe(), *argv, "--address", self.cluster.address],
                              cwd=self.workdir(name), env=self.cluster.env("driver"),
                              capture_output=True, text=True, timeout=timeout_s)  # fmt: skip
        (self.base / f"{name}.log").write_text(proc.stdout + proc.stderr)
        return proc

    def background(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        """`seedpipe ARGV --address <head>` started in the background, its output in a log file."""
        with (self.base / f"{name}.log").open("wb") as log:
            return subprocess.Popen([seedpipe_exe(), *argv, "--address", self.cluster.address],
                                    cwd=self.workdir(name), env=self.cluster.env("driver"),
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    def log(self, name: str, chars: int = 6000) -> str:
        return (self.base / f"{name}.log").read_text(errors="replace")[-chars:]

    def workdir(self, name: str) -> Path:
        path = self.base / "work" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def read(self, key: str, bucket: str = BUCKET) -> str | None:
        """An object of the bucket as text; None when there is none."""
        try:
            body = self.s3.client().get_object(Bucket=bucket, Key=key)["Body"]
        except self.s3.client().exceptions.NoSuchKey:
            return None
        return body.read().decode()

    def filesystem(self) -> pafs.S3FileSystem:
        return pafs.S3FileSystem(endpoint_override=self.s3.endpoint, scheme="http",
                                 access_key="testing", secret_key="testing", region=REGION)  # fmt: skip

    def bring_back(self) -> None:
        for name in sorted(self.killed):
            self.cluster.restart_node(name)
            self.killed.discard(name)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """S3 + MLflow servers, the three-node cluster with the store's environment, and the training
    corpus featurized on the cluster."""
    base = tmp_path_factory.mktemp("node-loss")
    s3 = S3Server(base)
    s3.start()
    mlflow = s3.tracking_server(base, BUCKET)
    try:
        s3.create_bucket(BUCKET)
        s3.create_bucket(STAGE_BUCKET)
        s3.client().put_bucket_versioning(Bucket=STAGE_BUCKET,
                                          VersioningConfiguration={"Status": "Enabled"})  # fmt: skip
        mlflow.start()
        node_env = {name: {"SEEDPIPE_SCRATCH": str(base / "scratch" / name)}
                    for name in (HEAD, "node_a", "node_b", "driver", "probe")}  # fmt: skip
        node_env["driver"] |= START_TIMEOUT
        env = s3.env() | {"MLFLOW_TRACKING_URI": mlflow.uri} | HEALTH_CHECK
        with pytest.MonkeyPatch.context() as mp:
            for key, value in s3.env().items():  # this process writes the corpora into the bucket
                mp.setenv(key, value)
            with RayNodes(base / "ray", dashboard=True, env=env, node_env=node_env) as cluster:
                world = World(s3=s3, mlflow=mlflow, cluster=cluster, base=base)
                make_raw_corpus(Catalog(ROOT), TRAIN_CORPUS, num_shards=10, per_shard=32)
                proc = world.seedpipe("features-train", ["features", "--root", ROOT, "--corpus",
                                      TRAIN_CORPUS, "--encoder", "tiny"], timeout_s=600)  # fmt: skip
                assert proc.returncode == 0, world.log("features-train")
                yield world
    finally:
        mlflow.stop()
        s3.stop()


def train_workers(cluster: RayNodes) -> dict[str, str | None]:
    """Every Ray Train worker actor the cluster has seen (dead ones too): actor id -> node id."""
    from ray.util.state import list_actors

    actors = list_actors(address=cluster.dashboard_url, filters=[("class_name", "=", "RayTrainWorker")],
                         detail=True, limit=10_000)  # fmt: skip
    return {a.actor_id: a.node_id for a in actors}


def registered_steps(world: World) -> list[int]:
    """The checkpoint steps Ray Train has registered (its snapshot in the run folder)."""
    text = world.read(f"data/runs/{RUN}/checkpoint_manager_snapshot.json") or ""
    return sorted({int(s) for s in re.findall(r"step(\d{8})", text)})


def consumed_keys(world: World, step: int) -> list[str]:
    """Every rank's consumed keys of the epoch in the step's checkpoint (a list: duplicates count)."""
    fs, folder = world.filesystem(), f"{BUCKET}/data/runs/{RUN}/step{step:08d}"
    files = fs.get_file_info(pafs.FileSelector(folder))
    keys: list[str] = []
    for info in sorted(files, key=lambda i: i.path):
        if re.fullmatch(r"consumed_keys_rank\d+\.parquet", info.base_name):
            keys += pq.read_table(info.path, filesystem=fs).column("key").to_pylist()
    return keys


def resizes(world: World) -> list[dict]:
    text = world.read(f"data/runs/{RUN}/resizes.jsonl") or ""
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.timeout(1800)  # the module's servers, cluster and features are built in its setup
def test_training_goes_on_on_the_surviving_node_and_a_relaunch_grows_back(world: World) -> None:
    """node_b SIGKILLed under an elastic [1,2] stage-1 job after a checkpoint: the job resumes on
    node_a alone from the last checkpoint (a 2 -> 1 resize, the global batch kept, no row of the
    epoch trained twice), finishes with exit 0 and every step logged once in its one MLflow run;
    with node_b back, the same command resumes the finished run on 2 workers (1 -> 2) and exits 0."""
    from mlflow import MlflowClient

    world.bring_back()
    cluster, timeline = world.cluster, {}
    seen = train_workers(cluster)
    start = time.monotonic()
    job = world.background("train-1", TRAIN)
    try:
        while not registered_steps(world):
            assert job.poll() is None, world.log("train-1")
            assert time.monotonic() - start < 600, "no checkpoint registered in 600 s"
            time.sleep(0.2)
        before_kill = registered_steps(world)
        timeline["registered"] = time.monotonic() - start
        old_b, killed_at = cluster.node_id("node_b"), time.time()
        cluster.kill_node("node_b")
        world.killed.add("node_b")
        timeline["killed"] = time.monotonic() - start
        rc = job.wait(timeout=900)
        timeline["finished"] = time.monotonic() - start
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert rc == 0, world.log("train-1")
    client = MlflowClient(world.mlflow.uri)
    run_id = (world.read(f"data/runs/{RUN}/mlflow_run_id") or "").strip()
    history = client.get_metric_history(run_id, "loss")
    last_before = max((m.step for m in history if m.timestamp < killed_at * 1000), default=0)
    print(
        f"first run: {timeline}; checkpoints registered at the kill: {before_kill}; "
        f"last loss logged before it: step {last_before}"
    )

    # the first group held both nodes; the job went on on node_a alone, from a checkpoint at or
    # after those registered at the kill, the global batch kept (2 micro batches of 4 accumulated)
    workers = {k: v for k, v in train_workers(cluster).items() if k not in seen}
    assert Counter(workers.values()) == Counter(
        {cluster.node_id("node_a"): len(workers) - 1, old_b: 1}
    ), workers
    (shrink,) = resizes(world)
    assert (shrink["from_workers"], shrink["to_workers"]) == (2, 1), shrink
    assert before_kill[-1] <= shrink["step"] < MAX_STEPS, shrink
    assert (shrink["global_batch"], shrink["micro_batch"], shrink["accumulation"]) == (
        GLOBAL_BATCH,
        PER_WORKER,
        2,
    ), shrink
    state = json.loads(
        world.read(f"data/runs/{RUN}/step{MAX_STEPS:08d}/trainer_state.json") or "{}"
    )
    assert (state["step"], state["world"], state["epoch"]) == (MAX_STEPS, 1, 0), state

    # rows of the epoch: those consumed by the 2 ranks are carried by the 1-rank checkpoints, none
    # twice, a global batch per step, all of them training rows
    resumed_from = consumed_keys(world, shrink["step"])
    final = consumed_keys(world, MAX_STEPS)
    assert len(resumed_from) == len(set(resumed_from)) == shrink["step"] * GLOBAL_BATCH
    assert shrink["consumed_in_epoch"] == len(resumed_from)  # what the resumed rank skipped
    assert len(final) == len(set(final)) == MAX_STEPS * GLOBAL_BATCH
    assert set(resumed_from) <= set(final)
    assert set(final) <= training_keys(world)

    # one MLflow run, every step's loss exactly once
    logged = Counter(m.step for m in history)
    assert logged == Counter(range(1, MAX_STEPS + 1)), logged
    assert client.get_run(run_id).info.status == "FINISHED"

    # node_b back: the same command resumes the finished run on both nodes
    cluster.restart_node("node_b")
    world.killed.discard("node_b")
    seen |= workers
    t0 = time.monotonic()
    again = world.seedpipe("train-2", TRAIN, timeout_s=900)
    print(f"relaunch: {time.monotonic() - t0:.0f} s")
    assert again.returncode == 0, world.log("train-2")
    relaunched = {k: v for k, v in train_workers(cluster).items() if k not in seen}
    assert Counter(relaunched.values()) == Counter(
        [cluster.node_id("node_a"), cluster.node_id("node_b")]
    ), relaunched
    grow = resizes(world)[1:]
    assert [(g["from_workers"], g["to_workers"], g["step"]) for g in grow] == [(1, 2, MAX_STEPS)]
    assert (grow[0]["global_batch"], grow[0]["micro_batch"], grow[0]["accumulation"]) == (
        GLOBAL_BATCH,
        PER_WORKER,
        1,
    )
    assert (world.read(f"data/runs/{RUN}/mlflow_run_id") or "").strip() == run_id
    logged = Counter(m.step for m in client.get_metric_history(run_id, "loss"))
    assert logged == Counter(range(1, MAX_STEPS + 1)), logged
    # the relaunch exported the very weights the first run registered: no second version
    versions = client.search_model_versions("name='nodeloss-stage1'")
    assert [v.version for v in versions] == ["1"], versions


def training_keys(world: World) -> set[str]:
    """The keys of the training corpus's committed features, less the held-out ones."""
    catalog = Catalog(ROOT)
    out: set[str] = set()
    for path in catalog.committed_files(catalog.stage_dir(TRAIN_CORPUS, "features", "tiny")):
        table = pq.read_table(path, filesystem=catalog.fs, columns=["key"])
        out |= set(drop_holdout(table, 0.1).column("key").to_pylist())
    return out


STAGE_SHARDS, STAGE_PER_SHARD = 8, 48
STAGE_ACTOR = "MapWorker(MapBatches(FeaturesShardWorker))"


def stage_workers(cluster: RayNodes) -> dict[str, tuple[str | None, int]]:
    """Every actor of a features stage's pool the cluster has seen (dead ones too): actor id ->
    (node id, restarts). The state API names Ray Data's pool actors after the function they run."""
    from ray.util.state import list_actors

    actors = list_actors(address=cluster.dashboard_url, filters=[("class_name", "=", STAGE_ACTOR)],
                         detail=True, limit=10_000)  # fmt: skip
    return {a.actor_id: (a.node_id, a.num_restarts) for a in actors}


@pytest.mark.timeout(900)
def test_a_data_stage_that_loses_a_node_for_good_builds_every_shard_once(world: World) -> None:
    """node_a SIGKILLed for good once the first shard of a 2-actor features stage is committed:
    the same run finishes with exit 0 (Ray Data restarts the lost actor on node_b once the other
    actor is idle, and retries its shards there), every raw key is in the committed features
    exactly once, each shard's completion record is written once and nothing else is left."""
    world.bring_back()
    cluster = world.cluster
    records = make_raw_corpus(Catalog(STAGE_ROOT), STAGE_CORPUS, num_shards=STAGE_SHARDS,
                              per_shard=STAGE_PER_SHARD)  # fmt: skip
    features = f"data/corpora/{STAGE_CORPUS}/features/tiny/"

    def committed() -> list[str]:
        return [k for k in world.s3.keys(STAGE_BUCKET, features) if k.endswith(".done.json")]

    before = stage_workers(cluster)
    start, timeline = time.monotonic(), {}
    stage = world.background("features-stage", ["features", "--root", STAGE_ROOT, "--corpus",
                             STAGE_CORPUS, "--encoder", "tiny", "--num-workers", "2"])  # fmt: skip
    try:
        while not committed():
            assert stage.poll() is None, world.log("features-stage")
            assert time.monotonic() - start < 600, "no shard committed in 600 s"
            time.sleep(0.2)
        old_a = cluster.node_id("node_a")
        cluster.kill_node("node_a")
        world.killed.add("node_a")  # not brought back here: the stage must do without it
        timeline["killed"] = time.monotonic() - start
        at_kill = len(committed())
        rc = stage.wait(timeout=600)
        timeline["finished"] = time.monotonic() - start
    finally:
        if stage.poll() is None:
            stage.kill()
            stage.wait()
    log = world.log("features-stage")
    print(f"features stage: {timeline}; shards committed at the kill: {at_kill}")
    assert rc == 0, log
    assert at_kill < STAGE_SHARDS, "the stage had finished before the kill: nothing was lost"
    assert f"shards built     {STAGE_SHARDS} / {STAGE_SHARDS}" in log, log
    rows = STAGE_SHARDS * STAGE_PER_SHARD
    assert f"rows in / out    {rows} / {rows}" in log, log  # each shard's summary came once

    # every raw key exactly once across the committed shards; each record written once (the
    # bucket keeps every version); nothing but the committed shards in the dataset folder
    catalog = Catalog(STAGE_ROOT)
    out_dir = catalog.stage_dir(STAGE_CORPUS, "features", "tiny")
    done = catalog.committed(out_dir)
    assert sorted(done) == sorted(r.shard for r in records)
    keys: Counter[str] = Counter()
    for path in catalog.committed_files(out_dir):
        keys.update(pq.read_table(path, filesystem=catalog.fs, columns=["key"]).column("key").to_pylist())  # fmt: skip
    raw = {f"{s:05d}{i:04d}" for s in range(STAGE_SHARDS) for i in range(STAGE_PER_SHARD)}
    assert set(keys) == raw and set(keys.values()) == {1}
    # (pyarrow's create_dir leaves an empty `.../tiny/` marker object: not a file)
    listed = [k for k in world.s3.keys(STAGE_BUCKET, features) if not k.endswith("/")]
    assert sorted(listed) == sorted(f"{features}{sid}.{ext}" for sid in done
                                    for ext in ("parquet", "done.json")), listed  # fmt: skip
    versions = world.s3.client().list_object_versions(Bucket=STAGE_BUCKET, Prefix=features)
    writes = Counter(v["Key"] for v in versions.get("Versions", []) if v["Key"].endswith(".done.json"))  # fmt: skip
    assert len(writes) == STAGE_SHARDS and set(writes.values()) == {1}, writes

    # the pool: both actors ended on node_b, the one node_a lost restarted there once
    actors = {k: v for k, v in stage_workers(cluster).items() if k not in before}
    node_b = cluster.node_id("node_b")
    assert sorted(actors.values()) == [(node_b, 0), (node_b, 1)], (actors, old_a)
