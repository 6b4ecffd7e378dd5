"""Where bytes live: the root's filesystem (local path or object store), and each node's scratch.

- **One filesystem per URI.** `filesystem(uri)` gives a pyarrow filesystem and the path inside it
  for a local path or any URI pyarrow resolves (`s3://`, `gs://`, `abfs://`, `file://`); endpoint and
  credentials come from the standard variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...), so
  nothing in seedpipe's configs is store-specific. Every catalog, run-folder and checkpoint read or
  write goes through it, never `open()` on a path string.
- **Node-local scratch is a cache.** `scratch_dir(purpose)` is a folder on this node's own disk,
  `seedpipe-scratch/<host>/` under Ray's temp dir (`$RAY_TMPDIR/ray`, else `$TMPDIR/ray`, else
  `/tmp/ray`, Ray's own rule), or `SEEDPIPE_SCRATCH` when set. What is there can be deleted at any
  time: staging before an upload, a run folder's local mirror, downloaded models. Nothing a node
  writes there is read by another node.
- **A run folder on any root** (`RunFolder`): code reads and writes a node-local mirror (`.local`,
  a Path, so the libraries that want a directory get one) and `push`es what it wrote to the root's
  filesystem, `pull`s what another process wrote. On a local root the mirror is the folder itself
  and push/pull do nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
from pathlib import Path

import pyarrow.fs as pafs


def is_remote(uri: str | os.PathLike[str]) -> bool:
    """True for a URI whose filesystem is not this node's disk (`s3://`, `gs://`, ...)."""
    text = str(uri)
    return "://" in text and not text.startswith("file://")


def filesystem(uri: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a filesystem URI; local paths are made
    absolute (a relative root means the same folder to every process of one node)."""
    text = str(uri)
    if text.startswith("file://"):
        return pafs.LocalFileSystem(), str(Path(text[len("file://") :]).resolve())
    if "://" in text:
        fs, path = pafs.FileSystem.from_uri(text)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())


def join_uri(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def scratch_dir(purpose: str) -> Path:
    """This node's throwaway folder for `purpose` (created). See the module docstring."""
    base = os.environ.get("SEEDPIPE_SCRATCH")
    if not base:
        # Ray's own rule for its temp dir (ray._common.utils.get_default_ray_temp_dir), without
        # importing Ray: RAY_TMPDIR, else TMPDIR, else /tmp; then "ray"
        system = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
        # one folder per host name: a shared /tmp (it happens) still never mixes two nodes' caches
        base = str(Path(system, "ray", "seedpipe-scratch", socket.gethostname()))
    path = Path(base, purpose)
    path.mkdir(parents=True, exist_ok=True)
    return path


REMOTE_URI_FILE = ".remote_uri"
"""In a remote run folder's local mirror: the URI of the folder it mirrors."""


def mirror_parent(parent_uri: str) -> Path:
    """The local folder under which the mirrors of the run folders in `parent_uri` live; a local
    `parent_uri` is its own."""
    if not is_remote(parent_uri):
        return Path(filesystem(parent_uri)[1])
    return scratch_dir("runs") / uri_key(parent_uri.rstrip("/"))


def uri_key(uri: str) -> str:
    """A short, filesystem-safe name for a URI (a scratch folder per remote folder)."""
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


def upload(local: Path, fs: pafs.FileSystem, path: str) -> None:
    """Copy a local file or folder (recursively) to `path` on `fs`. Files are written whole by
    pyarrow (one object put per file on an object store)."""
    if local.is_dir():
        fs.create_dir(path, recursive=True)
        pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs, use_threads=True)  # fmt: skip
    else:
        parent = path.rsplit("/", 1)[0]
        fs.create_dir(parent, recursive=True)
        pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)  # fmt: skip


def download(fs: pafs.FileSystem, path: str, local: Path) -> bool:
    """Copy `path` (a file or a folder, recursively) from `fs` to `local`; False if absent."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return False
    if info.type == pafs.FileType.Directory:
        local.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(path, str(local), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem(), use_threads=True)  # fmt: skip
    else:
        local.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(path, str(local), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())  # fmt: skip
    return True


class RunFolder:
    """A run folder on the root's filesystem with a node-local mirror (module docstring)."""

    def __init__(self, uri: str | os.PathLike[str]) -> None:
        self.uri = str(uri)
        self.fs, self.path = filesystem(self.uri)
        self.remote = is_remote(self.uri)
        parent = self.uri.rstrip("/").rsplit("/", 1)[0]
        self.local = mirror_parent(parent) / self.name if self.remote else Path(self.path)
        self.local.mkdir(parents=True, exist_ok=True)
        if self.remote:  # so a sync that finds the mirror knows whose it is
            (self.local / REMOTE_URI_FILE).write_text(self.uri)

    @classmethod
    def from_mirror(cls, local: Path) -> RunFolder:
        """The run folder a local mirror (or a local run folder) belongs to."""
        marker = local / REMOTE_URI_FILE
        return cls(marker.read_text().strip() if marker.is_file() else local)

    @property
    def name(self) -> str:
        return Path(self.path).name

    def remote_path(self, name: str = "") -> str:
        return join_uri(self.path, name) if name else self.path

    def push(self, name: str) -> None:
        """Upload `<local>/<name>` (file or folder) to the run folder on the root's filesystem."""
        if self.remote:
            upload(self.local / name, self.fs, self.remote_path(name))

    def pull(self, name: str) -> bool:
        """Make `<local>/<name>` the run folder's copy; False when the run folder has none."""
        if not self.remote:
            return (self.local / name).exists()
        if download(self.fs, self.remote_path(name), self.local / name):
            return True
        # the store has none: a mirror left from a deleted folder of the same URI must not win
        stale = self.local / name
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        elif stale.exists():
            stale.unlink()
        return False

    def write_text(self, name: str, text: str) -> Path:
        """Write a small file in both places (the remote one as one whole object)."""
        local = self.local / name
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, local)
        if self.remote:
            with self.fs.open_output_stream(self.remote_path(name)) as f:
                f.write(text.encode())
        return local

    def read_text(self, name: str) -> str | None:
        """The run folder's copy of a small file (None when absent)."""
        if not self.remote:
            path = self.local / name
            return path.read_text() if path.is_file() else None
        try:
            with self.fs.open_input_stream(self.remote_path(name)) as f:
                return f.read().decode()
        except FileNotFoundError:  # a store that fails otherwise raises: absent is not unknown
            return None

    def exists(self, name: str) -> bool:
        if not self.remote:
            return (self.local / name).exists()
        return self.fs.get_file_info(self.remote_path(name)).type != pafs.FileType.NotFound

    def uri_of(self, name: str) -> str:
        """`name` in the run folder as workers and later commands should see it: a store URI on
        an object-store root (they fetch it with `local_copy`), the local path otherwise."""
        return join_uri(self.uri, name) if self.remote else str(self.local / name)

    def __reduce__(self) -> tuple[type[RunFolder], tuple[str]]:
        # Sent to a Ray worker, a run folder gets that node's own mirror, not the sender's.
        return (RunFolder, (self.uri,))

    def __repr__(self) -> str:
        return f"RunFolder({self.uri!r})"


def local_copy(ref: str) -> str:
    """A local path for `ref`: itself when local, else this node's cached copy of the store folder
    or file (downloaded once per node; the copy is complete once its marker is written)."""
    if not is_remote(ref):
        return ref
    local = scratch_dir("fetched") / uri_key(ref) / Path(ref.rstrip("/")).name
    marker = local.parent / ".complete"
    if not marker.is_file():
        fs, path = filesystem(ref)
        if not download(fs, path, local):
            raise FileNotFoundError(f"{ref} does not exist")
        marker.write_text(ref)
    return str(local)
