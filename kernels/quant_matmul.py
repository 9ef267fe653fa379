"""Weight-only quantized matmul, y = x @ dequant(W): int8 per output channel, and the GPTQ packed layout.

int8: w [N, K] int8 (the nn.Linear layout) and scales [N]; W[n, k] = w[n, k] * scales[n].
GPTQ (as auto-gptq writes it), bits 4 or 8, pack = 32 // bits values per int32, lowest bits first:
  qweight [K / pack, N] packs consecutive input channels; qzeros [G, N / pack] packs output channels and
  stores zero - 1; scales [G, N]; g_idx [K] is the group of each input channel (act-order permutes it).
  W[n, k] = scales[g, n] * (q[k, n] - zero[g, n]) with g = g_idx[k].
Both accumulate in float32. M = 1 (batch-1 decode) takes a GEMV kernel. 2 <= M <= 8 (small decode
batches) takes the tl.dot kernel with one 16-row tile holding every row of x, split along K, so each weight
is read and dequantized once for all rows; larger M the same kernel tiled over M, unsplit. Autotune keys
round M up to a power of two, so a batch that grows by one does not retune. The M = 1 GPTQ GEMV unpacks
word by word (each word loaded once and shifted PACK times against x's every PACK-th input channel); for
2 <= M <= 8 the autotuner chooses between that and an element gather (which reads each word PACK times).

Plain grouping (g_idx[k] == k // group_size) is the fast path: the caller passes group_size and the kernels
compute groups instead of gathering them, and the GEMV reads each packed word's scale and zero once, storing
y directly. An act-order checkpoint is brought to plain grouping once, at load, by `sort_act_order`, which
permutes K (the caller permutes x's columns the same way). Any other g_idx takes the general kernels.
"""
import inspect
import os

import torch
import triton
import triton.testing
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
GEMV_MAX_M = 8


def _graph_bench(fn, quantiles=None, **_):
    # A decode GEMV runs for microseconds, less than Python takes to launch it: timed through a CUDA graph's
    # replays, the autotuner compares the kernels and not the launch overhead.
    return triton.testing.do_bench_cudagraph(fn, rep=20, quantiles=quantiles)


_GRAPH_TUNED = {"do_bench": _graph_bench} if "do_bench" in inspect.signature(triton.autotune).parameters else {}


# ---- references (the CPU path) ----

def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unpack int32 words along `dim` into `32 // bits` unsigned values each, lowest bits first."""
    shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
    mask = (1 << bits) - 1
    if dim == 0:  # [R, C] -> [R * pack, C]
        return ((packed[:, None, :] >> shifts[None, :, None]) & mask).reshape(-1, packed.shape[1])
    return ((packed[:, :, None] >> shifts[None, None, :]) & mask).reshape(packed.shape[0], -1)


def pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of unpack: values in [0, 2**bits) packed into int32 words along `dim`."""
    per_word = 32 // bits
    v = values.to(torch.int64) & ((1 << bits) - 1)
    shifts = torch.arange(0, 32, bits, device=values.device, dtype=torch.int64)
    if dim == 0:
        words = (v.view(-1, per_word, v.shape[1]) << shifts[None, :, None]).sum(1)
    else:
        words = (v.view(v.shape[0], -1, per_word) << shifts[None, None, :]).sum(2)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def dequantize_gptq(qweight, qzeros, scales, g_idx, bits: int, zero_offset: int = 1) -> torch.Tensor:
    """[K, N] float32 weights (x @ W layout). zero_offset is 1 for the gptq (v1) format, 0 for gptq_v2."""
    q = unpack(qweight, bits, dim=0).float()
    zeros = ((unpack(qzeros, bits, dim=1) + zero_offset) & ((1 << bits) - 1)).float()
    g = g_idx.long()
    return scales.float()[g] * (q - zeros[g])


def sort_act_order(qweight: torch.Tensor, g_idx: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight, perm) with K reordered so that the groups are contiguous: x[..., perm] @ W' == x @ W and the
    new g_idx is g_idx[perm], sorted (plain grouping when every group has group_size channels)."""
    perm = torch.argsort(g_idx.long(), stable=True)
    codes = unpack(qweight, bits, dim=0)
    return pack(codes[perm], bits, dim=0), perm


def is_plain_grouping(g_idx: torch.Tensor, group_size: int) -> bool:
    K = g_idx.shape[0]
    return torch.equal(g_idx.long().cpu(), torch.arange(K) // (K if group_size == -1 else group_size))


def w8a16_reference(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    # x: [..., K]; w: [N, K] int8; scales: [N]
    return (torch.nn.functional.linear(x.float(), w.float()) * scales.float()).to(x.dtype)


def gptq_reference(x, qweight, qzeros, scales, g_idx, bits: int, zero_offset: int = 1,
                   group_size: int | None = None) -> torch.Tensor:
    return (x.float() @ dequantize_gptq(qweight, qzeros, scales, g_idx, bits, zero_offset)).to(x.dtype)


# ---- Triton ----

@triton.jit
def _weight_tile(w_ptr, s_ptr, z_ptr, g_ptr, k0, offs_k, offs_n, N, K,
                 GPTQ: tl.constexpr, BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr, GROUP_SIZE: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """Dequantized [BLOCK_K, BLOCK_N] float32 tile of W (int8 tiles come back unscaled; see the callers).
    GROUP_SIZE > 0: plain grouping, so groups are computed (one per tile when it divides GROUP_SIZE); 0: g_idx."""
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    if GPTQ:
        PACK: tl.constexpr = 32 // BITS
        MAXQ: tl.constexpr = (1 << BITS) - 1
        words = tl.load(w_ptr + (offs_k[:, None] // PACK) * N + offs_n[None, :], mask=mask, other=0)
        q = (words >> ((offs_k[:, None] % PACK) * BITS)) & MAXQ
        TILE_IN_ONE_GROUP: tl.constexpr = GROUP_SIZE > 0 and GROUP_SIZE % BLOCK_K == 0
        if TILE_IN_ONE_GROUP:
            g = k0 // GROUP_SIZE
            n_mask = offs_n < N
            scale = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            zword = tl.load(z_ptr + g * (N // PACK) + offs_n // PACK, mask=n_mask, other=0)
            zero = (((zword >> ((offs_n % PACK) * BITS)) + ZERO_OFFSET) & MAXQ)[None, :]
            return (q - zero).to(tl.float32) * scale
        if GROUP_SIZE > 0:
            g = offs_k // GROUP_SIZE
        else:
            g = tl.load(g_ptr + offs_k, mask=offs_k < K, other=0)
        scale = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        zword = tl.load(z_ptr + g[:, None] * (N // PACK) + offs_n[None, :] // PACK, mask=mask, other=0)
        zero = ((zword >> ((offs_n[None, :] % PACK) * BITS)) + ZERO_OFFSET) & MAXQ
        return (q - zero).to(tl.float32) * scale
    else:
        return tl.load(w_ptr + offs_n[None, :] * K + offs_k[:, None], mask=mask, other=0).to(tl.float32)


@triton.jit
def _word_tile(w_ptr, s_ptr, z_ptr, k0, offs_n, n_mask, N, K, BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr,
               GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """GPTQ with plain grouping, input channels k0 .. k0 + BLOCK_K as their packed words, each loaded once:
    (rows [W], row mask, words [W, BLOCK_N] int32, scale and zero [W or 1, BLOCK_N] float32), W = BLOCK_K / PACK.
    A word never straddles two groups, so each has one scale and zero per column."""
    PACK: tl.constexpr = 32 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
    rows = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
    r_mask = rows < K // PACK
    mask = r_mask[:, None] & n_mask[None, :]
    words = tl.load(w_ptr + rows[:, None] * N + offs_n[None, :], mask=mask, other=0)
    if GROUP_SIZE % BLOCK_K == 0:   # the tile lies in one group: one scale and zero per column
        g = k0 // GROUP_SIZE
        scale = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        zword = tl.load(z_ptr + g * (N // PACK) + offs_n // PACK, mask=n_mask, other=0)[None, :]
    else:
        g = rows * PACK // GROUP_SIZE
        scale = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        zword = tl.load(z_ptr + g[:, None] * (N // PACK) + offs_n[None, :] // PACK, mask=mask, other=0)
    zero = (((zword >> ((offs_n[None, :] % PACK) * BITS)) + ZERO_OFFSET) & MAXQ).to(tl.float32)
    return rows, r_mask, words, scale, zero


def _gemv_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 2})]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=nw)
            for bn, bk, sk, nw in [(32, 128, 1, 4), (32, 128, 4, 4), (64, 128, 2, 4), (64, 64, 4, 4),
                                   (32, 256, 2, 4), (128, 64, 4, 8), (64, 256, 1, 8), (16, 256, 4, 4)]]


@triton.autotune(configs=_gemv_configs(), key=["M_BUCKET", "N", "K"], reset_to_zero=["y_ptr"])
@triton.jit
def _gemv_kernel(x_ptr, y_ptr, w_ptr, s_ptr, z_ptr, g_ptr, M, N, K, M_BUCKET,
                 GPTQ: tl.constexpr, BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    # One row of x times a BLOCK_N-wide strip of W, over a 1/SPLIT_K share of K; y is float32, summed atomically.
    m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m * K + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        w = _weight_tile(w_ptr, s_ptr, z_ptr, g_ptr, k0, offs_k, offs_n, N, K, GPTQ, BITS, ZERO_OFFSET, 0, BLOCK_K)
        acc += tl.sum(x[:, None] * w, axis=0)
    if not GPTQ:
        acc *= tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    tl.atomic_add(y_ptr + m * N + offs_n, acc, mask=offs_n < N)


def _zero_y(nargs):
    nargs["y_ptr"].zero_()


def _direct_configs(split: bool):
    # A config that splits K zeroes y itself (pre_hook: also inside the autotuner's timing, so a split is
    # charged for its zeroing launch), and y need not be zeroed when the unsplit config wins.
    if _INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 2 if split else 1},
                              pre_hook=_zero_y if split else None)]
    # Deep tiles, or a split along K, keep enough bytes in flight for a GEMV to reach memory bandwidth.
    if not split:   # int8: measured on an H100, the deep unsplit tiles beat any split (no zeroing launch)
        return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": 1}, num_warps=nw)
                for bn, bk, nw in [(8, 1024, 4), (16, 512, 4), (16, 1024, 4), (32, 256, 4), (32, 512, 4),
                                   (32, 1024, 8), (64, 256, 8), (16, 256, 2), (8, 512, 2)]]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=nw,
                          pre_hook=_zero_y if sk > 1 else None)
            for bn, bk, sk, nw in [(32, 128, 1, 4), (64, 128, 2, 4), (32, 128, 4, 4), (64, 128, 4, 4),
                                   (128, 128, 4, 8), (64, 64, 8, 4), (32, 256, 4, 4), (64, 256, 2, 8),
                                   (16, 512, 4, 4), (8, 1024, 4, 4), (32, 512, 2, 4), (32, 1024, 1, 8)]]


@triton.jit
def _store_or_add(y_ptr, offs_n, n_mask, y, SPLIT_K: tl.constexpr):
    # With a split along K the programs of one strip add into y (zeroed first) in its own dtype, as
    # exllama's GEMV does: one launch, no float32 buffer and cast.
    if SPLIT_K == 1:
        tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.atomic_add(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.autotune(configs=_direct_configs(split=False), key=["M_BUCKET", "N", "K"], **_GRAPH_TUNED)
@triton.jit
def _gemv_int8_kernel(x_ptr, y_ptr, w_ptr, s_ptr, M, N, K, M_BUCKET,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    # One row of x times a BLOCK_N-row strip of w [N, K] (K contiguous), partial sums kept 2-D until the end.
    m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + m * K + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1) * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    _store_or_add(y_ptr + m * N, offs_n, n_mask, y, SPLIT_K)


@triton.autotune(configs=_direct_configs(split=True), key=["M_BUCKET", "N", "K"], **_GRAPH_TUNED)
@triton.jit
def _gemv_gptq_kernel(x_ptr, y_ptr, w_ptr, s_ptr, z_ptr, M, N, K, M_BUCKET,
                      BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr, GROUP_SIZE: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    # Plain grouping. Each packed word is loaded once, as a [BLOCK_K / PACK, BLOCK_N] tile, and its PACK values
    # come out with PACK shifts, each against x's every PACK-th element.
    m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    PACK: tl.constexpr = 32 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
    WORDS: tl.constexpr = BLOCK_K // PACK
    acc = tl.zeros((WORDS, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        rows, r_mask, words, scale, zero = _word_tile(w_ptr, s_ptr, z_ptr, k0, offs_n, n_mask, N, K, BITS,
                                                      ZERO_OFFSET, GROUP_SIZE, BLOCK_K)
        # sum_j x_j * s * (q_j - z) = s * (sum_j x_j * q_j - z * sum_j x_j), per word
        xq = tl.zeros((WORDS, BLOCK_N), dtype=tl.float32)
        xsum = tl.zeros((WORDS,), dtype=tl.float32)
        for j in tl.static_range(PACK):
            x = tl.load(x_ptr + m * K + rows * PACK + j, mask=r_mask, other=0.0).to(tl.float32)
            xq += x[:, None] * ((words >> (j * BITS)) & MAXQ).to(tl.float32)
            xsum += x
        acc += scale * (xq - zero * xsum[:, None])
    _store_or_add(y_ptr + m * N, offs_n, n_mask, tl.sum(acc, axis=0), SPLIT_K)


def _tiled_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 1, "UNPACK_WORDS": False})]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": 1, "UNPACK_WORDS": False},
                          num_warps=nw, num_stages=ns)
            for bm, bn, bk, nw, ns in [(16, 64, 64, 4, 4), (32, 64, 64, 4, 4), (64, 64, 64, 4, 3),
                                       (64, 128, 32, 4, 3), (128, 128, 32, 8, 3), (128, 64, 64, 4, 3),
                                       (128, 256, 32, 8, 3)]]


def _skinny_configs():
    # Every row of x in one 16-row tile (tl.dot's least); the N strips alone are too few programs to keep a
    # GPU's memory busy, so K is split as in the GEMVs. Not yet timed on a GPU. GPTQ layers also get each
    # tile unpacked word by word (UNPACK_WORDS; its dots need BLOCK_K / PACK >= 16), and the autotuner picks.
    # Every config splits K, so each zeroes y (as the GEMV's split configs do).
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 2, "UNPACK_WORDS": False},
                              pre_hook=_zero_y)]
    return [triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "UNPACK_WORDS": words},
                          num_warps=nw, num_stages=ns, pre_hook=_zero_y)
            for bn, bk, sk, nw, ns in [(32, 128, 4, 4, 3), (64, 128, 2, 4, 3), (64, 128, 4, 4, 3),
                                       (64, 256, 2, 4, 3), (128, 128, 2, 8, 3), (32, 256, 4, 4, 4),
                                       (64, 64, 8, 4, 4), (128, 64, 4, 4, 4), (32, 512, 2, 4, 3)]
            for words in ((False, True) if bk >= 128 else (False,))]


def _unpacking_for_gptq_only(configs, named_args, **_):
    return configs if named_args["GPTQ"] else [c for c in configs if not c.kwargs["UNPACK_WORDS"]]


@triton.jit
def _dot_kernel(x_ptr, y_ptr, w_ptr, s_ptr, z_ptr, g_ptr, M, N, K, M_BUCKET,
                GPTQ: tl.constexpr, BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr, GROUP_SIZE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                UNPACK_WORDS: tl.constexpr):
    # A [BLOCK_M, BLOCK_N] tile of y over a 1/SPLIT_K share of K; split programs add into y (zeroed).
    # UNPACK_WORDS (GPTQ, plain grouping): each packed word is loaded once and its PACK values go into PACK
    # dots against x's every PACK-th column, instead of gathering a [BLOCK_K, BLOCK_N] tile element by element.
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        if UNPACK_WORDS:
            MAXQ: tl.constexpr = (1 << BITS) - 1
            rows, r_mask, words, scale, zero = _word_tile(w_ptr, s_ptr, z_ptr, k0, offs_n, offs_n < N, N, K, BITS,
                                                          ZERO_OFFSET, GROUP_SIZE, BLOCK_K)
            for j in tl.static_range(32 // BITS):
                x = tl.load(x_ptr + offs_m[:, None] * K + rows[None, :] * (32 // BITS) + j,
                            mask=(offs_m[:, None] < M) & r_mask[None, :], other=0.0)
                w = (((words >> (j * BITS)) & MAXQ).to(tl.float32) - zero) * scale
                acc += tl.dot(x, w.to(x.dtype))
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :],
                        mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
            w = _weight_tile(w_ptr, s_ptr, z_ptr, g_ptr, k0, offs_k, offs_n, N, K, GPTQ, BITS, ZERO_OFFSET,
                             GROUP_SIZE, BLOCK_K)
            acc += tl.dot(x, w.to(x.dtype))
    if not GPTQ:
        acc *= tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y_offs = offs_m[:, None] * N + offs_n[None, :]
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        tl.atomic_add(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


_tiled_kernel = triton.autotune(configs=_tiled_configs(), key=["M_BUCKET", "N", "K"])(_dot_kernel)
_skinny_kernel = triton.autotune(configs=_skinny_configs(), key=["M_BUCKET", "N", "K"],
                                 prune_configs_by={"early_config_prune": _unpacking_for_gptq_only},
                                 **_GRAPH_TUNED)(_dot_kernel)


def _launch(x, w, scales, qzeros, g_idx, N, gptq: bool, bits: int, zero_offset: int, group_size: int | None):
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    m_bucket = triton.next_power_of_2(M)
    plain = not gptq or group_size is not None   # int8, or GPTQ with computed groups: the fast kernels
    if M == 1 and plain:
        y = torch.empty(M, N, device=x.device, dtype=x.dtype)   # a config that splits K zeroes it (pre_hook)
        grid = lambda meta: (M, triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
        if gptq:
            _gemv_gptq_kernel[grid](x2, y, w, scales, qzeros, M, N, K, m_bucket, bits, zero_offset, group_size)
        else:
            _gemv_int8_kernel[grid](x2, y, w, scales, M, N, K, m_bucket)
    elif M <= GEMV_MAX_M and plain:
        y = torch.empty(M, N, device=x.device, dtype=x.dtype)   # zeroed by the configs (pre_hook)
        grid = lambda meta: (1, triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
        _skinny_kernel[grid](x2, y, w, scales, qzeros, g_idx, M, N, K, m_bucket, gptq, bits, zero_offset,
                             group_size or 0)
    elif M <= GEMV_MAX_M:
        y = torch.zeros(M, N, device=x.device, dtype=torch.float32)
        grid = lambda meta: (M, triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
        _gemv_kernel[grid](x2, y, w, scales, qzeros, g_idx, M, N, K, m_bucket, gptq, bits, zero_offset)
        y = y.to(x.dtype)
    else:
        y = torch.empty(M, N, device=x.device, dtype=x.dtype)
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), 1)  # noqa: E731
        _tiled_kernel[grid](x2, y, w, scales, qzeros, g_idx, M, N, K, m_bucket, gptq, bits, zero_offset,
                            group_size or 0)
    return y.view(*lead, N)


def w8a16_matmul(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x: [..., K] float; w: [N, K] int8; scales: [N] -> [..., N] in x's dtype."""
    N, K = w.shape
    assert x.shape[-1] == K and w.dtype == torch.int8 and w.is_contiguous() and scales.shape == (N,)
    return _launch(x, w, scales, w, scales, N, gptq=False, bits=8, zero_offset=0, group_size=None)


def gptq_matmul(x, qweight, qzeros, scales, g_idx, bits: int, zero_offset: int = 1,
                group_size: int | None = None) -> torch.Tensor:
    """x: [..., K]; the GPTQ tensors as the module docstring lays them out -> [..., N] in x's dtype.
    group_size (-1: one group) promises plain grouping, g_idx[k] == k // group_size: the fast kernels."""
    K, N = qweight.shape[0] * (32 // bits), qweight.shape[1]
    assert bits in (4, 8) and x.shape[-1] == K and g_idx.shape == (K,) and scales.shape[1] == N
    assert qweight.is_contiguous() and qzeros.is_contiguous() and scales.is_contiguous()
    if group_size is not None:
        group_size = K if group_size == -1 else group_size
        assert group_size % (32 // bits) == 0, "a packed word must not straddle two groups"
    return _launch(x, qweight, scales, qzeros, g_idx, N, gptq=True, bits=bits, zero_offset=zero_offset,
                   group_size=group_size)
