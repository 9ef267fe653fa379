"""DynamicBatcher: releases at max_batch_size waiting or once the oldest waited max_wait_ms."""
import torch

from batching.batcher import DynamicBatcher
from server.sampling import SamplingParams
from batching.sequence import Sequence


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def seq(rid: str, t: float) -> Sequence:
    return Sequence(rid, [1, 2], SamplingParams(), torch.Generator(), 4, arrival_time=t)


def test_releases_when_full():
    clock = Clock()
    b = DynamicBatcher(max_batch_size=3, max_wait_ms=50, clock=clock)
    b.add(seq("a", clock.now))
    b.add(seq("b", clock.now))
    assert b.release() == [] and abs(b.seconds_until_ready() - 0.05) < 1e-9
    b.add(seq("c", clock.now))
    assert [s.request_id for s in b.release()] == ["a", "b", "c"] and len(b) == 0


def test_releases_when_oldest_waited_long_enough():
    clock = Clock()
    b = DynamicBatcher(max_batch_size=8, max_wait_ms=10, clock=clock)
    b.add(seq("a", clock.now))
    clock.now += 0.004
    b.add(seq("b", clock.now))
    assert b.release() == []
    assert abs(b.seconds_until_ready() - 0.006) < 1e-9
    clock.now += 0.006
    assert [s.request_id for s in b.release()] == ["a", "b"]
    assert b.seconds_until_ready() is None


def test_remove_drops_a_pending_sequence():
    b = DynamicBatcher(max_batch_size=8, max_wait_ms=0)
    s = seq("a", 0.0)
    b.add(s)
    assert b.remove(s) and not b.remove(s) and b.release() == []
