"""One OpenMP team per process on CPU: the model's parallel ops run on the engine's step thread only.

PyTorch's CPU ops run in parallel on an OpenMP team that belongs to the thread calling them, and a thread's
team stays alive, idle, after its last parallel op. Once the process's teams hold more threads than there
are cores, GNU OpenMP makes every team's threads sleep between parallel regions instead of spinning, and a
decode step, a few hundred short parallel ops, runs up to half again as long. So the engine loads and runs
the model on its step thread, and the thread that built it lets its own idle team go.
"""
import ctypes
import functools
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@functools.cache
def _openmp_runtime() -> ctypes.CDLL | None:
    """The GNU OpenMP runtime this process has loaded for PyTorch, or None (another runtime, or none). LLVM's and
    Intel's runtimes are left alone: their pause reaches every thread's team, mid-region ones included."""
    if torch.__config__.parallel_info().find("ATen parallel backend: OpenMP") < 0:
        return None
    torch_dir = str(Path(torch.__file__).resolve().parent.parent)
    try:
        with open("/proc/self/maps") as maps:
            loaded = sorted({line.split()[-1] for line in maps if "/libgomp" in line})
    except OSError:   # not Linux
        return None
    ours = [p for p in loaded if p.startswith(torch_dir)] or loaded   # torch's own copy (lib/ or torch.libs/) first
    try:
        return ctypes.CDLL(ours[0], mode=os.RTLD_NOLOAD) if ours else None
    except OSError:
        return None


def release_idle_team():
    """Ends the calling thread's idle OpenMP team, if it has one (omp_pause_resource_all, soft); the next
    parallel op on this thread starts a new one."""
    runtime = _openmp_runtime()
    if runtime is not None and runtime.omp_pause_resource_all(1) != 0:   # 1: omp_pause_soft
        log.debug("could not release this thread's OpenMP threads")
