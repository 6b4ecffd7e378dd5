"""Build DeepSpeed's JIT-compiled CPU ops once, serially, into a venv-private cache.

On CPU (gloo), every ``deepspeed.initialize`` creates a ``TorchBackend`` whose constructor JIT
compiles the shared-memory comm op ``deepspeed_shm_comm`` (``deepspeed/comm/torch.py:
build_shm_op`` -> ``ShareMemCommBuilder`` -> ``torch.utils.cpp_extension.load``): 40-80 s cold.
Nothing else is compiled on that path for a torch optimizer with ZeRO 0-3 in fp32/bf16; a
DeepSpeed-config optimizer adds ``fused_adam`` and CPU offload ``cpu_adam`` (PITFALLS.md), which
jobs avoid.

Three traps, three choices:

* torch's JIT cache lock (``FileBaton``, a bare ``lock`` file in the op's build dir) survives a
  process killed mid-build, and every later load then waits on it forever. We serialize builds with
  a ``filelock.FileLock`` instead (``flock`` underneath: the OS drops it when its holder dies), and
  under it delete any leftover baton.
* Environments sharing ``~/.cache/torch_extensions`` rebuild in turns, so the cache lives inside
  the Python environment (``sys.prefix/var/torch_extensions``) and goes away with it.
* torch runs whichever ``ninja`` comes first on ``PATH``, and a machine can have two: the
  project's pinned ``ninja`` wheel (1.13 here) and the system's (``/usr/bin/ninja`` 1.11 here).
  Their build logs do not agree on a command's hash, so each rebuilds the op the other built:
  measured here, a warm cache rebuilt in 22.6 s when ``PATH`` put the venv first, and 34 s inside
  the demo's stage 1 after tests had run with it first. ``configure_environment`` puts the wheel's
  ``ninja`` first on ``PATH`` in every process that builds or loads the op (driver, Ray worker,
  ``make setup``), so the cache is built by one ninja, whatever the shell's ``PATH``.
* ``make setup`` pays the build once (``python -m jobs.deepspeed_ops --warm``). Jobs call
  ``ensure_ops()`` before ``deepspeed.initialize``: it takes the same flock, loads the built op into
  the process (well under a second), and DeepSpeed's own load then hits its in-process cache, so
  ``deepspeed.initialize`` never touches the baton or ninja.

Ray workers must see the same ``TORCH_EXTENSIONS_DIR``: pass ``configure_environment()`` as
``runtime_env={"env_vars": ...}``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

logger = logging.getLogger(__name__)

# Accelerator op-builder class names that CPU ``deepspeed.initialize`` JIT-compiles (see module
# docstring). Only these are built under our flock, which is what makes deleting their batons safe.
INIT_OPS: tuple[str, ...] = ("ShareMemCommBuilder",)

_LOCK_NAME = "seedpipe-ops.lock"
_BATON_NAME = "lock"  # torch.utils.cpp_extension's FileBaton, one per op build dir
_POLL_S = 0.2


def extensions_dir() -> Path:
    """The project-private TORCH_EXTENSIONS_DIR: ``$SEEDPIPE_TORCH_EXTENSIONS_DIR`` or one per venv."""
    override = os.environ.get("SEEDPIPE_TORCH_EXTENSIONS_DIR")
    if override:
        return Path(override).expanduser().resolve()
    return Path(sys.prefix) / "var" / "torch_extensions"


def pin_ninja() -> str | None:
    """Put the ``ninja`` wheel's binary first on this process's ``PATH``; return its folder.

    torch's JIT build runs ``ninja`` from ``PATH``; two ninjas on one cache rebuild in turns (module
    docstring). ``PATH`` is changed only when another ``ninja`` would be found first, and not
    passed to Ray workers (a remote node's ``PATH`` is its own): they call this themselves.
    """
    try:
        import ninja
    except ImportError:  # not installed: torch's own check names what is missing
        return None
    wheel_bin = Path(ninja.BIN_DIR)
    found = shutil.which("ninja")
    if found is None or Path(found).resolve() != (wheel_bin / "ninja").resolve():
        os.environ["PATH"] = os.pathsep.join([str(wheel_bin), os.environ.get("PATH", "")])
    return str(wheel_bin)


def configure_environment() -> dict[str, str]:
    """Point torch's JIT extension cache at ``extensions_dir()`` and run the pinned ``ninja``
    (`pin_ninja`); return the env vars for Ray workers.

    An explicit ``TORCH_EXTENSIONS_DIR`` already in the environment wins (CI may pin one); we warn,
    because a directory shared with other environments brings back the rebuild-in-turns problem.
    """
    pin_ninja()
    wanted = str(extensions_dir())
    actual = os.environ.setdefault("TORCH_EXTENSIONS_DIR", wanted)
    if actual != wanted:
        logger.warning(
            "TORCH_EXTENSIONS_DIR=%s is set explicitly; using it instead of %s", actual, wanted
        )
    return {"TORCH_EXTENSIONS_DIR": actual}


@contextmanager
def _build_lock(directory: Path, timeout_s: float) -> Iterator[None]:
    """Hold an exclusive lock on ``directory/seedpipe-ops.lock``; the OS drops it on death."""
    path = directory / _LOCK_NAME
    holder_file = directory / f"{_LOCK_NAME}.pid"
    lock = FileLock(path, poll_interval=_POLL_S)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("waiting for another process building DeepSpeed ops (%s)", path)
        try:
            lock.acquire(timeout=timeout_s)
        except Timeout:
            try:
                holder = holder_file.read_text().strip() or "unknown"
            except OSError:
                holder = "unknown"
            raise TimeoutError(
                f"waited {timeout_s:.0f} s for {path} (held by pid {holder}) while another "
                "process builds DeepSpeed ops"
            ) from None
    try:
        # The pid is only a diagnostic for the timeout message above; the file lock is the lock.
        holder_file.write_text(f"{os.getpid()}\n")
        yield
    finally:
        lock.release()


def _remove_stale_batons(build_dirs: Sequence[Path]) -> list[Path]:
    """Delete torch FileBaton ``lock`` files left by builds that died; return what was removed."""
    removed = []
    for build_dir in build_dirs:
        baton = build_dir / _BATON_NAME
        try:
            baton.unlink()
        except FileNotFoundError:
            continue
        removed.append(baton)
        logger.warning("removed stale torch extension lock %s (a build was killed)", baton)
    return removed


def ensure_ops(timeout_s: float = 600) -> float:
    """Build (once) and load into this process every op CPU ``deepspeed.initialize`` compiles.

    Call it before ``deepspeed.initialize``: once the op sits in DeepSpeed's in-process cache the
    init neither compiles nor waits on torch's lock. ``timeout_s`` bounds the wait for another
    process's build; raises ``TimeoutError`` past it. Returns the seconds spent.
    """
    start = time.perf_counter()
    directory = Path(configure_environment()["TORCH_EXTENSIONS_DIR"])
    directory.mkdir(parents=True, exist_ok=True)

    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    builders = []
    for class_name in INIT_OPS:
        builder = accelerator.create_op_builder(class_name)
        # Same test DeepSpeed applies before building: an op it would skip is not ours to build.
        if builder is None or not builder.is_compatible(verbose=False):
            logger.info("%s not used on accelerator %s; skipped", class_name, accelerator._name)
            continue
        builders.append(builder)

    with _build_lock(directory, timeout_s):
        # Holding the flock means no other process is building these ops: every process that
        # builds them does so only inside ensure_ops (jobs load them here, before
        # deepspeed.initialize, so the init takes them from DeepSpeed's in-process cache and never
        # creates a baton). Any baton found now was left by a build that died, and torch would
        # wait on it forever.
        _remove_stale_batons([directory / builder.name for builder in builders])
        for builder in builders:
            op_start = time.perf_counter()
            # verbose=False keeps the compiler log quiet; torch still raises with it on failure.
            builder.load(verbose=False)
            logger.debug("loaded %s in %.2f s", builder.name, time.perf_counter() - op_start)
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m jobs.deepspeed_ops --warm`` builds the ops into the venv cache."""
    parser = argparse.ArgumentParser(prog="python -m jobs.deepspeed_ops", description=__doc__)
    parser.add_argument(
        "--warm", action="store_true", help="build/load DeepSpeed's JIT ops into the cache"
    )
    parser.add_argument(
        "--timeout-s", type=float, default=600, help="max wait for another build's lock"
    )
    args = parser.parse_args(argv)
    if not args.warm:
        parser.error("nothing to do: pass --warm")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    env = configure_environment()
    seconds = ensure_ops(timeout_s=args.timeout_s)
    print(f"DeepSpeed ops ready in {seconds:.2f} s; cache {env['TORCH_EXTENSIONS_DIR']}")


if __name__ == "__main__":
    main()
