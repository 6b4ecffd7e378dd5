"""pipelines.storage: one filesystem per root, run folders with a node-local mirror, node scratch.

On a local root a run folder is itself (push and pull do nothing); on an object store (a real moto
S3 server on 127.0.0.1) its files are objects and the mirror is a throwaway cache under the node's
scratch, which a pickled folder rebuilds on the receiving side.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from pipelines.storage import RunFolder, filesystem, is_remote, local_copy, scratch_dir
from tests.s3_server import S3Server


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    server.create_bucket("store")
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3, monkeypatch, tmp_path):
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SEEDPIPE_SCRATCH", str(tmp_path / "scratch"))
    return s3


def test_scratch_follows_rays_temp_dir_rule(monkeypatch, tmp_path):
    """Scratch is `<RAY_TMPDIR or TMPDIR>/ray/seedpipe-scratch/<host>/<purpose>`, or SEEDPIPE_SCRATCH."""
    monkeypatch.delenv("SEEDPIPE_SCRATCH", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "t"))
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    assert scratch_dir("x").parent.parent == tmp_path / "t" / "ray" / "seedpipe-scratch"
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "r"))
    assert scratch_dir("x").parent.parent == tmp_path / "r" / "ray" / "seedpipe-scratch"
    monkeypatch.setenv("SEEDPIPE_SCRATCH", str(tmp_path / "s"))
    assert scratch_dir("x") == tmp_path / "s" / "x" and scratch_dir("x").is_dir()


def test_a_local_run_folder_is_its_own_mirror(tmp_path):
    """On a local root `.local` is the folder, writes land there, and push/pull change nothing."""
    folder = RunFolder(tmp_path / "runs" / "r1")
    assert not folder.remote and folder.local == tmp_path / "runs" / "r1"
    folder.write_text("a.txt", "one")
    folder.push("a.txt")
    assert folder.pull("a.txt") and folder.read_text("a.txt") == "one"
    assert folder.read_text("missing") is None and not folder.pull("missing")
    assert not is_remote(str(tmp_path)) and filesystem(str(tmp_path))[1] == str(tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_store_run_folder_writes_objects_and_mirrors_them_per_node(s3_env, tmp_path):
    """On s3:// the files are objects, pull fetches what another process pushed, a pickled folder
    gets the receiver's own mirror, and a mirror copy the store no longer has is dropped."""
    uri = "s3://store/root/runs/job-a"
    folder = RunFolder(uri)
    assert folder.remote and str(folder.local).startswith(str(tmp_path / "scratch"))
    folder.write_text("mlflow_run_id", "abc\n")
    (folder.local / "export").mkdir()
    (folder.local / "export" / "w.bin").write_bytes(b"\x00\x01")
    folder.push("export")
    keys = s3_env.keys("store", "root/runs/job-a/")
    assert {"root/runs/job-a/mlflow_run_id", "root/runs/job-a/export/w.bin"} <= set(keys)

    other_node = tmp_path / "other-node"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SEEDPIPE_SCRATCH", str(other_node))
        there = pickle.loads(pickle.dumps(folder))
        assert str(there.local).startswith(str(other_node)) and there.local != folder.local
        assert not (there.local / "export").exists()
        assert (
            there.pull("export") and (there.local / "export" / "w.bin").read_bytes() == b"\x00\x01"
        )
        assert there.read_text("mlflow_run_id") == "abc\n"

    (folder.local / "stale.txt").write_text("left from a deleted folder of the same name")
    assert not folder.pull("stale.txt") and not (folder.local / "stale.txt").exists()
    assert folder.exists("mlflow_run_id") and not folder.exists("stale.txt")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_local_copy_fetches_a_store_folder_once(s3_env, tmp_path):
    """A store URI becomes this node's cached local copy (a local path passes through as it is)."""
    folder = RunFolder("s3://store/root/runs/job-b")
    (folder.local / "tok").mkdir()
    (folder.local / "tok" / "vocab.json").write_text("{}")
    folder.push("tok")
    copy = local_copy(folder.uri_of("tok"))
    assert copy != str(folder.local / "tok") and (tmp_path / "scratch") in Path(copy).parents
    assert Path(copy, "vocab.json").read_text() == "{}"
    assert local_copy(copy) == copy
    with pytest.raises(FileNotFoundError):
        local_copy("s3://store/root/runs/nothing-here")
