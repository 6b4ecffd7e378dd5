"""Each node's own local disk, and a guard that records (and refuses) any touch of another node's.

On a real cluster nothing a node writes to its local disk can be read by another node: each pod or
VM has its own. On one test machine every process sees every folder, so a path handed from the
driver to a worker (a driver's scratch file, a mirror, a temp file) would work here and fail on a
cluster. `NodeFolders` gives each node (and the drivers) its own folder, `SEEDPIPE_SCRATCH` and
`TMPDIR` inside it, and puts a `sitecustomize.py` first on its `PYTHONPATH`: every Python process
of that node (its `ray start`, agents and every worker its raylet starts, which inherit the node's
environment) installs an audit hook (`sys.addaudithook`) that, when the process opens, lists,
creates, renames or removes a path under another node's folder, appends the path, the event and
its pid to `<its own folder>/guard/violations.log` and raises PermissionError. A test asserts that
no node has violations after its jobs (`violations()`).

What the guard sees: the Python-level file events (`open` (builtins and `os.open`), `os.listdir`,
`os.scandir`, `os.mkdir`, `os.remove`, `os.rmdir`, `os.rename`). Native code (pyarrow's
LocalFileSystem, Ray's C++ raylet, a C library's fopen) raises no audit event, so it is not seen.
Each loaded hook appends its pid and command line to `<folder>/guard/loaded.log`: the canary that
says the hook really runs in a node's Ray workers (`loaded(name)`).
"""

from __future__ import annotations

import os
from pathlib import Path

OWN_ENV = "SEEDPIPE_TEST_NODE_DIR"
"""This process's node folder (where its guard logs go)."""
FOREIGN_ENV = "SEEDPIPE_TEST_FOREIGN_DIRS"
"""The other nodes' folders, os.pathsep-separated: what this process must never touch."""
GUARD = "guard"
VIOLATIONS = "violations.log"
LOADED = "loaded.log"

SITECUSTOMIZE = '''\
"""Written by tests/foreign_reads.py: refuse and record any touch of another node's local folders."""


def _install():
    import os
    import sys

    own = os.environ.get("SEEDPIPE_TEST_NODE_DIR")
    foreign = [p.rstrip("/") for p in os.environ.get("SEEDPIPE_TEST_FOREIGN_DIRS", "").split(os.pathsep) if p]
    if not own or not foreign:
        return
    guard = os.path.join(own, "guard")
    roots = frozenset(foreign)
    prefixes = tuple(p + "/" for p in foreign)
    events = {"open": 1, "os.listdir": 1, "os.scandir": 1, "os.mkdir": 1, "os.remove": 1,
              "os.rmdir": 1, "os.rename": 2}
    fspath, fsdecode, getcwd, normpath, getpid = (
        os.fspath, os.fsdecode, os.getcwd, os.path.normpath, os.getpid)

    def append(name, line):
        fd = os.open(os.path.join(guard, name), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode("utf-8", "backslashreplace"))
        finally:
            os.close(fd)

    def hook(event, args):
        count = events.get(event)
        if count is None:
            return
        for arg in args[:count]:
            if arg is None or isinstance(arg, int):
                continue
            try:
                path = fspath(arg)
            except TypeError:
                continue
            if isinstance(path, bytes):
                path = fsdecode(path)
            if not path.startswith("/"):
                try:
                    path = getcwd() + "/" + path
                except OSError:
                    continue
            path = normpath(path)  # judge the clean path ("..", "//", "." resolved as text)
            if not path.startswith(prefixes) and path not in roots:
                continue
            append("violations.log", f"{getpid()} {event} {path}\\n")
            raise PermissionError(f"{event} {path}: another node's local folder (tests/foreign_reads.py)")

    os.makedirs(guard, exist_ok=True)
    try:
        with open("/proc/self/cmdline", "rb") as f:
            cmdline = " ".join(f.read().decode("utf-8", "replace").replace("\\0", " ").split())[:500]
    except OSError:
        cmdline = "?"
    append("loaded.log", f"{getpid()} {cmdline}\\n")
    sys.addaudithook(hook)


_install()
del _install
'''


class NodeFolders:
    """One folder per node name under `base` (`<base>/<name>/{scratch,tmp,guard}`), and the
    environment that makes it that node's local disk and guards the others' (module docstring)."""

    def __init__(self, base: Path, names: list[str]) -> None:
        self.base = Path(base).resolve()
        self.names = list(names)
        self.hook_dir = self.base / "sitecustomize"
        self.hook_dir.mkdir(parents=True, exist_ok=True)
        (self.hook_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
        for name in self.names:
            for sub in ("scratch", "tmp", GUARD):
                (self.folder(name) / sub).mkdir(parents=True, exist_ok=True)

    def folder(self, name: str) -> Path:
        return self.base / name

    def env(self, name: str) -> dict[str, str]:
        """Node `name`'s variables: its scratch and TMPDIR, the guard first on PYTHONPATH, its own
        folder and the other nodes' (for the hook)."""
        assert name in self.names, name
        python_path = os.pathsep.join(
            p for p in (str(self.hook_dir), os.environ.get("PYTHONPATH", "")) if p
        )
        return {
            "SEEDPIPE_SCRATCH": str(self.folder(name) / "scratch"),
            "TMPDIR": str(self.folder(name) / "tmp"),
            "PYTHONPATH": python_path,
            OWN_ENV: str(self.folder(name)),
            FOREIGN_ENV: os.pathsep.join(str(self.folder(n)) for n in self.names if n != name),
        }

    def all_env(self) -> dict[str, dict[str, str]]:
        return {name: self.env(name) for name in self.names}

    def violations(self) -> dict[str, list[str]]:
        """Node name -> the lines of its violations log ("pid event path"), for nodes with any."""
        found = {}
        for name in self.names:
            log = self.folder(name) / GUARD / VIOLATIONS
            if log.is_file() and (lines := log.read_text().splitlines()):
                found[name] = lines
        return found

    def clear_violations(self) -> None:
        for name in self.names:
            (self.folder(name) / GUARD / VIOLATIONS).unlink(missing_ok=True)

    def loaded(self, name: str) -> dict[int, str]:
        """pid -> command line of every process of node `name` whose guard was installed."""
        log = self.folder(name) / GUARD / LOADED
        lines = log.read_text().splitlines() if log.is_file() else []
        return {int(pid): cmd for pid, _, cmd in (line.partition(" ") for line in lines)}
