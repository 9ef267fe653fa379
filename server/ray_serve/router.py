"""PrefixAffinityRouter: a Ray Serve request router that sends a request to the replica already holding its
prompt's prefix in its KV cache, and a LoRA request to a replica holding its adapter, unless that replica's
queue is much longer than the shortest.

The router runs where the engine replicas' handle is held: in the ingress. It cuts each prompt's text into
blocks of `block_chars` characters and remembers, for the hash of every leading run of blocks, the replica that
last served it (an LRU of `max_prefixes`). A request goes, in order of preference, to the replica it names
(x-lmserve-replica), to the replica with its longest remembered prefix, to replicas where its adapter is
resident or loaded (their routing stats, deployments.py), then to the others by queue length, ties spread
round-robin so new prefixes spread over the replicas. Ray picks the shortest queue within the first group that
has room. With several ingress replicas, each keeps its own table.
"""
import itertools
from collections import OrderedDict

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from server.ray_serve.http_call import HttpCall


def prefix_hashes(text: str, block_chars: int, max_blocks: int) -> list[int]:
    """The hash of each leading run of whole blocks: [hash(block 0), hash(blocks 0-1), ...]."""
    return [hash(text[:end]) for end in range(block_chars, min(len(text), block_chars * max_blocks) + 1, block_chars)]


class PrefixAffinityRouter(RequestRouter):
    def initialize_state(self, block_chars: int = 64, max_blocks: int = 128, max_prefixes: int = 100_000,
                         max_imbalance: int = 8):
        """max_imbalance: how many more requests in flight than the least loaded replica a replica may hold and
        still get a request for its prefix."""
        self.block_chars, self.max_blocks = block_chars, max_blocks
        self.max_prefixes, self.max_imbalance = max_prefixes, max_imbalance
        self._owners: OrderedDict[int, ReplicaID] = OrderedDict()
        self._turn = itertools.count()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        call = _call_of(pending_request)
        if call is None or not candidate_replicas:
            return [candidate_replicas]
        queued = {r.replica_id: self.replica_queue_len_cache.get(r.replica_id) or 0 for r in candidate_replicas}
        shortest = min(queued.values())
        turn = next(self._turn)
        order = {r.replica_id: i for i, r in enumerate(candidate_replicas)}
        by_load = sorted(candidate_replicas,
                         key=lambda r: (queued[r.replica_id], (order[r.replica_id] - turn) % len(candidate_replicas)))
        ranks: list[list[RunningReplica]] = []
        if call.replica:
            ranks.append([r for r in candidate_replicas if r.replica_id.unique_id == call.replica])
        loaded = {r.replica_id: r.routing_stats.get("loaded_adapters", ()) for r in candidate_replicas}
        adapter = call.model if any(call.model in names for names in loaded.values()) else None   # else the base model
        holders = [r for r in by_load if adapter is None or adapter in loaded[r.replica_id]]
        owner = self._owner_of(call.prompt, {r.replica_id: r for r in holders})
        if owner is not None and queued[owner.replica_id] <= shortest + self.max_imbalance:
            ranks.append([owner])
        if adapter is not None:
            ranks.append([r for r in holders if adapter in r.routing_stats.get("resident_adapters", ())])
            ranks.append(holders)
        ranks.append(by_load)
        return [rank for rank in ranks if rank]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        call = _call_of(pending_request)
        if call is None:
            return
        for h in prefix_hashes(call.prompt, self.block_chars, self.max_blocks):
            self._owners[h] = replica_id
            self._owners.move_to_end(h)
        while len(self._owners) > self.max_prefixes:
            self._owners.popitem(last=False)

    def _owner_of(self, prompt: str, replicas: dict[ReplicaID, RunningReplica]) -> RunningReplica | None:
        """The replica that served the longest leading run of this prompt's blocks, among replicas."""
        for h in reversed(prefix_hashes(prompt, self.block_chars, self.max_blocks)):
            owner = self._owners.get(h)
            if owner in replicas:
                return replicas[owner]
        return None


def _call_of(pending_request: PendingRequest | None) -> HttpCall | None:
    if pending_request is None or not pending_request.args:
        return None
    call = pending_request.args[0]
    return call if isinstance(call, HttpCall) else None
