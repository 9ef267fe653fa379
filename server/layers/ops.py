"""The ops the model calls, picked once at load: the Triton kernels on CUDA, their torch references elsewhere."""
import os
from dataclasses import dataclass
from typing import Callable

import torch

KERNEL_CHOICES = ("auto", "triton", "torch")


@dataclass(frozen=True)
class Ops:
    name: str
    rms_norm: Callable         # (x [T, D], weight, eps, residual=None) -> out, or (out, x + residual)
    rotary: Callable           # (positions [T], q [T, Hq, Dh], k [T, Hkv, Dh], cos, sin) -> (q, k)
    silu_and_mul: Callable     # (gate, up) -> silu(gate) * up
    paged_attention: Callable  # (q, k, v, k_cache, v_cache, meta, scale, window) -> [T, Hq, Dh]
    w8a16_matmul: Callable     # (x, w [N, K] int8, scales [N]) -> [..., N]
    gptq_matmul: Callable      # (x, qweight, qzeros, scales, g_idx, bits, zero_offset, group_size) -> [..., N]
    add_lora: Callable         # (y [T, N], x [T, K], a [S, R, K], b [S, N, R], ranks [S], token_slots [T]) -> y


def select_ops(device: torch.device, kernels: str = "auto") -> Ops:
    """auto: Triton on CUDA, torch elsewhere. triton on a CPU device runs the kernels in Triton's interpreter
    (TRITON_INTERPRET=1 must be set before they are imported), which only tests use."""
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {', '.join(KERNEL_CHOICES)}; got {kernels!r}")
    if kernels == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the Triton kernels run on CUDA devices, not {device.type} "
                         f"(set TRITON_INTERPRET=1 to run them in Triton's slow interpreter for testing)")
    from kernels import lora, paged_attention, quant_matmul, rms_norm, rotary, silu_and_mul
    if kernels == "triton" or (kernels == "auto" and device.type == "cuda"):
        return Ops("triton", rms_norm.rms_norm, rotary.rotary, silu_and_mul.silu_and_mul,
                   paged_attention.paged_attention, quant_matmul.w8a16_matmul, quant_matmul.gptq_matmul, lora.add_lora)
    return Ops("torch", rms_norm.rms_norm_reference, rotary.rotary_reference, silu_and_mul.silu_and_mul_reference,
               paged_attention.paged_attention_reference, quant_matmul.w8a16_reference, quant_matmul.gptq_reference,
               lora.add_lora_reference)
