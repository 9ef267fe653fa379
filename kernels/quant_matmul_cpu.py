"""Weight-only quantized matmul on CPU through PyTorch's packed kernels (as torchao and gpt-fast run them).

int8: aten._weight_int8pack_mm(x, w [N, K] int8, scales [N]) computes x @ (w * scales).T, for K a multiple
  of 16 (other K crash it).
int4: aten._convert_weight_to_int4pack_for_cpu(codes [N, K] int32 in [0, 16)) packs the codes once, and
  aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros [K / group_size, N, 2]) computes
  with W[n, k] = (codes[n, k] - 8) * scale[g, n] + zero[g, n], g = k // group_size, for group_size 32, 64,
  128 or 256 and N a multiple of 16.
Both are fast only for bfloat16 activations, so they compute in bfloat16 whatever the caller's dtype: x is
rounded to bfloat16, scales and zeros are stored in it, and y comes back in it (accumulated in float32)
before it is cast to x's dtype. A GPTQ layer (kernels/quant_matmul.py) of plain grouping converts exactly:
W = s * (q - z) = (q - 8) * s + (8 - z) * s, each GPTQ group split into kernel groups of equal size.
"""
import torch

from kernels.quant_matmul import unpack

COMPUTE_DTYPE = torch.bfloat16
INT4_GROUP_SIZES = (256, 128, 64, 32)


def int8_kernel_serves(in_features: int) -> bool:
    return in_features % 16 == 0


def int8_matmul(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    # x: [..., K]; w: [N, K] int8; scales: [N] in COMPUTE_DTYPE
    y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).to(COMPUTE_DTYPE), w, scales)
    return y.to(x.dtype).view(*x.shape[:-1], w.shape[0])


def int4_group_size(in_features: int, out_features: int, group_size: int) -> int | None:
    """The kernel group size that serves GPTQ groups of group_size (-1: the whole row): the largest one that
    divides both the GPTQ group and K; None where none does or N is not a multiple of 16."""
    gs = in_features if group_size == -1 else group_size
    if out_features % 16:
        return None
    return next((g for g in INT4_GROUP_SIZES if gs % g == 0 and in_features % g == 0), None)


def gptq_to_int4pack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, zero_offset: int,
                     group_size: int, kernel_group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit GPTQ tensors of plain grouping -> (packed weight, scales_and_zeros [K / kernel_group_size, N, 2])."""
    codes = unpack(qweight, 4, dim=0)                                    # [K, N]
    K = codes.shape[0]
    zeros = ((unpack(qzeros, 4, dim=1) + zero_offset) & 15).float()     # [G, N]
    scales = scales.float()
    per_group = (K if group_size == -1 else group_size) // kernel_group_size
    s = scales.repeat_interleave(per_group, 0)[:K // kernel_group_size]
    z = zeros.repeat_interleave(per_group, 0)[:K // kernel_group_size]
    scales_and_zeros = torch.stack([s, (8 - z) * s], dim=2).to(COMPUTE_DTYPE).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.t().contiguous().to(torch.int32), 1)
    return packed, scales_and_zeros


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    # x: [..., K]; packed: [N, K / 2] uint8
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]).to(COMPUTE_DTYPE), packed, group_size,
                                                    scales_and_zeros)
    return y.to(x.dtype).view(*x.shape[:-1], packed.shape[0])


def int4pack_weight(packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """[N, K] float32: the weight int4_matmul computes with. The codes are read back through the kernel itself
    (scale 1, zero 8 makes W the codes, small integers a bfloat16 output holds exactly)."""
    groups, N, _ = scales_and_zeros.shape
    K = groups * group_size
    unit = torch.stack([torch.ones(groups, N), torch.full((groups, N), 8.0)], dim=2).to(COMPUTE_DTYPE)
    codes = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(K, dtype=COMPUTE_DTYPE), packed, group_size, unit)
    s, z = scales_and_zeros.float().unbind(-1)                           # [K / group_size, N]
    return ((codes.float() - 8) * s.repeat_interleave(group_size, 0) + z.repeat_interleave(group_size, 0)).t()
