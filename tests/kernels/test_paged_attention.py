import pytest
import torch

from kernels.paged_attention import paged_attention, paged_attention_reference
from server.layers.attention import AttentionGroup, AttentionMetadata
from tests.kernels.conftest import DEVICE, DOT_DTYPES, close

BLOCK = 16


def build_batch(groups: list[tuple[int, list[int]]], heads: int, kv_heads: int, head_dim: int, dtype, num_blocks=96):
    """groups: (queries per row, first query position of each row). Every row gets its own shuffled blocks;
    the cache holds random keys and values (earlier positions are the cached prefix)."""
    free = torch.randperm(num_blocks).tolist()
    slots, meta_groups, offset = [], [], 0
    for num_queries, starts in groups:
        tables, positions = [], []
        for start in starts:
            last = start + num_queries - 1
            table = [free.pop() for _ in range(last // BLOCK + 1)]
            tables.append(table)
            positions.append(list(range(start, last + 1)))
            slots += [table[p // BLOCK] * BLOCK + p % BLOCK for p in positions[-1]]
        width = max(len(t) for t in tables)
        tables = [t + [0] * (width - len(t)) for t in tables]
        rows = num_queries * len(starts)
        meta_groups.append(AttentionGroup(slice(offset, offset + rows), torch.tensor(tables, device=DEVICE),
                                          torch.tensor(positions, device=DEVICE)))
        offset += rows
    T = offset
    q = torch.randn(T, heads, head_dim, dtype=dtype, device=DEVICE)
    k = torch.randn(T, kv_heads, head_dim, dtype=dtype, device=DEVICE)
    v = torch.randn(T, kv_heads, head_dim, dtype=dtype, device=DEVICE)
    cache = torch.randn(2, num_blocks, BLOCK, kv_heads, head_dim, dtype=dtype, device=DEVICE)
    return q, k, v, cache, AttentionMetadata(torch.tensor(slots, device=DEVICE), meta_groups)


CASES = {
    "decode": [(1, [0, 5, 37, 80, 130])],
    "prefill": [(21, [0, 0])],
    "chunk_after_prefix": [(20, [33, 16, 70])],
    "mixed": [(1, [3, 64]), (9, [0, 40]), (40, [7])],
}


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(6, 2, 16), (4, 4, 64), (8, 1, 24)])
@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("tile", [16, 64])   # keys per loop step: one cache block, or four
def test_paged_attention_matches_reference(case, heads, kv_heads, head_dim, window, dtype, tile):
    q, k, v, cache, meta = build_batch(CASES[case], heads, kv_heads, head_dim, dtype)
    ref_cache = cache.clone()
    ref = paged_attention_reference(q, k, v, ref_cache[0], ref_cache[1], meta, head_dim ** -0.5, window)
    out = paged_attention(q, k, v, cache[0], cache[1], meta, head_dim ** -0.5, window, block_m=16, keys_per_tile=tile)
    assert torch.equal(cache, ref_cache), "new K/V written to other slots than the reference writes"
    close(out, ref, dtype, scale=4)


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("tile", [16, 64])
def test_split_context_decode_matches_reference(window, dtype, tile):
    # Contexts of 1 to 9 blocks, each split into pieces of 2 blocks (rounded up to a whole tile of keys); some
    # pieces lie past a short context.
    q, k, v, cache, meta = build_batch([(1, [0, 17, 70, 140])], 8, 2, 32, dtype, num_blocks=128)
    ref_cache = cache.clone()
    ref = paged_attention_reference(q, k, v, ref_cache[0], ref_cache[1], meta, 0.2, window)
    out = paged_attention(q, k, v, cache[0], cache[1], meta, 0.2, window, min_programs=64, min_part_blocks=2,
                          keys_per_tile=tile)
    close(out, ref, dtype, scale=4)


@pytest.mark.parametrize("attention", [paged_attention, paged_attention_reference])
def test_slot_minus_one_writes_nothing(attention):
    # A CUDA graph's padding rows carry slot -1; the real rows beside them still write and attend as usual.
    q, k, v, cache, meta = build_batch([(1, [5, 37, 80])], 4, 2, 16, torch.float32)
    expected = cache.clone()
    ref = paged_attention_reference(q, k, v, expected[0], expected[1], meta, 0.25, None)
    skipped = meta.slot_mapping[1].item()
    meta.slot_mapping[1] = -1
    expected.view(2, -1, 2, 16)[:, skipped] = cache.view(2, -1, 2, 16)[:, skipped]   # the slot keeps what it had
    out = attention(q, k, v, cache[0], cache[1], meta, 0.25, None)
    assert torch.equal(cache, expected)
    close(out[0::2], ref[0::2], torch.float32, scale=4)


def test_decode_partitions_fill_the_device_without_tiny_pieces():
    from kernels.paged_attention import decode_partitions
    assert decode_partitions(64, 8, 256, 264, 8) == 1          # 512 programs already
    assert decode_partitions(1, 8, 256, 264, 8) == 32          # 4096 tokens: 32 pieces of 8 blocks
    assert decode_partitions(1, 8, 12, 264, 8) == 1            # too short to split
    assert decode_partitions(4, 8, 256, 264, 8) == 9


def test_decode_attends_only_to_keys_up_to_its_position():
    # Keys after the query's position hold huge values: any leak would dominate the output.
    q, k, v, cache, meta = build_batch([(1, [20])], 2, 1, 16, torch.float32)
    (block_table,) = meta.groups[0].block_tables.tolist()
    cache[1, block_table[1], 5:] = 1e4   # positions 21..31, after the query at 20
    out = paged_attention(q, k, v, cache[0], cache[1], meta, 0.25, None)
    assert out.abs().max() < 100


@pytest.mark.parametrize("case", ["decode", "mixed"])
def test_a_tile_reads_no_block_outside_the_table(case):
    # Every block no table names holds NaN, and tables are padded with a zeroed block (as the engine pads
    # them). A 64-key tile runs past a short table's end: what lies beyond must not be read.
    q, k, v, cache, meta = build_batch(CASES[case], 4, 2, 16, torch.float32)
    tables = [g.block_tables for g in meta.groups]
    pad = next(b for b in range(1, cache.shape[1]) if not any((t == b).any() for t in tables))
    for t in tables:
        t[t == 0] = pad   # build_batch pads with block 0 (a block that then holds NaN unless a row owns it)
    used = torch.cat([t.flatten() for t in tables]).unique()
    unused = torch.ones(cache.shape[1], dtype=torch.bool)
    unused[used] = False
    cache[:, unused] = float("nan")
    cache[:, pad] = 0
    ref = paged_attention_reference(q, k, v, cache[0].clone(), cache[1].clone(), meta, 0.25, None)
    out = paged_attention(q, k, v, cache[0], cache[1], meta, 0.25, None, keys_per_tile=64)
    assert ref.isfinite().all()
    close(out, ref, torch.float32, scale=4)


@pytest.mark.parametrize("window", [None, 24])
def test_reference_padding_prompts_into_one_group_changes_nothing(window):
    # Prompt chunks of 9, 40 and 3 queries run as one padded group; computed group by group they agree.
    q, k, v, cache, meta = build_batch([(1, [3, 64]), (3, [30]), (9, [0, 40]), (40, [7])], 6, 2, 16, torch.float32)
    merged = meta.merged_groups()
    assert [g.shape for g in merged] == [(2, 1), (4, 40)]
    padded = merged[1].tokens
    assert (padded >= 0).sum() == 3 + 18 + 40 and padded[0, 3:].eq(-1).all()
    per_group = AttentionMetadata(meta.slot_mapping, meta.groups, _merged=meta.groups)
    out = paged_attention_reference(q, k, v, cache[0].clone(), cache[1].clone(), meta, 0.25, window)
    ref = paged_attention_reference(q, k, v, cache[0].clone(), cache[1].clone(), per_group, 0.25, window)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
