import os
import sys

import pytest
import torch

from server.cpu_threads import release_idle_team


@pytest.mark.skipif(not sys.platform.startswith("linux") or torch.get_num_threads() < 2,
                    reason="counts this process's threads in /proc; needs an OpenMP team of two or more")
def test_release_idle_team_ends_the_calling_threads_openmp_threads():
    def threads() -> int:
        return len(os.listdir("/proc/self/task"))

    release_idle_team()
    before = threads()
    torch.randn(1 << 20).mul(2).sum()   # a parallel op: this thread's team starts
    assert threads() > before
    release_idle_team()
    assert threads() == before
    torch.randn(1 << 20).mul(2).sum()   # and a later parallel op still runs, on a new team
