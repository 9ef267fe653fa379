"""RMSNorm with an optional fused residual add: out = weight * norm(x + residual), and x + residual.

As Hugging Face computes it: the mean square in float32, the normalised row cast back to the input dtype,
then scaled by the weight. One program per row.
"""
import torch
import triton
import triton.language as tl


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    # x: [T, D]. With a residual: returns (norm(x + residual), x + residual).
    if residual is not None:
        x = x + residual
        residual = x
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(x.dtype)
    return out if residual is None else (out, residual)


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, r_out_ptr, D, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    # Arithmetic in float32, rounded to the input dtype where Hugging Face rounds (the sum, the normed row).
    x = tl.load(x_ptr + row * D + offs, mask=mask, other=0.0)
    dtype = x.dtype
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(r_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)).to(dtype)
        tl.store(r_out_ptr + row * D + offs, x, mask=mask)
    h = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / D + eps)
    normed = (h * rstd).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + offs, (w * normed).to(dtype), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    assert x.dim() == 2 and x.is_contiguous() and weight.shape == (x.shape[1],)
    T, D = x.shape
    out = torch.empty_like(x)
    r_out = torch.empty_like(x) if residual is not None else out
    if residual is not None:
        assert residual.shape == x.shape and residual.is_contiguous()
    _rms_norm_kernel[(T,)](x, residual if residual is not None else x, weight, out, r_out, D, eps,
                           HAS_RESIDUAL=residual is not None, BLOCK_D=triton.next_power_of_2(D),
                           num_warps=4 if D <= 4096 else 8)
    return out if residual is None else (out, r_out)
