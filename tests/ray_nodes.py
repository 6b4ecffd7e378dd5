"""A Ray cluster of several nodes on this one machine, for tests: a head and named worker nodes.

    with RayNodes(tmp_path, nodes={"node_a": 1, "node_b": 1}) as cluster:
        cluster.address          # "127.0.0.1:PORT", for `--address` / ray.init
        cluster.node_id("node_a")
        cluster.kill_node("node_b"); cluster.restart_node("node_b")

A cluster user's nodes differ in their environment: `env` is added to every process the harness
starts (each node's `ray start`, hence its raylet and the workers it starts, and the drivers that
tests start with `cluster.env(name)`), `node_env[name]` over it for node (or driver) `name` only,
e.g. a store's credentials everywhere and a scratch folder per node:

    RayNodes(tmp_path, env=s3.env(), node_env={"node_a": {"SEEDPIPE_SCRATCH": "/a"}, ...})

Every node is a `ray start --block` process in a session of its own, with
`--node-ip-address 127.0.0.1` (what the node advertises; Ray's gRPC servers listen on every
interface whatever it is given, Ray 2.60 has no option for that) and `RAY_AUTH_MODE=disabled`.
Worker nodes carry a custom resource named after them (`{"node_a": 1}`) so a test can tell them
apart and target them. They start one after the other: two `ray start --address` at the same
moment on 2 cores timed out (PITFALLS.md). Ports are free ones picked here, or the OS's, so the
nodes of one cluster, and other clusters on the machine, do not collide.

Why a node is killed by more than its process group: the raylet starts each worker process in a
process group of its own (seen here: `killpg` left them running; tests/process_tree.py saw the
same), though in the node's session. A kill takes every process of the node's session, every
process whose environment carries the node's marker (`MARKER`, inherited from `ray start`, so an
orphan is found too) and their descendants. `ray stop` is never used: it stops every Ray on the
machine, other tests' and other sessions' too.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

MARKER = "SEEDPIPE_TEST_RAY_NODE"
"""Environment variable on every process of a node: `<cluster tag>/<node name>`."""
HEAD = "head"

_DRIVER = textwrap.dedent("""
    import json, sys
    import ray
    ray.init(address=sys.argv.pop(1), log_to_driver=False, logging_level="ERROR")
    def reply(value):
        print("REPLY " + json.dumps(value), flush=True)
""")
# Waits until every wanted node is alive in the GCS (a restarted node's old id does not count:
# the GCS notices a killed node only at its next health check); replies {name: node id}.
_WAIT_NODES = textwrap.dedent("""
    import time
    names, timeout, skip = json.loads(sys.argv[1]), float(sys.argv[2]), set(json.loads(sys.argv[3]))
    deadline = time.monotonic() + timeout
    while True:
        found = {}
        for node in ray.nodes():
            res = node["Resources"]
            if node["Alive"] and node["NodeID"] not in skip:
                found |= {n: node["NodeID"] for n in names
                          if (n == "head" and "node:__internal_head__" in res) or n in res}
        if set(found) == set(names) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    reply(found)
""")


def free_port() -> int:
    """A port free on 127.0.0.1 now (the OS's pick; another process could take it before Ray
    binds it, which start-up reports)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class RayNodes:
    """A head and named worker nodes started with `ray start`; see the module docstring."""

    def __init__(
        self,
        workdir: Path,
        *,
        nodes: dict[str, int] | None = None,
        head_cpus: int = 0,
        dashboard: bool = False,
        object_store_mb: int = 200,
        start_timeout_s: float = 120.0,
        env: Mapping[str, str] | None = None,
        node_env: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        """`nodes`: worker node name -> its CPUs. `head_cpus=0` by default: the head takes no
        task or actor that asks for a CPU, so training workers land on the named nodes only
        (and with 1-CPU nodes a 2-worker job holds every CPU: its data tasks must ask for none,
        `jobs.scheduling.training_rows`).
        `dashboard`: start the head's dashboard (the state API, and the job server that
        `seedpipe submit` needs) on 127.0.0.1 at a free port; off, the head starts faster.
        `env`: variables for every process of every node and every driver (`env(name)`);
        `node_env`: name ('head', a worker node's, or a driver's as passed to `env`) -> variables
        for that one, over `env`. Both keep applying to a node that `restart_node` starts again.
        The harness's own (auth off, no usage stats, the venv first on PATH, the marker) win."""
        self.workdir = Path(workdir)
        self.nodes = dict(nodes if nodes is not None else {"node_a": 1, "node_b": 1})
        assert HEAD not in self.nodes, "the head is always there, named 'head'"
        self.head_cpus, self.dashboard, self.start_timeout_s = head_cpus, dashboard, start_timeout_s
        self.object_store_bytes = object_store_mb << 20
        self.extra_env = dict(env or {})
        self.node_env = {name: dict(values) for name, values in (node_env or {}).items()}
        # Ray's unix sockets live under the temp dir: keep its path short (108-byte limit).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rn", dir="/tmp"))
        self.tag = f"{self.temp_dir.name}-{uuid.uuid4().hex[:6]}"
        self.port = free_port()
        self.dashboard_port = free_port() if dashboard else 0
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._ids: dict[str, str] = {}
        self._stopped = False
        # pytest-timeout's signal method still runs fixture teardown; this covers other exits
        atexit.register(self.stop)

    # ---- addresses ----

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        assert self.dashboard, "started without dashboard=True"
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self, name: str = HEAD) -> dict[str, str]:
        """The environment every process of node `name` gets: auth off on loopback, no usage
        stats, the venv's bin first on PATH (a job's `python -m ...` entrypoint runs the first
        python on the head's PATH, PITFALLS.md), the marker. Tests start their drivers with it
        too (any name), so `stop` kills whatever of theirs is left. `env` and `node_env[name]`
        (the constructor's) come over this process's environment."""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", MARKER)}
        env |= self.extra_env | self.node_env.get(name, {})
        env |= {
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            MARKER: f"{self.tag}/{name}",
        }
        return env

    # ---- life cycle ----

    def start(self) -> RayNodes:
        """Start the head, then each worker node in turn, then wait until the GCS shows all of
        them alive; on any failure stop what was started and raise with the logs' tail."""
        try:
            for name in [HEAD, *self.nodes]:
                self._start_node(name)
                self._wait_alive([name])
        except BaseException:
            self.stop()
            raise
        return self

    def node_id(self, name: str) -> str:
        """The GCS node id (hex) of node `name` as last started ('head' for the head)."""
        return self._ids[name]

    def session_id(self, name: str) -> int:
        """The pid of node `name`'s `ray start`: the id of its session and process group."""
        return self._procs[name].pid

    def kill_node(self, name: str, timeout_s: float = 30.0) -> None:
        """SIGKILL every process of node `name` (its `ray start`, raylet, agents and the workers
        the raylet started) and wait until they are gone. The GCS notices the node's death
        later (its health check); the id stays in `node_id` until a restart."""
        proc = self._procs.pop(name, None)
        if proc is not None and proc.poll() is not None:
            # already exited and reaped: its pid may be another process's now (pid_max is 32768
            # here and pids wrap within a test run), so neither its session nor its group is ours
            proc = None
        victims = self._node_processes(name, proc)
        if proc is not None:
            with _gone():
                os.killpg(proc.pid, signal.SIGKILL)
        for p in victims:
            with _gone():
                p.kill()
        psutil.wait_procs(victims, timeout=timeout_s)
        if proc is not None:
            proc.wait(timeout=timeout_s)

    def restart_node(self, name: str) -> str:
        """Kill node `name` if it runs, start it again with the same resources, wait until a new
        node of that name is alive; returns its (new) node id."""
        assert name in self.nodes, f"only worker nodes restart, not {name!r}"
        self.kill_node(name)
        old = self._ids.pop(name, None)
        self._start_node(name)
        self._wait_alive([name], not_ids=frozenset({old} if old else ()))
        return self._ids[name]

    def stop(self) -> None:
        """Kill every node (workers first) and anything else carrying this cluster's marker;
        remove the temp dir. Safe to call twice, and after a failed start."""
        if self._stopped:
            return
        self._stopped = True
        try:
            for name in [n for n in self._procs if n != HEAD] + [HEAD]:
                if name in self._procs:
                    self.kill_node(name)
            stray = _marked(lambda value: value.startswith(f"{self.tag}/"))
            for p in stray:
                with _gone():
                    p.kill()
            psutil.wait_procs(stray, timeout=30)
        finally:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            atexit.unregister(self.stop)

    def __enter__(self) -> RayNodes:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---- internals ----

    def log(self, name: str) -> Path:
        return self.workdir / f"ray-{name}.log"

    def _start_node(self, name: str) -> None:
        common = ["--block", "--node-ip-address", "127.0.0.1", "--num-gpus", "0",
                  "--object-store-memory", str(self.object_store_bytes),
                  # random worker and agent ports: nodes on one host must not collide
                  "--min-worker-port", "0", "--max-worker-port", "0",
                  "--dashboard-agent-listen-port", str(free_port()), "--disable-usage-stats"]  # fmt: skip
        if name == HEAD:
            cmd = ["--head", "--port", str(self.port), "--num-cpus", str(self.head_cpus),
                   "--temp-dir", str(self.temp_dir), "--ray-client-server-port", str(free_port()),
                   "--include-dashboard", str(self.dashboard).lower()]  # fmt: skip
            if self.dashboard:
                cmd += ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port)]  # fmt: skip
        else:
            # --temp-dir is the head's only: the other nodes use the head's (PITFALLS.md)
            cmd = ["--address", self.address, "--num-cpus", str(self.nodes[name]),
                   "--resources", json.dumps({name: 1})]  # fmt: skip
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log(name).open("ab") as log:
            self._procs[name] = subprocess.Popen(
                [str(Path(sys.executable).parent / "ray"), "start", *cmd, *common],
                env=self.env(name), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: killed as a whole
            )  # fmt: skip

    def _wait_alive(self, names: list[str], not_ids: frozenset[str] = frozenset()) -> None:
        """Until every node of `names` is alive in the GCS (and is not one of `not_ids`: a
        restarted node must be the new one); raise with the logs' tail after the timeout."""
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            for name in names:
                proc = self._procs.get(name)
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(
                        self._failure(f"`ray start` of {name} exited {proc.returncode}")
                    )
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(
                    self._failure(f"nodes {names} not alive in {self.start_timeout_s:.0f} s")
                )
            try:
                found = self.query(_WAIT_NODES, json.dumps(names), str(max(1.0, left - 10)),
                                   json.dumps(sorted(not_ids)), timeout_s=left + 5)  # fmt: skip
            except (RuntimeError, subprocess.TimeoutExpired):  # the GCS is not up yet
                time.sleep(1)
                continue
            if set(found) == set(names):
                self._ids.update(found)
                return
            time.sleep(1)

    def query(self, code: str, *args: str, timeout_s: float = 60.0, as_name: str = "probe") -> Any:
        """Run `code` in a fresh interpreter connected to the cluster as a driver (`ray`, `json`
        and `sys` imported, `args` in `sys.argv[1:]`) and return the value it passes to
        `reply(value)` (JSON). A fresh interpreter: the test process stays unconnected, so a
        session-wide local Ray in it is untouched. Its environment is `env(as_name)`."""
        out = subprocess.run([sys.executable, "-c", _DRIVER + textwrap.dedent(code), self.address, *args],
                             env=self.env(as_name), capture_output=True, text=True, timeout=timeout_s)  # fmt: skip
        replies = [line for line in out.stdout.splitlines() if line.startswith("REPLY ")]
        if out.returncode != 0 or not replies:
            raise RuntimeError(
                f"driver exited {out.returncode} without a reply:\n{out.stderr[-2000:]}"
            )
        return json.loads(replies[-1][len("REPLY ") :])

    def _failure(self, what: str) -> str:
        logs = [f"--- {self.log(n)} ---\n{tail(self.log(n))}" for n in [HEAD, *self.nodes]]
        session = self.temp_dir / "session_latest" / "logs"
        logs += [f"--- {p} ---\n{tail(p, 15)}" for p in sorted(session.glob("raylet*.err"))]
        return f"multi-node Ray: {what}\n" + "\n".join(logs)

    def _node_processes(
        self, name: str, proc: subprocess.Popen[bytes] | None
    ) -> list[psutil.Process]:
        """Node `name`'s processes: its session (the raylet's workers each lead a process group
        of their own, but stay in the session), those with its marker, their descendants."""
        found: dict[int, psutil.Process] = {}
        roots = _marked(lambda value: value == f"{self.tag}/{name}")
        if proc is not None:
            for p in psutil.process_iter():
                with _gone():
                    if os.getsid(p.pid) == proc.pid:
                        roots.append(p)
        for p in roots:
            found[p.pid] = p
            with _gone():
                found |= {c.pid: c for c in p.children(recursive=True)}
        found.pop(os.getpid(), None)
        return list(found.values())


def _marked(match: Callable[[str], bool]) -> list[psutil.Process]:
    """This user's processes whose MARKER environment value satisfies `match`."""
    out = []
    for p in psutil.process_iter():
        with _gone():
            value = p.environ().get(MARKER)
            if value is not None and match(value):
                out.append(p)
    return out


def _gone() -> contextlib.suppress:
    """Ignore a process that vanished (or is not ours) while it is inspected or killed."""
    return contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError)
