"""Attention over the paged KV cache: write new K/V into their slots, then attend through block tables.

The batch comes as AttentionGroups (server/layers/attention.py): B sequences that each advance by the same
Q tokens. Q = 1 (decode) runs a kernel with one program per (sequence, KV head) that serves every query
head of that KV head, so each K/V block is read once for the whole GQA group. Q > 1 (prefill and chunked
prefill over a cached prefix) runs one program per (sequence, query head, BLOCK_M queries). Both walk the
context a tile of keys at a time (a tile may span several cache blocks: each key's block comes from the block
table) with an online softmax in float32, and honour a sliding window.

The torch reference (paged_attention_reference) serves the CPU: index_copy into the slots, a gather of whole
blocks and SDPA with a mask. Inside a compiled CPU decode step (server/compiled_decode.py) the write is one
index_copy_ into the layer's whole cache and the attention plain products and sums that Inductor fuses with the
gather.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def paged_attention_reference(q, k, v, k_cache, v_cache, meta, scale: float, window: int | None):
    # q: [T, Hq, Dh]; k, v: [T, Hkv, Dh]; k_cache, v_cache: [num_blocks, block_size, Hkv, Dh]
    block_size = k_cache.shape[1]
    if torch.compiler.is_compiling():   # a compiled decode step (server/compiled_decode.py)
        g = meta.groups[0]
        _write_kv_traced(k, v, k_cache, v_cache, meta.slot_mapping)
        return _attend_decode_traced(q, k_cache, v_cache, g.block_tables, g.mask(window, block_size), scale)
    _write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    groups = meta.merged_groups()
    out = None
    for g in groups:
        rows = g.tokens if isinstance(g.tokens, slice) else g.tokens.view(-1)   # -1: padding (reads row -1)
        o = _attend(q[rows], k_cache, v_cache, g.block_tables, g.mask(window, block_size), g.shape[1], scale)
        if len(groups) == 1 and isinstance(rows, slice) and o.shape[0] == q.shape[0]:
            return o   # one group of every row (a decode step): o is the output, in row order
        if out is None:
            out = torch.empty_like(q)
        if isinstance(rows, slice):
            out[rows] = o
        else:
            real = rows >= 0
            out[rows[real]] = o[real]
    return out if out is not None else torch.empty_like(q)


def _write_kv(k, v, k_cache, v_cache, slots):
    written = slots >= 0   # slot -1: a padding row (a CUDA graph's spare rows), nothing written
    if not written.all():
        slots, k, v = slots[written], k[written], v[written]
    _, _, num_kv_heads, head_dim = k_cache.shape
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v)


def _attend(q, k_cache, v_cache, block_tables, mask, num_queries: int, scale: float):
    # q: [B * Q, Hq, Dh], B rows of Q queries each; block_tables: [B, MB]; mask: [B, 1, Q, MB * block_size]
    _, _, num_kv_heads, head_dim = k_cache.shape
    batch = block_tables.shape[0]
    qs = q.view(batch, num_queries, *q.shape[1:]).transpose(1, 2)   # [B, Hq, Q, Dh]
    # Whole blocks are gathered (index_select: 3x faster than advanced indexing on CPU), then seen as one
    # key axis of MB * block_size positions.
    blocks = block_tables.view(-1)
    ks = k_cache.index_select(0, blocks).view(batch, -1, num_kv_heads, head_dim).transpose(1, 2)  # [B, Hkv, S, Dh]
    vs = v_cache.index_select(0, blocks).view(batch, -1, num_kv_heads, head_dim).transpose(1, 2)
    o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=num_kv_heads != q.shape[1])
    return o.transpose(1, 2).reshape(-1, *q.shape[1:])


def _write_kv_traced(k, v, k_cache, v_cache, slots):
    # The compiled step's write (it has no padding rows). k_cache and v_cache are the halves of the layer's cache
    # tensor [2, ...]: Inductor does one index_copy_ into the whole tensor in place, where an index_copy_ into each
    # half became a copy of the whole V half every step.
    cache, per_half = k_cache._base, k_cache.shape[0] * k_cache.shape[1]
    assert cache is not None and v_cache._base is cache and cache.shape == (2, *k_cache.shape), \
        "the compiled step writes K and V as the two halves of one cache tensor"
    cache.view(-1, *k_cache.shape[2:]).index_copy_(0, torch.cat([slots, slots + per_half]), torch.cat([k, v]))


def _attend_decode_traced(q, k_cache, v_cache, block_tables, mask, scale: float):
    # One query per row, as plain products and sums Inductor fuses with the block gather into a few C++ loops
    # (no gathered copy of the context, no SDPA call). q: [B, Hq, Dh]; mask: [B, 1, 1, MB * block_size];
    # returns [B, Hq, Dh].
    _, _, num_kv_heads, head_dim = k_cache.shape
    batch, num_heads = block_tables.shape[0], q.shape[1]
    group = num_heads // num_kv_heads
    ks = k_cache[block_tables].view(batch, -1, num_kv_heads, 1, head_dim).float()   # [B, S, Hkv, 1, Dh]
    vs = v_cache[block_tables].view(batch, -1, num_kv_heads, 1, head_dim).float()
    qs = q.view(batch, 1, num_kv_heads, group, head_dim).float()                   # [B, 1, Hkv, G, Dh]
    scores = (qs * ks).sum(-1) * scale                                              # [B, S, Hkv, G]
    scores = scores.masked_fill(~mask.view(batch, -1, 1, 1), float("-inf"))
    o = (torch.softmax(scores, dim=1)[..., None] * vs).sum(1)                       # [B, Hkv, G, Dh]
    return o.view(batch, num_heads, head_dim).to(q.dtype)


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, ROW: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    offs = tl.arange(0, BLOCK)
    mask = offs < tl.where(slot >= 0, ROW, 0)  # slot -1 marks a padding row: nothing written
    tl.store(kc_ptr + slot * ROW + offs, tl.load(k_ptr + t * ROW + offs, mask=mask), mask=mask)
    tl.store(vc_ptr + slot * ROW + offs, tl.load(v_ptr + t * ROW + offs, mask=mask), mask=mask)


@triton.jit
def _attend_tile(q, m_i, l_i, acc, kc_ptr, vc_ptr, table_ptr, num_blocks, start, q_pos, d, dmask, kv_head, scale,
                 window, HKV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
                 HAS_WINDOW: tl.constexpr):
    # Keys start .. start + TILE (they may span several cache blocks, each key found through the block table)
    # against a [R, Dh] tile of queries at positions q_pos [R]; online softmax.
    key_pos = start + tl.arange(0, TILE)
    in_table = key_pos // BLOCK_SIZE < num_blocks
    block = tl.load(table_ptr + key_pos // BLOCK_SIZE, mask=in_table, other=0)
    offs = (block * BLOCK_SIZE + key_pos % BLOCK_SIZE)[:, None] * (HKV * HEAD_DIM) + kv_head * HEAD_DIM + d[None, :]
    kv_mask = in_table[:, None] & dmask[None, :]
    k = tl.load(kc_ptr + offs, mask=kv_mask, other=0.0)
    v = tl.load(vc_ptr + offs, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k)) * scale                                  # [R, TILE]
    visible = key_pos[None, :] <= q_pos[:, None]
    if HAS_WINDOW:
        visible &= key_pos[None, :] > q_pos[:, None] - window
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no visible key yet
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _decode_kernel(q_ptr, o_ptr, part_ptr, kc_ptr, vc_ptr, bt_ptr, qpos_ptr, scale, window, MAX_BLOCKS,
                   KEYS_PER_PART, NUM_PARTS,
                   HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_G: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, HAS_WINDOW: tl.constexpr,
                   SPLIT: tl.constexpr):
    # SPLIT: this program covers keys [part * KEYS_PER_PART, ...) of the context only (a multiple of TILE), and
    # leaves its unnormalised (m, l, acc) in part_ptr [B, HQ, NUM_PARTS, BLOCK_D + 2] for _combine_kernel.
    b, kv_head, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    GROUP: tl.constexpr = HQ // HKV
    g, d = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D)
    heads, dmask = kv_head * GROUP + g, d < HEAD_DIM
    qmask = (g[:, None] < GROUP) & dmask[None, :]
    q = tl.load(q_ptr + b * HQ * HEAD_DIM + heads[:, None] * HEAD_DIM + d[None, :], mask=qmask, other=0.0)
    pos = tl.load(qpos_ptr + b)
    q_pos = tl.zeros((BLOCK_G,), dtype=tl.int64) + pos
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    first = 0
    if HAS_WINDOW:
        first = tl.maximum(pos - window + 1, 0) // TILE * TILE
    last = pos + 1
    if SPLIT:
        first = tl.maximum(first, part * KEYS_PER_PART)
        last = tl.minimum(last, (part + 1) * KEYS_PER_PART)
    for start in range(first, last, TILE):
        m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, kc_ptr, vc_ptr, bt_ptr + b * MAX_BLOCKS, MAX_BLOCKS, start,
                                     q_pos, d, dmask, kv_head, scale, window, HKV, HEAD_DIM, BLOCK_SIZE, TILE,
                                     HAS_WINDOW)
    if SPLIT:
        row = ((b * HQ + heads) * NUM_PARTS + part) * (BLOCK_D + 2)
        gmask = g < GROUP
        tl.store(part_ptr + row[:, None] + d[None, :], acc, mask=gmask[:, None])
        tl.store(part_ptr + row + BLOCK_D, m_i, mask=gmask)
        tl.store(part_ptr + row + BLOCK_D + 1, l_i, mask=gmask)
    else:
        out = acc / tl.where(l_i == 0, 1.0, l_i)[:, None]  # 0 only in masked padding rows
        tl.store(o_ptr + b * HQ * HEAD_DIM + heads[:, None] * HEAD_DIM + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=qmask)


@triton.jit
def _combine_kernel(part_ptr, o_ptr, NUM_PARTS, HQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_P: tl.constexpr):
    # Merges the partitions of one (sequence, head): rescale each by exp(m_p - max m), sum, normalise.
    b, head = tl.program_id(0), tl.program_id(1)
    p, d = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_D)
    row = ((b * HQ + head) * NUM_PARTS + p) * (BLOCK_D + 2)
    pmask = p < NUM_PARTS
    m = tl.load(part_ptr + row + BLOCK_D, mask=pmask, other=float("-inf"))
    l = tl.load(part_ptr + row + BLOCK_D + 1, mask=pmask, other=0.0)
    acc = tl.load(part_ptr + row[:, None] + d[None, :], mask=pmask[:, None], other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_max))   # a partition past the context saw no key
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(o_ptr + (b * HQ + head) * HEAD_DIM + d, out.to(o_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@triton.jit
def _prefill_kernel(q_ptr, o_ptr, kc_ptr, vc_ptr, bt_ptr, qpos_ptr, scale, window, MAX_BLOCKS, Q,
                    HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, HAS_WINDOW: tl.constexpr):
    b, head, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kv_head = head // (HQ // HKV)
    m, d = pid_m * BLOCK_M + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_D)
    mmask, dmask = m < Q, d < HEAD_DIM
    rows = b * Q + m
    qmask = mmask[:, None] & dmask[None, :]
    q = tl.load(q_ptr + rows[:, None] * (HQ * HEAD_DIM) + head * HEAD_DIM + d[None, :], mask=qmask, other=0.0)
    q_pos = tl.load(qpos_ptr + rows, mask=mmask, other=0)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    first = 0
    if HAS_WINDOW:
        lowest = tl.min(tl.where(mmask, q_pos, 1 << 40), axis=0)
        first = tl.maximum(lowest - window + 1, 0) // TILE * TILE
    for start in range(first, tl.max(q_pos, axis=0) + 1, TILE):
        m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, kc_ptr, vc_ptr, bt_ptr + b * MAX_BLOCKS, MAX_BLOCKS, start,
                                     q_pos, d, dmask, kv_head, scale, window, HKV, HEAD_DIM, BLOCK_SIZE, TILE,
                                     HAS_WINDOW)
    out = acc / tl.where(l_i == 0, 1.0, l_i)[:, None]  # 0 only in masked padding rows
    tl.store(o_ptr + rows[:, None] * (HQ * HEAD_DIM) + head * HEAD_DIM + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=qmask)


def write_kv(k, v, k_cache, v_cache, slot_mapping):
    row = k.shape[1] * k.shape[2]
    assert k.is_contiguous() and v.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()
    _write_kv_kernel[(k.shape[0],)](k, v, k_cache, v_cache, slot_mapping, ROW=row, BLOCK=triton.next_power_of_2(row))


def decode_partitions(batch: int, num_kv_heads: int, max_blocks: int, min_programs: int, min_part_blocks: int) -> int:
    """How many pieces to split each decode's context into, so that a small batch still fills the GPU
    (flash-decoding): enough programs for min_programs, each piece at least min_part_blocks long."""
    programs = batch * num_kv_heads
    if programs >= min_programs:
        return 1
    return max(1, min(-(-min_programs // programs), max_blocks // min_part_blocks))


def paged_attention(q, k, v, k_cache, v_cache, meta, scale: float, window: int | None, block_m: int = 64,
                    min_programs: int | None = None, min_part_blocks: int = 8, keys_per_tile: int = 64):
    """Same contract as paged_attention_reference; block_size must be a power of two >= 16 (tl.dot tiles).
    min_programs: split a decode's context when fewer (sequence, KV head) programs than this would run;
    default twice the GPU's multiprocessors, and no split in the interpreter. keys_per_tile (a power of two
    >= 16): keys per loop step, read from as many cache blocks as they span."""
    T, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert block_size >= 16 and block_size & (block_size - 1) == 0, "the Triton path needs block_size 16, 32, 64..."
    assert q.is_contiguous() and num_heads % num_kv_heads == 0
    assert keys_per_tile >= 16 and keys_per_tile & (keys_per_tile - 1) == 0
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    out = torch.empty_like(q)
    common = dict(HQ=num_heads, HKV=num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                  BLOCK_SIZE=block_size, TILE=keys_per_tile, HAS_WINDOW=window is not None)
    for g in meta.groups:
        batch, num_queries = g.shape
        args = (q[g.tokens], out[g.tokens], k_cache, v_cache, g.block_tables, g.query_positions, scale, window or 0,
                g.block_tables.shape[1])
        if num_queries == 1:
            group = max(16, triton.next_power_of_2(num_heads // num_kv_heads))
            if min_programs is None:
                min_programs = 2 * torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
            parts = decode_partitions(batch, num_kv_heads, args[-1], min_programs, min_part_blocks)
            keys_per_part = triton.cdiv(triton.cdiv(args[-1], parts) * block_size, keys_per_tile) * keys_per_tile
            bd = common["BLOCK_D"]
            partials = (torch.empty(batch, num_heads, parts, bd + 2, device=q.device, dtype=torch.float32)
                        if parts > 1 else out)
            _decode_kernel[(batch, num_kv_heads, parts)](args[0], args[1], partials, *args[2:], keys_per_part, parts,
                                                         BLOCK_G=group, SPLIT=parts > 1, **common)
            if parts > 1:
                _combine_kernel[(batch, num_heads)](partials, args[1], parts, HQ=num_heads, HEAD_DIM=head_dim, BLOCK_D=bd,
                                                    BLOCK_P=triton.next_power_of_2(parts))
        else:
            bm = min(block_m, max(16, triton.next_power_of_2(num_queries)))
            _prefill_kernel[(batch, num_heads, triton.cdiv(num_queries, bm))](*args, num_queries, BLOCK_M=bm, **common)
    return out
