"""Weight-only quantized matmul, y = x @ dequant(W): int8 per output channel, and the GPTQ packed layout.

int8: w [N, K] int8 (the nn.Linear layout) and scales [N]; W[n, k] = w[n, k] * scales[n].
GPTQ (as auto-gptq writes it), bits 4 or 8, pack = 32 // bits values per int32, lowest bits first:
  qweight [K / pack, N] packs consecutive input channels; qzeros [G, N / pack] packs output channels and
  stores zero - 1; scales [G, N]; g_idx [K] is the group of each input channel (act-order permutes it).
  W[n, k] = scales[g, n] * (q[k, n] - zero[g, n]) with g = g_idx[k].
Both accumulate in float32. Small M (decode) takes a GEMV kernel split along K; larger M a tiled tl.dot
kernel. Autotune keys round M up to a power of two, so a batch that grows by one does not retune.
"""
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
GEMV_MAX_M = 8


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


def w8a16_reference(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    # x: [..., K]; w: [N, K] int8; scales: [N]
    return (torch.nn.functional.linear(x.float(), w.float()) * scales.float()).to(x.dtype)


def gptq_reference(x, qweight, qzeros, scales, g_idx, bits: int, zero_offset: int = 1) -> torch.Tensor:
    return (x.float() @ dequantize_gptq(qweight, qzeros, scales, g_idx, bits, zero_offset)).to(x.dtype)


# ---- Triton ----

@triton.jit
def _weight_tile(w_ptr, s_ptr, z_ptr, g_ptr, offs_k, offs_n, N, K,
                 GPTQ: tl.constexpr, BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr):
    """Dequantized [BLOCK_K, BLOCK_N] float32 tile of W (int8 tiles come back unscaled; see the callers)."""
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    if GPTQ:
        PACK: tl.constexpr = 32 // BITS
        MAXQ: tl.constexpr = (1 << BITS) - 1
        words = tl.load(w_ptr + (offs_k[:, None] // PACK) * N + offs_n[None, :], mask=mask, other=0)
        q = (words >> ((offs_k[:, None] % PACK) * BITS)) & MAXQ
        g = tl.load(g_ptr + offs_k, mask=offs_k < K, other=0)
        scale = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        zword = tl.load(z_ptr + g[:, None] * (N // PACK) + offs_n[None, :] // PACK, mask=mask, other=0)
        zero = ((zword >> ((offs_n[None, :] % PACK) * BITS)) + ZERO_OFFSET) & MAXQ
        return (q - zero).to(tl.float32) * scale
    else:
        return tl.load(w_ptr + offs_n[None, :] * K + offs_k[:, None], mask=mask, other=0).to(tl.float32)


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
        w = _weight_tile(w_ptr, s_ptr, z_ptr, g_ptr, offs_k, offs_n, N, K, GPTQ, BITS, ZERO_OFFSET)
        acc += tl.sum(x[:, None] * w, axis=0)
    if not GPTQ:
        acc *= tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    tl.atomic_add(y_ptr + m * N + offs_n, acc, mask=offs_n < N)


def _tiled_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32})]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=nw, num_stages=ns)
            for bm, bn, bk, nw, ns in [(16, 64, 64, 4, 4), (32, 64, 64, 4, 4), (64, 64, 64, 4, 3),
                                       (64, 128, 32, 4, 3), (128, 128, 32, 8, 3), (128, 64, 64, 4, 3),
                                       (128, 256, 32, 8, 3)]]


@triton.autotune(configs=_tiled_configs(), key=["M_BUCKET", "N", "K"])
@triton.jit
def _tiled_kernel(x_ptr, y_ptr, w_ptr, s_ptr, z_ptr, g_ptr, M, N, K, M_BUCKET,
                  GPTQ: tl.constexpr, BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = _weight_tile(w_ptr, s_ptr, z_ptr, g_ptr, offs_k, offs_n, N, K, GPTQ, BITS, ZERO_OFFSET)
        acc += tl.dot(x, w.to(x.dtype))
    if not GPTQ:
        acc *= tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _launch(x, w, scales, qzeros, g_idx, N, gptq: bool, bits: int, zero_offset: int):
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    m_bucket = triton.next_power_of_2(M)
    args = (w, scales, qzeros, g_idx, M, N, K, m_bucket, gptq, bits, zero_offset)
    if M <= GEMV_MAX_M:
        y = torch.zeros(M, N, device=x.device, dtype=torch.float32)
        grid = lambda meta: (M, triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
        _gemv_kernel[grid](x2, y, *args)
        y = y.to(x.dtype)
    else:
        y = torch.empty(M, N, device=x.device, dtype=x.dtype)
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
        _tiled_kernel[grid](x2, y, *args)
    return y.view(*lead, N)


def w8a16_matmul(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x: [..., K] float; w: [N, K] int8; scales: [N] -> [..., N] in x's dtype."""
    N, K = w.shape
    assert x.shape[-1] == K and w.dtype == torch.int8 and w.is_contiguous() and scales.shape == (N,)
    return _launch(x, w, scales, w, scales, N, gptq=False, bits=8, zero_offset=0)


def gptq_matmul(x, qweight, qzeros, scales, g_idx, bits: int, zero_offset: int = 1) -> torch.Tensor:
    """x: [..., K]; the GPTQ tensors as the module docstring lays them out -> [..., N] in x's dtype."""
    K, N = qweight.shape[0] * (32 // bits), qweight.shape[1]
    assert bits in (4, 8) and x.shape[-1] == K and g_idx.shape == (K,) and scales.shape[1] == N
    assert qweight.is_contiguous() and qzeros.is_contiguous() and scales.is_contiguous()
    return _launch(x, qweight, scales, qzeros, g_idx, N, gptq=True, bits=bits, zero_offset=zero_offset)
