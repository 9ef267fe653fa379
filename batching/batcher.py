"""DynamicBatcher: holds new sequences until max_batch_size are waiting or the oldest has waited max_wait_ms.

Only admission waits here; sequences already running keep stepping every iteration.
"""
import time
from collections import deque

from batching.sequence import Sequence


class DynamicBatcher:
    def __init__(self, max_batch_size: int, max_wait_ms: float, clock=time.monotonic):
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.clock = clock
        self.pending: deque[Sequence] = deque()

    def __len__(self) -> int:
        return len(self.pending)

    def add(self, seq: Sequence):
        self.pending.append(seq)

    def remove(self, seq: Sequence) -> bool:
        try:
            self.pending.remove(seq)
            return True
        except ValueError:
            return False

    def ready(self) -> bool:
        return len(self.pending) >= self.max_batch_size or (
            bool(self.pending) and self.clock() - self.pending[0].arrival_time >= self.max_wait_s)

    def seconds_until_ready(self) -> float | None:
        """How long until release would be due with no new arrivals; None when nothing is pending."""
        if not self.pending:
            return None
        if self.ready():
            return 0.0
        return self.pending[0].arrival_time + self.max_wait_s - self.clock()

    def release(self) -> list[Sequence]:
        """Everything pending when a release is due, else nothing."""
        if not self.ready():
            return []
        released = list(self.pending)
        self.pending.clear()
        return released
