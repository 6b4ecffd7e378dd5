"""cluster/: the KubeRay manifests validate against the v1.7.0 CRDs, the launcher configs pass Ray's
own validator, the GPUs and CPUs they provide cover what the 64-GPU job configs ask for, the Ray
version everywhere is the pinned one, and every command they name parses into its config.

All offline: the CRD schemas are the operator's own (`../shared/reference/kuberay-v1.7.0/`), made
strict the way `kubectl apply --validate=strict` is (an unknown field is an error, not pruned).
"""

from __future__ import annotations

import copy
import functools
import pkgutil
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from jobs.config import CONFIG_DIR, TrainJobConfig
from jobs.lora import LoraJob
from jobs.stage1 import Stage1Job
from jobs.stage2 import Stage2Job
from pipelines.config import load_config

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
CRDS = REPO.parent / "shared" / "reference" / "kuberay-v1.7.0"
if not CRDS.is_dir():  # a checkout elsewhere: the reference copy beside the work tree
    CRDS = Path("/work/shared/reference/kuberay-v1.7.0")

K8S_FILES = sorted((CLUSTER / "k8s").rglob("*.yaml"))
LAUNCHER_FILES = sorted((CLUSTER / "launcher").glob("*.yaml"))
COMPOSE = CLUSTER / "local" / "compose.yaml"
GPU_JOBS = {
    "tokenizer_stage1.yaml": Stage1Job(),
    "tokenizer_stage2.yaml": Stage2Job(),
    "lora_opt2.7b.yaml": LoraJob(),
}
"""The 64-GPU job configs and the jobs they belong to."""


# libyaml when present: the CRDs are 2.3 MB of YAML (a minute in pure Python on a loaded CPU)
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.cache
def documents(path: Path) -> list[dict[str, Any]]:
    """The YAML documents of `path` (parsed once; callers that modify one copy it first)."""
    return [d for d in yaml.load_all(path.read_text(), Loader=LOADER) if d is not None]


def k8s_objects(kind: str | None = None) -> list[tuple[Path, dict[str, Any]]]:
    out = [(p, d) for p in K8S_FILES for d in documents(p)]
    return [(p, d) for p, d in out if kind is None or d["kind"] == kind]


def pinned(name: str) -> str:
    match = re.search(rf"^{name}==(\S+)", (REPO / "constraints.txt").read_text(), re.M)
    assert match, f"{name} is not pinned in constraints.txt"
    return match.group(1)


# ---------------------------------------------------------------------------------------------
# KubeRay CRDs


def strict(schema: Any) -> Any:
    """An openAPIV3Schema as a JSON schema in which unknown fields are errors: every object with
    `properties` and no `additionalProperties` / `x-kubernetes-preserve-unknown-fields` is closed."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):  # fmt: skip
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    """The validator of `kind` (RayCluster, RayJob) at the CRD's storage version."""
    files = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
    (crd,) = documents(CRDS / files[kind])
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
    assert version["name"] == "v1"
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


def crd_errors(obj: dict[str, Any]) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in crd_validator(obj["kind"]).iter_errors(obj)]  # fmt: skip


def test_cluster_has_every_piece():
    """RayCluster per GPU variant, a RayJob per pipeline step, storage, MLflow, launcher configs,
    the image and the local recipe are all there."""
    clusters = {d["metadata"]["labels"]["seedpipe/gpu"] for _, d in k8s_objects("RayCluster")}
    assert clusters == {"v100", "a100", "h100"}
    steps = [d["metadata"]["name"] for _, d in k8s_objects("RayJob")]
    assert steps == [f"seedpipe-{s}" for s in ("01-ingest", "02-features", "03-stage1", "04-qembeds",
                                               "05-stage2", "06-tokenize", "07-lora")]  # fmt: skip
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in k8s_objects()}
    assert {("PersistentVolumeClaim", "seedpipe-data"), ("Deployment", "seedpipe-mlflow"),
            ("Service", "seedpipe-mlflow"), ("Deployment", "seedpipe-postgres"),
            ("Namespace", "seedpipe")} <= kinds  # fmt: skip
    assert [p.stem for p in LAUNCHER_FILES] == ["aws-a100", "aws-h100", "aws-v100"]
    assert (
        (CLUSTER / "Dockerfile").is_file()
        and COMPOSE.is_file()
        and (CLUSTER / "README.md").is_file()
    )


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_kuberay_manifests_validate_against_the_v1_7_crds(kind):
    """Every RayCluster and RayJob manifest is valid under the operator's v1 schema, strictly."""
    objects = k8s_objects(kind)
    assert objects
    for path, obj in objects:
        assert obj["apiVersion"] == "ray.io/v1", path
        assert obj["metadata"]["name"] and obj["metadata"]["namespace"] == "seedpipe", path
        assert crd_errors(obj) == [], f"{path.relative_to(REPO)}"


def test_the_strict_schema_rejects_what_kubectl_would():
    """The check means something: a misspelled field, a wrong type and a bad enum each fail."""
    _, cluster = k8s_objects("RayCluster")[0]
    typo = copy.deepcopy(cluster)
    typo["spec"]["workerGroupSpec"] = typo["spec"].pop("workerGroupSpecs")
    assert any("workerGroupSpec" in e for e in crd_errors(typo))
    wrong = copy.deepcopy(cluster)
    wrong["spec"]["workerGroupSpecs"][0]["replicas"] = "eight"
    assert any("replicas" in e for e in crd_errors(wrong))
    bad = copy.deepcopy(cluster)
    bad["spec"]["authOptions"]["mode"] = "password"
    assert any("authOptions.mode" in e for e in crd_errors(bad))
    _, job = k8s_objects("RayJob")[0]
    nested = copy.deepcopy(job)
    nested["spec"]["submitterConfig"]["retries"] = 2
    assert any("retries" in e for e in crd_errors(nested))


def test_kubernetes_objects_reference_each_other():
    """Every claim, service selector and secret a pod uses is defined here or documented to create."""
    claims = {d["metadata"]["name"] for _, d in k8s_objects("PersistentVolumeClaim")}
    pod_specs = [d["spec"]["template"]["spec"] for _, d in k8s_objects("Deployment")]
    for _, cluster in k8s_objects("RayCluster"):
        pod_specs.append(cluster["spec"]["headGroupSpec"]["template"]["spec"])
        pod_specs += [g["template"]["spec"] for g in cluster["spec"]["workerGroupSpecs"]]
    for spec in pod_specs:
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
    readme = (CLUSTER / "README.md").read_text() + (CLUSTER / "k8s" / "mlflow.yaml").read_text()
    for _, deployment in k8s_objects("Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert f"create secret generic {ref['name']}" in readme
    pod_labels = [d["spec"]["template"]["metadata"]["labels"] for _, d in k8s_objects("Deployment")]
    for _, service in k8s_objects("Service"):
        assert any(service["spec"]["selector"].items() <= labels.items() for labels in pod_labels)
    for _, cluster in k8s_objects("RayCluster"):
        env = {e["name"]: e.get("value") for e in  # secretKeyRef entries have no value
               cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}  # fmt: skip
        assert env["MLFLOW_TRACKING_URI"] == "http://seedpipe-mlflow.seedpipe.svc:5000"
        assert env["SEEDPIPE_ROOT"] == "/mnt/seed-data"
    for _, job in k8s_objects("RayJob"):
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": "seedpipe"}
    assert {d["metadata"]["name"] for _, d in k8s_objects("RayCluster")} == {"seedpipe"}


# ---------------------------------------------------------------------------------------------
# Ray cluster launcher


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_config_passes_rays_validator(path):
    """`ray up`'s own preparation and schema validation accept the file (offline)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    # our commands, not the defaults' (which pip-install a Ray nightly at boot)
    assert prepared["setup_commands"] == [] and prepared["worker_setup_commands"] == []
    broken = copy.deepcopy(config) | {"max_worker": 8}
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


# ---------------------------------------------------------------------------------------------
# Resources: what the clusters provide covers what the jobs request


def gpu_job_config(name: str) -> TrainJobConfig:
    return load_config(GPU_JOBS[name].config_cls, CONFIG_DIR / name)


def quantity(value: Any) -> float:
    """A Kubernetes CPU/GPU quantity ("88", 8, "500m") as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def raycluster_nodes(cluster: dict[str, Any]) -> list[dict[str, float]]:
    """{CPU, GPU} that each Ray node of a RayCluster offers (rayStartParams override the limits)."""

    def node(group: dict[str, Any]) -> dict[str, float]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        params = group.get("rayStartParams", {})
        return {"CPU": quantity(params.get("num-cpus", limits.get("cpu", 0))),
                "GPU": quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))}  # fmt: skip

    nodes = [node(cluster["spec"]["headGroupSpec"])]
    for group in cluster["spec"]["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        nodes += [node(group)] * group["replicas"]
    return nodes


def launcher_nodes(config: dict[str, Any]) -> list[dict[str, float]]:
    types = config["available_node_types"]
    nodes = [dict(types[config["head_node_type"]]["resources"])]
    for name, node_type in types.items():
        if name != config["head_node_type"]:
            nodes += [dict(node_type["resources"])] * node_type["min_workers"]
    return [{"CPU": float(n.get("CPU", 0)), "GPU": float(n.get("GPU", 0))} for n in nodes]


def placeable(nodes: list[dict[str, float]], *, cpus: float, gpus: float) -> int:
    """How many workers of (cpus, gpus) fit: per node, since a worker cannot span nodes."""
    return sum(
        int(min(n["CPU"] // cpus, n["GPU"] // gpus if gpus else float("inf"))) for n in nodes
    )


def all_clusters() -> list[tuple[str, list[dict[str, float]]]]:
    out = [(str(p.relative_to(REPO)), raycluster_nodes(d)) for p, d in k8s_objects("RayCluster")]
    out += [
        (str(p.relative_to(REPO)), launcher_nodes(yaml.safe_load(p.read_text())))
        for p in LAUNCHER_FILES
    ]
    return out


@pytest.mark.parametrize("name", sorted(GPU_JOBS))
def test_every_cluster_fits_each_64_gpu_job(name):
    """Every RayCluster and launcher config places all of the job's workers (CPUs and GPUs per
    worker, node by node) and keeps CPUs free beside them for Ray Data's reads."""
    scaling = gpu_job_config(name).scaling
    assert scaling.use_gpu and scaling.num_workers == 64
    for where, nodes in all_clusters():
        assert sum(n["GPU"] for n in nodes) == 64, where
        fits = placeable(nodes, cpus=scaling.cpus_per_worker, gpus=scaling.gpus_per_worker)
        assert fits >= scaling.num_workers, f"{where}: {fits} of {scaling.num_workers} workers fit"
        spare = sum(n["CPU"] for n in nodes) - scaling.num_workers * scaling.cpus_per_worker
        assert spare >= 8 * 16, f"{where}: only {spare} CPUs beside the training workers"
        assert nodes[0]["GPU"] == 0 and nodes[0]["CPU"] == 0, (
            f"{where}: work would land on the head"
        )


def test_every_stage_job_fits_its_cluster():
    """The stage RayJobs' actor pools (num_workers x GPUs/CPUs per actor) fit every cluster too."""
    for _, job in k8s_objects("RayJob"):
        config = parse_entrypoint(job["spec"]["entrypoint"])
        resources = getattr(config, "resources", None)
        if resources is None:
            continue
        for where, nodes in all_clusters():
            fits = placeable(
                nodes, cpus=resources.num_cpus_per_worker, gpus=resources.num_gpus_per_worker
            )
            assert fits >= resources.num_workers, f"{job['metadata']['name']} on {where}"


# ---------------------------------------------------------------------------------------------
# Versions


def images() -> list[tuple[str, str]]:
    """(where, image) of every container image the cluster files name."""
    out = []
    for path, obj in k8s_objects():
        for spec in _pod_specs(obj):
            out += [(str(path.relative_to(REPO)), c["image"]) for c in spec["containers"]]
    for path in LAUNCHER_FILES:
        out.append(
            (str(path.relative_to(REPO)), yaml.safe_load(path.read_text())["docker"]["image"])
        )
    for name, service in yaml.safe_load(COMPOSE.read_text())["services"].items():
        out.append((f"compose:{name}", service["image"]))
    return out


def _pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    if obj["kind"] == "Deployment":
        return [obj["spec"]["template"]["spec"]]
    if obj["kind"] == "RayCluster":
        return [obj["spec"]["headGroupSpec"]["template"]["spec"],
                *(g["template"]["spec"] for g in obj["spec"]["workerGroupSpecs"])]  # fmt: skip
    return []


def test_ray_and_torch_versions_are_the_pinned_ones():
    """The image builds the pinned Ray and torch (and checks it), its tag says that Ray, every
    manifest runs that image, and every RayCluster declares that rayVersion."""
    ray_version, torch_version = pinned("ray"), pinned("torch")
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"ARG RAY_VERSION={ray_version}\n" in dockerfile
    assert f"ARG TORCH_VERSION={torch_version}\n" in dockerfile
    assert "pip install -q -c constraints.txt -e ." in dockerfile  # constraints pin ray== itself
    assert "ray.__version__ == '${RAY_VERSION}'" in dockerfile
    ours = [(w, i) for w, i in images() if "/seedpipe:" in i]
    assert len(ours) >= 9
    for where, image in ours:
        assert f"-ray{ray_version}-" in image.rsplit(":", 1)[1], f"{where}: {image}"
    assert len({i for _, i in ours}) == 1, "one image everywhere"
    for path, cluster in k8s_objects("RayCluster"):
        assert cluster["spec"]["rayVersion"] == ray_version, path
    from importlib.metadata import version

    assert version("ray") == ray_version  # the validator above is that Ray's


# ---------------------------------------------------------------------------------------------
# Entrypoints


def parse_entrypoint(entrypoint: str) -> Any:
    """`python -m jobs.cli COMMAND ARGS` -> the validated config COMMAND would run with (the
    command exists, its entry point resolves, every flag and key is known, values are valid)."""
    words = shlex.split(entrypoint)
    assert words[:3] == ["python", "-m", "jobs.cli"], entrypoint
    return parse_command_line(words[3], words[4:])


def parse_command_line(command: str, args: list[str]) -> Any:
    from jobs.cli import DELEGATED
    from jobs.train_tokenizer import JOBS, _take_stage
    from pipelines import cli_common
    from pipelines.config import parse_command
    from pipelines.features import FeaturesConfig
    from pipelines.ingest import IngestConfig
    from pipelines.qembeds import QEmbedsConfig
    from pipelines.tokens import TokensConfig

    assert command in DELEGATED, command
    target = DELEGATED[command][0]
    assert callable(pkgutil.resolve_name(target if ":" in target else f"{target}:main"))
    args = list(args)
    stages = {"features": FeaturesConfig, "qembeds": QEmbedsConfig, "tokenize": TokensConfig}
    if command in stages:
        return cli_common.parse_stage(stages[command], args, prog=command, doc="")
    if command == "ingest":
        return parse_command(IngestConfig, args, prog=command, description="")
    job = {"train-lora": LoraJob()}.get(command) or JOBS[_take_stage(args)]
    assert command in ("train-lora", "train-tokenizer"), command
    return parse_command(
        job.config_cls, args, prog=command, description="", config_dirs=[CONFIG_DIR]
    )


def test_every_rayjob_entrypoint_parses_into_its_config():
    """Each RayJob runs an existing seedpipe command whose arguments load into a valid config on
    the shared root; the training jobs use the shipped 64-GPU configs."""
    for _, job in k8s_objects("RayJob"):
        config = parse_entrypoint(job["spec"]["entrypoint"])
        assert config.root == "/mnt/seed-data" and config.corpus == "cc3m", job["metadata"]["name"]
        if isinstance(config, TrainJobConfig):
            assert config.scaling.num_workers == 64 and config.scaling.use_gpu


def readme_submissions() -> list[list[str]]:
    """The `seedpipe submit ...` commands of cluster/README.md's code blocks (continuations joined)."""
    text = (CLUSTER / "README.md").read_text().replace("\\\n", " ")
    fenced = re.findall(r"```(\w*)\n(.*?)```", text, re.S)  # every fence, so pairs stay aligned
    blocks = [body for lang, body in fenced if lang in ("", "bash", "sh")]
    lines = [line.split(" #", 1)[0].strip() for block in blocks for line in block.splitlines()]
    return [shlex.split(line)[2:] for line in lines if line.startswith("seedpipe submit ")]


def test_every_submit_command_in_the_cluster_readme_parses():
    """Each `seedpipe submit` in cluster/README.md builds a submission whose command parses."""
    from jobs.submit import SubmitConfig, build_submission, split_own_flags

    commands = readme_submissions()
    assert len(commands) >= 7
    seen = set()
    for argv in commands:
        own, rest = split_own_flags(argv, SubmitConfig)
        submission = build_submission(
            rest[0], rest[1:], env={"MLFLOW_TRACKING_URI": "http://mlflow:5000"}
        )
        parse_entrypoint(submission.entrypoint)
        seen.add(rest[0])
    assert {"ingest", "features", "train-tokenizer", "qembeds", "tokenize", "train-lora"} <= seen
