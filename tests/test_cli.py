"""The seedpipe console script: installed, --help and version work."""

import shutil
import subprocess
import sys
from pathlib import Path

from jobs.cli import main, version_info


def test_version_lists_the_stack(capsys):
    """`seedpipe version` prints seedpipe's and torch's versions (torch pinned to 2.13.0)."""
    assert main(["version"]) == 0
    out = capsys.readouterr().out
    assert "seedpipe" in out and version_info()["torch"].startswith("2.13.0")


def test_presets_lists_every_preset(capsys):
    """`seedpipe presets` lists tiny, small and the paper presets with their codebooks."""
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("tiny", "small", "paper-v1", "paper-v2"):
        assert name in out
    assert "8192 x 32" in out


def test_console_script_help():
    """The installed `seedpipe` entry point answers --help with its subcommands."""
    exe = shutil.which("seedpipe", path=str(Path(sys.executable).parent))
    assert exe, "seedpipe console script not installed in this environment"
    out = subprocess.run(
        [exe, "--help"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "version" in out and "presets" in out


def test_stage_subcommands_delegate_to_their_modules(capsys, tmp_path):
    """`seedpipe features ... --dry-run` runs pipelines.features.main: it prints the plan and writes nothing."""
    from pipelines.catalog import Catalog
    from tests.raw_fixture import make_raw_corpus

    make_raw_corpus(Catalog(tmp_path), "c", num_shards=2, per_shard=2)
    assert (
        main(
            ["features", "--root", str(tmp_path), "--corpus", "c", "--encoder", "tiny", "--dry-run"]
        )
        == 0
    )
    assert "2 to build, 0 up to date, 0 stale, 0 orphaned" in capsys.readouterr().out
    assert not (tmp_path / "corpora" / "c" / "features").exists()


def test_python_m_entry_points_read_their_arguments(tmp_path):
    """`python -m pipelines.features ARGS` (what `ray job submit` runs) parses ARGS from sys.argv."""
    from pipelines.catalog import Catalog
    from tests.raw_fixture import make_raw_corpus

    make_raw_corpus(Catalog(tmp_path), "c", num_shards=2, per_shard=2)
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.features", "--root", str(tmp_path), "--corpus", "c",
         "--encoder", "tiny", "--dry-run"],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 to build, 0 up to date" in proc.stdout
