import os
import sys

import pytest
import torch

from server.cpu_threads import _openmp_runtime, release_idle_team

needs_gnu_openmp = pytest.mark.skipif(
    not sys.platform.startswith("linux") or torch.get_num_threads() < 2 or _openmp_runtime() is None,
    reason="counts this process's threads in /proc; needs GNU OpenMP and a team of two or more")


def threads() -> set[str]:
    return set(os.listdir("/proc/self/task"))   # thread ids: other tests' threads may come and go meanwhile


@needs_gnu_openmp
def test_release_idle_team_ends_the_calling_threads_openmp_threads():
    release_idle_team()
    before = threads()
    torch.randn(1 << 20).mul(2).sum()   # a parallel op: this thread's team starts
    team = threads() - before
    assert team
    release_idle_team()
    assert not team & threads()
    torch.randn(1 << 20).mul(2).sum()   # and a later parallel op still runs, on a new team


@needs_gnu_openmp
def test_release_leaves_other_threads_teams_alone():
    import threading

    release_idle_team()
    started, stop = threading.Event(), threading.Event()

    def other():
        torch.randn(1 << 20).mul(2).sum()   # this thread's own team
        started.set()
        stop.wait()
    before = threads()
    worker = threading.Thread(target=other)
    worker.start()
    started.wait()
    others = threads() - before           # the worker and its team
    release_idle_team()                   # the main thread has no team: nothing of the other's ends
    assert len(others) >= 2 and others <= threads()
    stop.set()
    worker.join()
