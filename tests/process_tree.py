"""Kill a subprocess test's driver together with the private Ray it started (bounded, no leftovers)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil


def kill_driver_and_ray(proc: subprocess.Popen, ray_tmpdir: str, timeout_s: float = 30.0) -> None:
    """SIGKILL the driver's process group, then every process whose RAY_TMPDIR is `ray_tmpdir`.

    Ray's workers are started by its raylet in their own session, so the process group alone misses
    them; they inherit the driver's environment, which is how they are found. Waits until all are gone.
    """
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=timeout_s)
    victims = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("RAY_TMPDIR") == ray_tmpdir:
                p.kill()
                victims.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    psutil.wait_procs(victims, timeout=timeout_s)
    time.sleep(0.5)  # let the filesystem settle: nothing of that run writes any more
