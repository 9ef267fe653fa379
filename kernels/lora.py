"""Batched LoRA for a batch that mixes adapters: y[t] += (x[t] @ A[s]^T) @ B[s]^T with s = token_slots[t].

A [slots, R, K] and B [slots, N, R] hold every resident adapter, ranks zero-padded to R and the scaling
folded into B; s = -1 is the base model (no delta). Gather-style, as in Punica's BGMV: each token reads its
own adapter's A and B, so one launch serves any mix. The rank-r intermediate stays in float32: `shrink`
splits K across programs and adds partial sums atomically, `expand` reads it and adds into y in place.
ranks[s] bounds the loads, so a rank-8 adapter in a rank-64 pool reads only its 8 rows.
"""
import torch
import triton
import triton.language as tl


def add_lora_reference(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                       ranks: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    for slot in token_slots.unique().tolist():
        if slot < 0:
            continue
        rows = (token_slots == slot).nonzero().squeeze(1)
        y.index_add_(0, rows, ((x.index_select(0, rows) @ a[slot].t()) @ b[slot].t()).to(y.dtype))
    return y


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, slots_ptr, ranks_ptr, buf_ptr, K, K_PER_SPLIT,
                   stride_xt, stride_as, stride_ar, stride_bt,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    t, split = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slots_ptr + t)
    if slot < 0:
        return
    rank = tl.load(ranks_ptr + slot)
    r = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    k_start = split * K_PER_SPLIT
    for k0 in range(k_start, tl.minimum(k_start + K_PER_SPLIT, K), BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < tl.minimum(k_start + K_PER_SPLIT, K)
        xk = tl.load(x_ptr + t * stride_xt + k, mask=k_mask, other=0.0).to(tl.float32)
        ak = tl.load(a_ptr + slot * stride_as + r[:, None] * stride_ar + k[None, :],
                     mask=(r[:, None] < rank) & k_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(ak * xk[None, :], axis=1)
    tl.atomic_add(buf_ptr + t * stride_bt + r, acc, mask=r < rank)


@triton.jit
def _expand_kernel(buf_ptr, b_ptr, slots_ptr, ranks_ptr, y_ptr, N,
                   stride_bt, stride_bs, stride_bn, stride_yt,
                   BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    t, pid_n = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slots_ptr + t)
    if slot < 0:
        return
    rank = tl.load(ranks_ptr + slot)
    r = tl.arange(0, BLOCK_R)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    h = tl.load(buf_ptr + t * stride_bt + r, mask=r < rank, other=0.0)
    bn = tl.load(b_ptr + slot * stride_bs + n[:, None] * stride_bn + r[None, :],
                 mask=n_mask[:, None] & (r[None, :] < rank), other=0.0).to(tl.float32)
    delta = tl.sum(bn * h[None, :], axis=1)
    y_row = y_ptr + t * stride_yt + n
    y = tl.load(y_row, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_row, (y + delta).to(y_ptr.dtype.element_ty), mask=n_mask)


def add_lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
             ranks: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """y [T, N] += per-token LoRA delta of x [T, K]; a [S, R, K], b [S, N, R], ranks [S], token_slots [T]."""
    (T, K), N, R = x.shape, y.shape[1], a.shape[1]
    assert y.shape[0] == T and a.shape[2] == K and b.shape[1:] == (N, R) and token_slots.shape == (T,)
    assert x.stride(1) == 1 and y.stride(1) == 1 and a.is_contiguous() and b.is_contiguous()
    block_r = max(16, triton.next_power_of_2(R))
    buf = torch.zeros(T, block_r, dtype=torch.float32, device=x.device)
    block_k = 64 if block_r <= 32 else 32
    # Few tokens leave most of the GPU idle: split K so a decode step still spreads over many programs.
    splits = max(1, min(triton.cdiv(K, block_k), triton.cdiv(256, T)))
    k_per_split = triton.cdiv(triton.cdiv(K, splits), block_k) * block_k
    splits = triton.cdiv(K, k_per_split)
    _shrink_kernel[(T, splits)](x, a, token_slots, ranks, buf, K, k_per_split,
                                x.stride(0), a.stride(0), a.stride(1), buf.stride(0),
                                BLOCK_R=block_r, BLOCK_K=block_k)
    block_n = 64
    _expand_kernel[(T, triton.cdiv(N, block_n))](buf, b, token_slots, ranks, y, N,
                                                 buf.stride(0), b.stride(0), b.stride(1), y.stride(0),
                                                 BLOCK_R=block_r, BLOCK_N=block_n)
    return y
