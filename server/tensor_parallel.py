"""TensorParallel: this process's rank among the tensor-parallel ranks, and the collectives the model calls.

Each rank holds its share of every layer (server/models/llama.py says which); the forward pass meets the other
ranks at one all-reduce after each row-parallel projection and after the vocab-parallel embedding, and at one
gather of the logits on rank 0, which samples. Process groups are made from a TCP store without
torch.distributed's global state, so an engine can start and stop them more than once in one process: gloo on
the CPU, NCCL on CUDA for the collectives, and always a gloo group for the step messages rank 0 broadcasts.
"""
import pickle
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT = timedelta(minutes=10)   # a rank that stops answering ends its peers' waits with an error
IDLE_TIMEOUT = timedelta(days=365)           # the step messages: workers wait for the next one as long as it takes


@dataclass
class TensorParallel:
    rank: int = 0
    size: int = 1
    group: object = None      # the collectives' process group (None with one rank)
    control: object = None    # a gloo group of its own for the step messages
    store: object = field(default=None, repr=False)   # keeps the TCP store alive as long as the groups

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums x over the ranks, in place."""
        if self.size > 1:
            self.group.allreduce([x]).wait()
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Rank 0: every rank's x side by side along the last dimension; the other ranks: None."""
        if self.size == 1:
            return x
        x = x.contiguous()
        out = [[torch.empty_like(x) for _ in range(self.size)]] if self.rank == 0 else []
        opts = dist.GatherOptions()
        opts.rootRank = 0
        self.group.gather(out, [x], opts).wait()
        return torch.cat(out[0], dim=-1) if self.rank == 0 else None

    def broadcast_object(self, obj=None):
        """Rank 0 sends obj (pickled) to every rank; each returns it."""
        if self.rank == 0:
            data = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)
            length = torch.tensor([data.numel()], dtype=torch.int64)
        else:
            length = torch.zeros(1, dtype=torch.int64)
        self.control.broadcast([length], _root(0)).wait()
        if self.rank != 0:
            data = torch.empty(int(length), dtype=torch.uint8)
        self.control.broadcast([data], _root(0)).wait()
        return obj if self.rank == 0 else pickle.loads(data.numpy().tobytes())

    def shutdown(self):
        for group in (self.group, self.control):
            try:
                group.shutdown()
            except (AttributeError, RuntimeError):   # gloo groups of some versions have no shutdown; a dead peer
                pass


SINGLE = TensorParallel()


def _root(rank: int) -> dist.BroadcastOptions:
    opts = dist.BroadcastOptions()
    opts.rootRank = rank
    return opts


def tcp_store(rank: int, size: int, port: int = 0) -> dist.TCPStore:
    """Rank 0 serves the store (port 0: any free port, read back from store.port); the others connect to it."""
    return dist.TCPStore("127.0.0.1", port, size, rank == 0, timeout=COLLECTIVE_TIMEOUT, wait_for_workers=False)


def connect(store: dist.TCPStore, rank: int, size: int, device: torch.device) -> TensorParallel:
    """Joins the ranks' groups (blocks until every rank has joined)."""
    control = dist.ProcessGroupGloo(dist.PrefixStore("control", store), rank, size, IDLE_TIMEOUT)
    if device.type == "cuda":
        group = dist.ProcessGroupNCCL(dist.PrefixStore("nccl", store), rank, size)
    else:
        group = dist.ProcessGroupGloo(dist.PrefixStore("gloo", store), rank, size, COLLECTIVE_TIMEOUT)
    return TensorParallel(rank, size, group, control, store)
