"""`seedpipe submit` and `seedpipe jobs`: run any stage or job on a Ray cluster (the Ray Jobs API).

    seedpipe submit train-tokenizer --stage 1 --config tokenizer_stage1 --root /mnt/seed-data \\
        --address http://head:8265 [--wait | --no-wait] [--name NAME]
    seedpipe jobs [--address URL] [--limit N]        # recent jobs: id, status, start, duration
    seedpipe jobs logs ID [--follow] [--tail N]
    seedpipe jobs stop ID [ID ...]

`submit` runs `python -m jobs.cli <command> <args>` (what `seedpipe <command> <args>` runs here;
a dotted module name runs as `python -m <module> <args>`) through Ray's `JobSubmissionClient`:
the same code and arguments as locally.

- The working tree ships as the job's `working_dir` (catalog data, `.venv`, caches and `.git`
  excluded, `.gitignore` respected as Ray does); a tree over Ray's package limit is refused
  before anything is uploaded, naming its largest entries.
- The catalog root is resolved here, the way the command would (`--root` / `root=`, else the
  `--config` YAML's, else the default), made absolute when it is a local path (the job's working
  folder is a temporary unpack of the tree), passed on as `--root` and as `SEEDPIPE_ROOT`. On a
  multi-node cluster it must be shared storage: the same mount path everywhere, or an object store.
- `MLFLOW_TRACKING_URI` is passed on when it is set here (a tracking server). Without it the job
  uses the embedded store under a local root, which needs no variable; an object-store root without
  a tracking server is refused here rather than on the cluster.
- `--config FILE` outside the shipped tree is refused (the job would not see it); inside, it is
  passed relative to the tree. Shipped configs by name (`--config tokenizer_stage1`) just work.
- The keys every job's own `ray.init` passes to its workers (`pipelines.cli_common.WORKER_ENV_KEYS`)
  are not shipped: Ray refuses a driver runtime_env that repeats an env var of the job's. Set them
  in the cluster's environment (cluster/ does).

`--wait` (the default, as `ray job submit`) streams the job's logs and exits with its status:
0 when it SUCCEEDED, the driver's exit code (else 1) when it FAILED, 1 when STOPPED. Ctrl-C stops
the streaming, not the job. Token auth (`RAY_AUTH_MODE=token`) is Ray's own: the client sends
`RAY_AUTH_TOKEN` / `~/.ray/auth_token` when the mode is on; both sides must use the same mode.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shlex
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pipelines.config import ConfigError, cli_main, field_docs, find_config, parse_command

PROJECT_ROOT = Path(__file__).resolve().parent.parent
"""The tree that ships: the checkout this module is in."""

DEFAULT_ROOT = "./seed-data"

EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    "*.egg-info",
    "seed-data",
    "seed-demo",
    "bench-demo",
    "mlruns",
    "mlartifacts",
    "mlflow.db",
    "/build",
    "/dist",
]
"""Never shipped (gitignore patterns relative to the tree), on top of the tree's .gitignore."""

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}

NOT_SUBMITTABLE = {"submit", "jobs"}


@dataclass(kw_only=True)
class SubmitConfig:
    """`seedpipe submit`'s own options; every other word goes to the submitted command."""

    address: str | None = None
    """Ray job server (dashboard) URL, e.g. http://head:8265 (default: RAY_API_SERVER_ADDRESS,
    RAY_ADDRESS, else a Ray started on this machine)."""
    wait: bool = True
    """Stream the job's logs until it ends and exit with its status (--no-wait: print the id, return)."""
    name: str = ""
    """Prefix of the submission id and the job's metadata name (default: the command)."""
    entrypoint_num_cpus: float = 0.0
    """CPUs reserved for the command's own process (ingest's img2dataset processes run there); >0
    also places it on a node that has them (a KubeRay head offers none)."""


@dataclass(kw_only=True)
class JobsConfig:
    """`seedpipe jobs`: the recent jobs on a cluster."""

    address: str | None = None
    """Ray job server (dashboard) URL (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS, local)."""
    limit: int = 20
    """Show at most this many jobs, newest first (0: all)."""


@dataclass(kw_only=True)
class JobLogsConfig:
    address: str | None = None
    """Ray job server (dashboard) URL."""
    follow: bool = False
    """Keep streaming until the job ends."""
    tail: int = 0
    """Only the last N lines (0: all)."""
    ids: list[str] = field(default_factory=list)
    """The submission id."""


@dataclass(kw_only=True)
class JobStopConfig:
    address: str | None = None
    """Ray job server (dashboard) URL."""
    timeout_s: float = 60.0
    """Seconds to wait for each job to reach a final status (0: do not wait)."""
    ids: list[str] = field(default_factory=list)
    """Submission ids to stop."""


@dataclass(frozen=True)
class Submission:
    """What `submit` sends: the entrypoint, its runtime_env and metadata, and the id to use."""

    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    root: str | None
    """The catalog root the command gets (None for a module that is not a seedpipe command)."""


# ---------------------------------------------------------------------------------------------
# Building the submission (no Ray contact: testable offline)


def split_own_flags(argv: Sequence[str], cls: type) -> tuple[list[str], list[str]]:
    """Split `argv` into `cls`'s flags (anywhere in the line, before a literal `--`) and the rest,
    which is the submitted command and its arguments in their order."""
    takes_value, switches = set(), set()
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            switches |= {flag, "--no-" + flag[2:]}
        else:
            takes_value.add(flag)
    own: list[str] = []
    rest: list[str] = []
    words = list(argv)
    i = 0
    while i < len(words):
        word = words[i]
        if word == "--":
            rest += words[i + 1 :]
            break
        name = word.split("=", 1)[0]
        if word in switches or (not rest and word in ("-h", "--help")):
            own.append(word)
        elif name in takes_value:
            if "=" in word:
                own.append(word)
            elif i + 1 < len(words):
                own += [word, words[i + 1]]
                i += 1
            else:
                raise ValueError(f"{word} needs a value")
        else:
            rest.append(word)
        i += 1
    return own, rest


def resolve_module(command: str) -> tuple[list[str], bool]:
    """`python -m` words for a seedpipe command (or a dotted module), and whether it is one of
    seedpipe's commands (so it takes the catalog grammar: --root, --config).

    A seedpipe command runs as `python -m jobs.cli COMMAND`: exactly what `seedpipe COMMAND` runs
    here (the CLI hands it its arguments), with no console script needed on the cluster."""
    from jobs.cli import DELEGATED

    if command in NOT_SUBMITTABLE:
        raise ValueError(f"`seedpipe {command}` runs here, not on the cluster")
    if command in DELEGATED:
        return ["jobs.cli", command], True
    if re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", command):
        import importlib.util

        try:
            found = importlib.util.find_spec(command) is not None
        except (ImportError, ValueError):
            found = False
        if found:
            return [command], False
    commands = ", ".join(sorted(set(DELEGATED) - NOT_SUBMITTABLE))
    raise ValueError(f"unknown command {command!r}: one of {commands}, or a dotted module name")


def _value_of(args: list[str], key: str) -> tuple[int, int, str] | None:
    """(start, length, value) of the last `--key V` / `--key=V` / `key=V` in `args`."""
    flag = "--" + key.replace("_", "-")
    found = None
    for i, word in enumerate(args):
        if word == flag and i + 1 < len(args):
            found = (i, 2, args[i + 1])
        elif word.startswith(flag + "=") or word.startswith(key + "="):
            found = (i, 1, word.split("=", 1)[1])
    return found


def _is_uri(path: str) -> bool:
    return "://" in path


def resolve_root(args: list[str], *, cwd: Path, config_dirs: Sequence[Path]) -> str:
    """The catalog root the command will use, as it resolves it: `--root`/`root=` on the line,
    else the `--config` YAML's `root`, else the default; a local path made absolute from `cwd`."""
    import yaml

    hit = _value_of(args, "root")
    if hit is not None:
        root = hit[2]
    else:
        root = os.environ.get("SEEDPIPE_ROOT", DEFAULT_ROOT)
        config = _value_of(args, "config")
        if config is not None:
            data = yaml.safe_load(_config_path(config[2], cwd, config_dirs).read_text()) or {}
            if isinstance(data, dict) and data.get("root"):
                root = str(data["root"])
    if _is_uri(root):
        return root
    path = Path(root).expanduser()
    return str(path if path.is_absolute() else (cwd / path).resolve())


def _config_path(value: str, cwd: Path, config_dirs: Sequence[Path]) -> Path:
    """`--config VALUE` as the command finds it: a file (relative to `cwd`) or a shipped name."""
    path = Path(value) if Path(value).is_absolute() else cwd / value
    return path if path.is_file() else find_config(value, config_dirs)


def _set_arg(args: list[str], key: str, value: str) -> list[str]:
    """`args` with `--key value` in place of the key's occurrences (or appended)."""
    flag = "--" + key.replace("_", "-")
    out: list[str] = []
    skip = False
    for i, word in enumerate(args):
        if skip:
            skip = False
            continue
        if word == flag and i + 1 < len(args):
            skip = True
            continue
        if word.startswith(flag + "=") or word.startswith(key + "="):
            continue
        out.append(word)
    return [*out, flag, value]


def _ship_config(
    args: list[str], *, cwd: Path, tree: Path, config_dirs: Sequence[Path]
) -> list[str]:
    """`--config FILE` rewritten relative to the shipped tree; a shipped config's name stays."""
    hit = _value_of(args, "config")
    if hit is None:
        return args
    start, length, value = hit
    candidate = _config_path(value, cwd, config_dirs).resolve()
    if not (Path(value) if Path(value).is_absolute() else cwd / value).is_file():
        return args  # a shipped config's name: it resolves the same way on the cluster
    try:
        relative = candidate.relative_to(tree)
    except ValueError:
        raise ValueError(
            f"--config {value}: {candidate} is outside the shipped tree {tree}; "
            "copy it into the tree (e.g. jobs/configs/) or pass its keys as overrides"
        ) from None
    return [*args[:start], "--config", str(relative), *args[start + length :]]


def shipped_files(tree: Path, excludes: Sequence[str]) -> list[tuple[Path, int]]:
    """(path, bytes) of every file Ray would pack from `tree` with `excludes`, by Ray's own walk
    (its default excludes, `.gitignore` and `.rayignore` files included)."""
    from ray._private import ray_constants
    from ray._private.runtime_env import packaging

    files: list[tuple[Path, int]] = []

    def handler(path: Path) -> None:
        if path.is_file() and not path.is_symlink():
            files.append((path, path.stat().st_size))

    patterns = ray_constants.get_runtime_env_default_excludes() + list(excludes)
    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    quiet = logging.getLogger("seedpipe.submit.walk")
    quiet.setLevel(logging.WARNING)  # Ray's walk logs every .gitignore it honours
    packaging._dir_travel(tree, [packaging._get_excludes(tree, patterns)], handler,
                          include_gitignore=include_gitignore, logger=quiet)  # fmt: skip
    return files


def package_limit() -> int:
    from ray._private.runtime_env import packaging

    return packaging.GCS_STORAGE_MAX_SIZE


def check_package_size(tree: Path, excludes: Sequence[str], limit: int | None = None) -> int:
    """Total bytes to ship; a ValueError naming the largest top-level entries when over `limit`."""
    limit = package_limit() if limit is None else limit
    files = shipped_files(tree, excludes)
    total = sum(size for _, size in files)
    if total > limit:
        by_top: dict[str, int] = {}
        for path, size in files:
            top = path.relative_to(tree).parts[0]
            by_top[top] = by_top.get(top, 0) + size
        biggest = sorted(by_top.items(), key=lambda kv: -kv[1])[:5]
        raise ValueError(
            f"the tree to ship ({tree}) holds {_mib(total)} of files, over Ray's package limit of "
            f"{_mib(limit)}; largest: " + ", ".join(f"{k} {_mib(v)}" for k, v in biggest)
            + ". Move data out of the tree (catalog data belongs under --root) or list it in .rayignore"
        )  # fmt: skip
    return total


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:48] or "job"


def build_submission(command: str, args: Sequence[str], *, name: str = "", cwd: Path | None = None,
                     tree: Path = PROJECT_ROOT, env: dict[str, str] | None = None) -> Submission:  # fmt: skip
    """Everything `submit` sends for `seedpipe <command> <args>`, resolved here (no Ray contact)."""
    from jobs.config import CONFIG_DIR
    from pipelines.cli_common import WORKER_ENV_KEYS

    cwd = Path.cwd() if cwd is None else cwd
    env = dict(os.environ if env is None else env)
    module, is_command = resolve_module(command)
    args = list(args)
    excludes = list(EXCLUDES)
    job_env: dict[str, str] = {}
    root = None
    if is_command:
        root = resolve_root(args, cwd=cwd, config_dirs=[CONFIG_DIR])
        args = _set_arg(
            _ship_config(args, cwd=cwd, tree=tree, config_dirs=[CONFIG_DIR]), "root", root
        )
        job_env["SEEDPIPE_ROOT"] = root
        if not _is_uri(root) and Path(root).is_relative_to(tree):
            excludes.append("/" + str(Path(root).relative_to(tree)))  # catalog data never ships
        if _is_uri(root) and not env.get("MLFLOW_TRACKING_URI"):
            raise ValueError(f"root {root} is not a local path: set MLFLOW_TRACKING_URI to the cluster's "
                             "tracking server (cluster/README.md)")  # fmt: skip
    if env.get("MLFLOW_TRACKING_URI"):
        job_env["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    for key in ("SEEDPIPE_DEBUG",):
        if key in env:
            job_env[key] = env[key]
    assert not set(job_env) & set(WORKER_ENV_KEYS), (
        "a shipped env var would conflict with ray.init's"
    )
    runtime_env: dict[str, Any] = {"env_vars": job_env}
    if (tree / "pyproject.toml").is_file():
        runtime_env |= {"working_dir": str(tree), "excludes": excludes}
    else:  # an installed (non-editable) seedpipe: ship its packages instead of a checkout
        import jobs
        import pipelines
        import seed_core

        runtime_env["py_modules"] = [
            str(Path(m.__file__).parent) for m in (seed_core, pipelines, jobs)
        ]
    words = ["python", "-m", *module, *args]
    label = name or command
    metadata = {"name": label, "seedpipe_command": command}
    submission_id = f"{_slug(label)}-{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    return Submission(submission_id=submission_id, entrypoint=shlex.join(words),
                      runtime_env=runtime_env, metadata=metadata, root=root)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Talking to the job server


def client(address: str | None) -> Any:
    """A JobSubmissionClient for `address` (Ray's own defaults when None); a clear error if the
    job server cannot be reached."""
    from ray.job_submission import JobSubmissionClient

    # packaging's per-folder "Ignoring upload ... .gitignore" lines say nothing a user needs
    logging.getLogger("ray._private.runtime_env.packaging").setLevel(logging.WARNING)
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = (
            address
            or os.environ.get("RAY_API_SERVER_ADDRESS")
            or os.environ.get("RAY_ADDRESS")
            or "a local Ray"
        )
        raise ValueError(f"cannot reach the Ray job server at {where}: {str(err).splitlines()[0]} "
                         "(start a cluster, see cluster/README.md, or pass --address http://HEAD:8265)") from None  # fmt: skip


def submit(submission: Submission, address: str | None, *, entrypoint_num_cpus: float = 0.0) -> str:
    """Submit; returns the submission id. Retries the job server's 'no agent yet' for a minute
    (a head that just started)."""
    if "working_dir" in submission.runtime_env:
        check_package_size(
            Path(submission.runtime_env["working_dir"]), submission.runtime_env["excludes"]
        )
    jobs_client = client(address)
    deadline = time.monotonic() + 60
    while True:
        try:
            return jobs_client.submit_job(entrypoint=submission.entrypoint, submission_id=submission.submission_id,
                                          runtime_env=submission.runtime_env, metadata=submission.metadata,
                                          entrypoint_num_cpus=entrypoint_num_cpus or None)  # fmt: skip
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def follow_logs(jobs_client: Any, submission_id: str, out: Any = None) -> str:
    """Stream the job's log lines to `out` until the job ends; returns its final status."""
    import asyncio

    out = out or sys.stdout

    async def stream() -> None:
        async for lines in jobs_client.tail_job_logs(submission_id):
            out.write(lines)
            out.flush()

    try:
        asyncio.run(stream())
    except Exception as err:  # the websocket can drop (proxy, head restart): fall back to polling
        print(f"(log stream lost: {err}; polling)", file=sys.stderr)
        seen = 0
        while str(jobs_client.get_job_status(submission_id)) not in TERMINAL:
            text = jobs_client.get_job_logs(submission_id)
            out.write(text[seen:])
            seen = len(text)
            time.sleep(2)
        out.write(jobs_client.get_job_logs(submission_id)[seen:])
    # tail_job_logs ends when the driver exits; the status may lag it by a moment
    deadline = time.monotonic() + 30
    while (
        status := str(jobs_client.get_job_status(submission_id))
    ) not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
    return status


def exit_status(info: Any) -> int:
    status = str(info.status)
    if status == "SUCCEEDED":
        return 0
    if status == "FAILED" and info.driver_exit_code:
        return int(info.driver_exit_code)
    return 1


def _status_line(info: Any) -> str:
    message = f": {info.message}" if info.message else ""
    return f"job {info.submission_id} {info.status}{message}"


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    """Submit a seedpipe stage or job to a Ray cluster (python -m jobs.cli COMMAND ARGS there)."""
    own, rest = split_own_flags(list(argv or []), SubmitConfig)
    usage = (
        "seedpipe submit COMMAND [its args ...] [--address URL] [--wait | --no-wait] [--name NAME]"
    )
    if not rest:
        if any(w in ("-h", "--help") for w in own):
            print(f"usage: {usage}\n\n{main.__doc__}\n")
            for f in dataclasses.fields(SubmitConfig):
                flag = "--wait | --no-wait" if f.name == "wait" else "--" + f.name.replace("_", "-")
                print(f"  {flag:22s} {field_docs(SubmitConfig).get(f.name, '')}")
            print("\nEvery other word goes to the command (`seedpipe COMMAND --help` lists its options);"
                  "\nwords after a literal -- are never read as submit's own.")  # fmt: skip
            return 0
        raise ConfigError(f"a command to submit is required: {usage}")
    config = parse_command(
        SubmitConfig, own, prog="seedpipe submit", description=main.__doc__ or ""
    )
    submission = build_submission(rest[0], rest[1:], name=config.name)
    submission_id = submit(
        submission, config.address, entrypoint_num_cpus=config.entrypoint_num_cpus
    )
    print(f"submitted {submission_id}: {submission.entrypoint}", flush=True)
    if submission.root is not None:
        tracking = submission.runtime_env["env_vars"].get("MLFLOW_TRACKING_URI") or (
            "the cluster's MLFLOW_TRACKING_URI, else the embedded store under the root"
        )
        print(f"  catalog root {submission.root} (the same path or URI must reach every node); "
              f"tracking {tracking}", flush=True)  # fmt: skip
    address = f" --address {config.address}" if config.address else ""
    if not config.wait:
        print(f"  follow: seedpipe jobs logs {submission_id} --follow{address}\n"
              f"  stop:   seedpipe jobs stop {submission_id}{address}", flush=True)  # fmt: skip
        return 0
    jobs_client = client(config.address)
    try:
        follow_logs(jobs_client, submission_id)
    except KeyboardInterrupt:
        print(
            f"\nstopped following; the job keeps running (seedpipe jobs stop {submission_id}{address})"
        )
        return 130
    info = jobs_client.get_job_info(submission_id)
    print(_status_line(info), flush=True)
    return exit_status(info)


# ---------------------------------------------------------------------------------------------
# seedpipe jobs [logs ID | stop ID ...]


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def _duration(info: Any) -> str:
    if not info.start_time:
        return "-"
    end = info.end_time or time.time() * 1000
    seconds = int((end - info.start_time) / 1000)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def list_jobs(config: JobsConfig, out: Any = None) -> list[Any]:
    out = out or sys.stdout
    jobs = [j for j in client(config.address).list_jobs() if j.submission_id]
    jobs.sort(key=lambda j: j.start_time or 0, reverse=True)
    if config.limit:
        jobs = jobs[: config.limit]
    print(
        f"{'SUBMISSION ID':44s} {'STATUS':10s} {'STARTED':19s} {'DURATION':>9s}  ENTRYPOINT",
        file=out,
    )
    for j in jobs:
        entry = j.entrypoint if len(j.entrypoint) <= 80 else j.entrypoint[:77] + "..."
        print(f"{j.submission_id:44s} {str(j.status):10s} {_when(j.start_time):19s} {_duration(j):>9s}  {entry}",
              file=out)  # fmt: skip
    if not jobs:
        print("(no jobs)", file=out)
    return jobs


def job_logs(config: JobLogsConfig, out: Any = None) -> str:
    out = out or sys.stdout
    if len(config.ids) != 1:
        raise ValueError("seedpipe jobs logs takes one submission id")
    jobs_client = client(config.address)
    if config.follow:
        status = follow_logs(jobs_client, config.ids[0], out)
        print(_status_line(jobs_client.get_job_info(config.ids[0])), file=out)
        return status
    text = jobs_client.get_job_logs(config.ids[0])
    if config.tail:
        text = "".join(text.splitlines(keepends=True)[-config.tail :])
    out.write(text)
    return str(jobs_client.get_job_status(config.ids[0]))


def stop_jobs(config: JobStopConfig, out: Any = None) -> int:
    out = out or sys.stdout
    jobs_client = client(config.address)
    worst = 0
    for submission_id in config.ids:
        if not jobs_client.stop_job(submission_id):
            print(
                f"job {submission_id} already {jobs_client.get_job_status(submission_id)}", file=out
            )
            continue
        deadline = time.monotonic() + config.timeout_s
        while (status := str(jobs_client.get_job_status(submission_id))) not in TERMINAL:
            if time.monotonic() > deadline:
                print(
                    f"job {submission_id} still {status} after {config.timeout_s:.0f} s", file=out
                )
                worst = 1
                break
            time.sleep(0.5)
        else:
            print(f"job {submission_id} {status}", file=out)
    return worst


@cli_main
def jobs_main(argv: Sequence[str] | None = None) -> int:
    """List recent Ray jobs; `logs ID` prints one's logs, `stop ID ...` stops jobs."""
    argv = list(argv or [])
    if argv and argv[0] == "logs":
        config = parse_command(JobLogsConfig, argv[1:], prog="seedpipe jobs logs", positional="ids",
                               description="Print (or --follow) a submitted job's logs.")  # fmt: skip
        status = job_logs(config)
        return 0 if status in ("SUCCEEDED", "RUNNING", "PENDING") else 1
    if argv and argv[0] == "stop":
        config = parse_command(JobStopConfig, argv[1:], prog="seedpipe jobs stop", positional="ids",
                               description="Stop submitted jobs and wait for them to end.")  # fmt: skip
        return stop_jobs(config)
    config = parse_command(
        JobsConfig, argv, prog="seedpipe jobs", description=jobs_main.__doc__ or ""
    )
    list_jobs(config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
