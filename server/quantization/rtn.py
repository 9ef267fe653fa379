"""Round-to-nearest quantizers: int8 per output channel, and group-wise k-bit into the GPTQ packed layout.

The group-wise quantizer (min/max range per output channel and group, as auto-gptq's Quantizer finds it) is
shared with the GPTQ algorithm, which differs only in how it rounds.
"""
import torch

from kernels.quant_matmul import pack


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # w: [N, K] float -> (int8 [N, K], scales [N] float32); symmetric, absmax per output channel.
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-8)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def find_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # w: [N, C] the columns of one group -> (scale [N], zero [N]) so that q = clamp(round(w / scale) + zero)
    maxq = 2**bits - 1
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)
    scale = ((xmax - xmin) / maxq).half().float()  # checkpoints store float16 scales: round them first
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale, zero


def quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of w [N] or [N, C] on the grid (scale, zero)."""
    if w.dim() == 2:
        scale, zero = scale[:, None], zero[:, None]
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def pack_gptq(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, bits: int,
              zero_offset: int = 1) -> dict[str, torch.Tensor]:
    """codes [N, K], scales / zeros [G, N], g_idx [K] -> the GPTQ checkpoint tensors (module docstring of
    kernels/quant_matmul.py)."""
    return {"qweight": pack(codes.t().contiguous(), bits, dim=0),
            "qzeros": pack(zeros.to(torch.int64) - zero_offset, bits, dim=1),
            "scales": scales.to(torch.float16).contiguous(),
            "g_idx": g_idx.to(torch.int32).contiguous()}


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int, sym: bool = False) -> dict[str, torch.Tensor]:
    # w: [N, K] -> GPTQ tensors with g_idx = k // group_size
    w = w.float()
    N, K = w.shape
    gs = K if group_size == -1 else group_size
    scales, zeros, codes = [], [], []
    for start in range(0, K, gs):
        cols = w[:, start:start + gs]
        scale, zero = find_params(cols, bits, sym)
        scales.append(scale)
        zeros.append(zero)
        codes.append(quantize_column(cols, scale, zero, bits))
    g_idx = torch.arange(K, device=w.device) // gs
    return pack_gptq(torch.cat(codes, dim=1), torch.stack(scales), torch.stack(zeros), g_idx, bits)
