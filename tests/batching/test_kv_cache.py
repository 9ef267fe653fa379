"""BlockManager: allocation, ref-counts, prefix hashing, LRU eviction; cache sizing."""
import torch

from batching.kv_cache import CPU_DEFAULT_BUDGET, BlockManager, kv_cache_bytes_per_token, size_kv_cache
from server.sampling import SamplingParams
from batching.sequence import Sequence


def seq(tokens, rid="r") -> Sequence:
    return Sequence(rid, list(tokens), SamplingParams(), torch.Generator(), max_tokens=16)


def admit(bm: BlockManager, s: Sequence):
    hit = bm.find_prefix(s)
    n = s.num_tokens - hit.num_blocks * bm.block_size
    assert bm.can_allocate(s, hit, n)
    bm.allocate(s, hit, n)
    s.num_computed_tokens += n
    bm.register_computed_blocks(s)


def test_allocation_and_free_return_every_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(range(10))
    admit(bm, a)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 5
    bm.free_sequence(a)
    assert bm.num_free_blocks == 8 and all(b.ref_count == 0 for b in bm.blocks)


def test_shared_prefix_is_reused_with_ref_counts():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = seq(list(range(9)) + [100], "a"), seq(list(range(9)) + [200], "b")
    admit(bm, a)
    admit(bm, b)
    assert b.num_cached_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    assert [bm.blocks[i].ref_count for i in a.block_table[:2]] == [2, 2]
    assert bm.prefix_hits == 8
    bm.free_sequence(a)
    bm.free_sequence(b)
    assert bm.num_free_blocks == 8


def test_at_least_one_token_is_left_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(range(8), "a")
    admit(bm, a)
    bm.free_sequence(a)
    again = seq(range(8), "b")
    hit = bm.find_prefix(again)
    assert hit.num_blocks == 1  # the second full block holds the last token, which must be recomputed for logits


def test_freed_blocks_stay_cached_until_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=4)
    old, recent = seq(range(0, 9), "old"), seq(range(50, 59), "recent")
    admit(bm, old)
    bm.free_sequence(old)
    admit(bm, recent)                 # takes the unhashed tail block and one cached block of "old"
    bm.free_sequence(recent)
    assert bm.find_prefix(seq(range(50, 59))).num_blocks == 2
    assert bm.find_prefix(seq(range(0, 9))).num_blocks < 2
    filler = seq(range(200, 216), "filler")
    admit(bm, filler)                 # needs all 4 blocks: everything cached is evicted
    assert bm.find_prefix(seq(range(50, 59))).num_blocks == 0
    assert {b.block_id for b in bm.cached.values()} <= set(filler.block_table)  # only its own blocks remain


def test_prefix_hashes_are_chained_so_same_block_after_other_prefix_misses():
    bm = BlockManager(num_blocks=8, block_size=2)
    admit(bm, seq([1, 2, 3, 4, 5], "a"))
    assert bm.find_prefix(seq([9, 9, 3, 4, 5])).num_blocks == 0
    assert bm.find_prefix(seq([1, 2, 3, 4, 7])).num_blocks == 2


def test_disabled_prefix_caching_never_hits():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    admit(bm, seq(range(9), "a"))
    assert bm.find_prefix(seq(range(9))).num_blocks == 0


def test_cache_sizing():
    per_token = kv_cache_bytes_per_token(num_layers=2, num_kv_heads=4, head_dim=8, dtype=torch.float16)
    assert per_token == 2 * 2 * 4 * 8 * 2
    assert size_kv_cache(per_token, 16, torch.device("cpu"), 100, None, 10**6) == 6
    blocks = size_kv_cache(per_token, 16, torch.device("cpu"), None, 0.2, max_useful_tokens=320)
    assert blocks == 20  # capped at what every seat at full length could use


def test_cpu_default_cache_is_what_the_seats_use_within_a_gibibyte_and_holds_one_sequence():
    cpu = torch.device("cpu")
    per_token = kv_cache_bytes_per_token(num_layers=30, num_kv_heads=3, head_dim=64, dtype=torch.float32)
    # 64 seats of 8192 tokens would take 22.5 GiB: the default stops at 1 GiB.
    blocks = size_kv_cache(per_token, 16, cpu, None, None, max_useful_tokens=64 * 8192, min_tokens=8192)
    assert blocks * 16 * per_token <= CPU_DEFAULT_BUDGET < (blocks + 1) * 16 * per_token
    assert size_kv_cache(per_token, 16, cpu, None, None, max_useful_tokens=4 * 512, min_tokens=512) == 4 * 512 // 16
    # A sequence larger than the budget still fits.
    huge = kv_cache_bytes_per_token(num_layers=80, num_kv_heads=64, head_dim=128, dtype=torch.float32)
    assert size_kv_cache(huge, 16, cpu, None, None, max_useful_tokens=8 * 4096, min_tokens=4096) == 4096 // 16
    # An explicit fraction is not capped at 1 GiB.
    assert size_kv_cache(per_token, 16, cpu, None, 1.0, 64 * 8192, 8192) > blocks


def test_forgetting_a_sequences_own_blocks_keeps_shared_ones_cached():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = seq(list(range(9)) + [100], "a"), seq(list(range(9)) + [200], "b")
    admit(bm, a)
    admit(bm, b)
    assert bm.forget_exclusive_blocks(b) == b.block_table[2:]          # the shared prefix is a's too
    bm.free_sequence(b)
    again = seq(list(range(9)) + [200], "c")
    assert bm.find_prefix(again).num_blocks == 2                     # the shared blocks still hit
    assert all(bm.blocks[i].hash is not None for i in a.block_table[:2])
