"""Paged KV cache: the BlockManager (free list, ref-counts, prefix hashes, LRU eviction) and cache sizing.

A block holds `block_size` tokens of K and V for every layer. A full block whose K/V are computed is
registered under a hash of its whole token prefix; a later sequence with the same prefix shares it
(ref-count + 1) instead of recomputing. Freed blocks keep their hash and stay reusable until the free
list hands them out again, oldest first (LRU).
"""
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from batching.sequence import Sequence

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple = ()


def block_hash(parent_hash: int | None, token_ids: tuple) -> int:
    return hash((parent_hash, token_ids))


@dataclass
class PrefixHit:
    blocks: list[Block] = field(default_factory=list)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU first
        self.cached: dict[int, Block] = {}   # prefix hash -> block
        self.prefix_queries = 0               # tokens looked up in the prefix cache
        self.prefix_hits = 0                  # of those, tokens found

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- prefix cache -------------------------------------------------------------------------
    def find_prefix(self, seq: Sequence) -> PrefixHit:
        """Longest run of cached full blocks at the start of seq; at least one token is left to compute."""
        hit = PrefixHit()
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:  # needs logits at every position
            return hit
        parent = seq.cache_salt
        for i in range((seq.num_tokens - 1) // self.block_size):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = block_hash(parent, tokens)
            block = self.cached.get(h)
            if block is None or block.token_ids != tokens:
                break
            hit.blocks.append(block)
            parent = h
        return hit

    def can_allocate(self, seq: Sequence, hit: PrefixHit, num_new_tokens: int) -> bool:
        """Whether seq (holding no blocks) can take the hit and room for its first num_new_tokens."""
        reused_free = sum(1 for b in hit.blocks if b.ref_count == 0)
        fresh = self.blocks_needed(hit.num_blocks * self.block_size + num_new_tokens) - hit.num_blocks
        return fresh + reused_free <= len(self.free)

    def allocate(self, seq: Sequence, hit: PrefixHit, num_new_tokens: int):
        assert not seq.block_table
        for block in hit.blocks:
            if block.ref_count == 0:
                del self.free[block.block_id]
            block.ref_count += 1
            seq.block_table.append(block.block_id)
        cached = hit.num_blocks * self.block_size
        seq.num_computed_tokens = cached
        seq.num_registered_blocks = hit.num_blocks
        if seq.num_cached_tokens is None:
            seq.num_cached_tokens = cached
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += cached
        self.append_slots(seq, num_new_tokens)

    # --- growing and freeing ------------------------------------------------------------------
    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return need <= len(self.free)

    def append_slots(self, seq: Sequence, num_new_tokens: int):
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        for _ in range(need):
            seq.block_table.append(self._take_free_block().block_id)

    def _take_free_block(self) -> Block:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:       # evict: its prefix is no longer reusable
            if self.cached.get(block.hash) is block:
                del self.cached[block.hash]
            block.hash, block.token_ids = None, ()
        block.ref_count = 1
        return block

    def register_computed_blocks(self, seq: Sequence):
        """Hash the full blocks whose K/V are now in the cache so later sequences can share them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(seq.num_registered_blocks, seq.num_computed_tokens // bs):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                parent = self.blocks[seq.block_table[i - 1]].hash if i else seq.cache_salt
                tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
                block.hash, block.token_ids = block_hash(parent, tokens), tokens
                self.cached.setdefault(block.hash, block)
            seq.num_registered_blocks = i + 1

    def forget_exclusive_blocks(self, seq: Sequence) -> list[int]:
        """The blocks only seq holds, taken out of the prefix cache: their contents must never be read again
        (the caller clears them before they are freed)."""
        ids = [b for b in seq.block_table if self.blocks[b].ref_count == 1]
        for block_id in ids:
            block = self.blocks[block_id]
            if block.hash is not None and self.cached.get(block.hash) is block:
                del self.cached[block.hash]
            block.hash, block.token_ids = None, ()
        return ids

    def free_sequence(self, seq: Sequence):
        # Tail blocks go to the LRU end first, so a prefix's head outlives its tail; unhashed blocks are reused first.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.hash is None:
                    self.free.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0


def zero_blocks(kv_caches: list[torch.Tensor], blocks: list[int]):
    """Zeroes blocks in every layer's [2, num_blocks, ...] cache."""
    index = torch.tensor(blocks, device=kv_caches[0].device)
    for cache in kv_caches:
        cache.index_fill_(1, index, 0)


def kv_cache_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


CPU_DEFAULT_BUDGET = 2**30  # bytes of KV cache on CPU when no flag sizes it


def size_kv_cache(bytes_per_token: int, block_size: int, device: torch.device, kv_cache_tokens: int | None,
                  memory_fraction: float | None, max_useful_tokens: int, min_tokens: int = 0) -> int:
    """Number of blocks: from kv_cache_tokens when given, else a fraction of the free memory. On CPU with
    neither flag: what every seat at full length could use, capped at 20% of the available RAM and at
    CPU_DEFAULT_BUDGET, but never less than min_tokens (one sequence of the longest length)."""
    if kv_cache_tokens is not None:
        return max(1, kv_cache_tokens // block_size)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free * (memory_fraction or 0.9)
    else:
        budget = available_host_memory() * (memory_fraction or 0.2)
        budget = min(budget, max_useful_tokens * bytes_per_token)  # more than every seat at full length is waste on CPU
        if memory_fraction is None:
            budget = min(budget, CPU_DEFAULT_BUDGET)
    num_blocks = int(budget // (bytes_per_token * block_size))
    if memory_fraction is None and device.type != "cuda":
        num_blocks = max(num_blocks, -(-min_tokens // block_size))
    if num_blocks < 1:
        raise RuntimeError(f"no memory left for the KV cache ({budget / 2**20:.0f} MiB budget, "
                           f"{bytes_per_token * block_size} bytes per block); lower the model size or raise the fraction")
    return num_blocks


def available_host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30
