"""Rotary position embedding (rotate-half form) applied to q and k; the Triton kernel rotates in place.

cos and sin are the [P, Dh] tables RotaryEmbedding holds (the two halves of each row are equal).
"""
import torch
import triton
import triton.language as tl


def rotary_reference(positions, q, k, cos, sin):
    # positions: [T]; q: [T, Hq, Dh]; k: [T, Hkv, Dh]; cos, sin: [P, Dh]
    c = cos[positions].to(q.dtype).unsqueeze(1)
    s = sin[positions].to(q.dtype).unsqueeze(1)
    return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@triton.jit
def _rotate_heads(x_ptr, heads, c, s, d, dmask, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr):
    HALF: tl.constexpr = HEAD_DIM // 2
    h = tl.arange(0, BLOCK_H)
    base = x_ptr + h[:, None] * HEAD_DIM + d[None, :]
    mask = (h[:, None] < heads) & dmask[None, :]
    x1 = tl.load(base, mask=mask, other=0.0)
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = tl.load(base + HALF, mask=mask, other=0.0).to(tl.float32)
    c, s = c.to(dtype).to(tl.float32), s.to(dtype).to(tl.float32)  # the tables rounded as the reference rounds them
    tl.store(base, (x1 * c - x2 * s).to(dtype), mask=mask)
    tl.store(base + HALF, (x2 * c + x1 * s).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(pos_ptr, q_ptr, k_ptr, cos_ptr, sin_ptr, HQ, HKV,
                   HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # One program per token: all its q heads, then all its k heads, each as [heads, half] pairs.
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t)
    d = tl.arange(0, BLOCK_HALF)
    dmask = d < HEAD_DIM // 2
    c = tl.load(cos_ptr + pos * HEAD_DIM + d, mask=dmask, other=0.0)[None, :]
    s = tl.load(sin_ptr + pos * HEAD_DIM + d, mask=dmask, other=0.0)[None, :]
    _rotate_heads(q_ptr + t * HQ * HEAD_DIM, HQ, c, s, d, dmask, HEAD_DIM, BLOCK_H)
    _rotate_heads(k_ptr + t * HKV * HEAD_DIM, HKV, c, s, d, dmask, HEAD_DIM, BLOCK_H)


def rotary(positions, q, k, cos, sin):
    T, HQ, D = q.shape
    assert k.shape[0] == T and k.shape[2] == D and q.is_contiguous() and k.is_contiguous()
    assert cos.is_contiguous() and sin.is_contiguous() and cos.shape[1] == D
    _rotary_kernel[(T,)](positions, q, k, cos, sin, HQ, k.shape[1], HEAD_DIM=D,
                         BLOCK_H=triton.next_power_of_2(max(HQ, k.shape[1])),
                         BLOCK_HALF=triton.next_power_of_2(D // 2))
    return q, k
