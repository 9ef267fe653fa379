"""Float matmul on CPU: a batched GEMV over row chunks of the weight for one or two rows, oneDNN's GEMM on a
packed copy of the weight for more.

For the one or two rows of x a decode step of one or two sequences has, the CPU BLAS parallelizes x @ W.T
poorly: one [N, K] weight read by all threads runs at about the bandwidth of one core. Seen as C chunks of rows,
[C, N / C, K], the same weight is C independent products that torch.bmm hands one to each thread, each reading
its rows start to end, which reads it at close to the machine's bandwidth. Nothing is copied: the chunks are a
view of the weight as the checkpoint stores it (output-major).

From three rows on (a decode step of several sequences, a prefill) the product is compute-bound, and oneDNN's
GEMM over a copy of the weight reordered once into its own blocked layout (torch.ops.mkldnn: what Inductor's
freezing does to the same layers) runs well ahead of MKL's F.linear or the chunks over the plain weight; at one
or two rows streaming the plain weight wins (bench/RESULTS.md, "oneDNN's packed GEMM"). So a float32 weight on
CPU is held twice, plain and packed (the loader packs only where the copies fit in half the memory available).
bfloat16 weights, and float32 ones with one thread, have no chunks (a chunked bmm gains nothing there) and take
the packed GEMM at every row count where oneDNN supports their dtype; F.linear elsewhere.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MAX_GEMV_ROWS = 2


@dataclass
class CpuFloatWeight:
    chunks: torch.Tensor | None   # [C, N / C, K]: a view of a float32 weight, for up to MAX_GEMV_ROWS rows
    packed: torch.Tensor | None   # oneDNN's reordered copy, for more rows (and every row count without chunks)


def cpu_float_weight(weight: torch.Tensor, threads: int | None = None, pack: bool = True) -> CpuFloatWeight | None:
    """The CPU forms of a float weight [N, K] (the packed copy only with pack), or None where neither applies
    (F.linear then). Take it after the weight's storage is final: the chunks are a view of it."""
    if weight.device.type != "cpu":
        return None
    chunks = row_chunks(weight, threads)
    packed = None
    if pack and torch.backends.mkldnn.is_available() and (
            weight.dtype == torch.float32 or
            (weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())):
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
    return CpuFloatWeight(chunks, packed) if chunks is not None or packed is not None else None


def row_chunks(weight: torch.Tensor, threads: int | None = None) -> torch.Tensor | None:
    """The weight as [C, N / C, K], a view, C the largest count up to the number of threads that divides the rows
    if it keeps at least half the threads busy; None unless the weight is a contiguous float32 one on CPU and
    there are two threads or more."""
    threads = threads or torch.get_num_threads()
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or not weight.is_contiguous() or threads < 2:
        return None
    c = next((c for c in range(threads, max(2, threads // 2) - 1, -1) if weight.shape[0] % c == 0), 0)
    return weight.view(c, weight.shape[0] // c, weight.shape[1]) if c else None


def float_matmul(x: torch.Tensor, weight: torch.Tensor, cpu: CpuFloatWeight | None,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    # x: [..., K]; weight: [N, K]; cpu: cpu_float_weight(weight); returns x @ weight.T (+ bias): [..., N]
    if cpu is None or torch.compiler.is_compiling():   # compiled: Inductor picks its own GEMM
        return F.linear(x, weight, bias)
    K = weight.shape[1]
    M = x.numel() // K
    if cpu.chunks is None or M > MAX_GEMV_ROWS:
        if cpu.packed is None:
            return F.linear(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, cpu.packed, bias, "none", [], "")
    C, n, _ = cpu.chunks.shape
    if M == 1:   # [C, n, K] @ [C, K, 1]
        # (x.t() keeps stride K on its last, size-1 dim: the BLAS reads strides (0, 1, 1) as another layout and
        # takes a path 5x slower)
        y = torch.bmm(cpu.chunks, x.reshape(1, K).t().expand(C, K, 1)).view(1, C * n)
    else:
        rows = x.reshape(-1, K)
        y = torch.bmm(cpu.chunks, rows.t().expand(C, K, M)).view(C * n, M).t().contiguous()     # [C, n, M]
    y = y.view(*x.shape[:-1], C * n)
    return y if bias is None else y + bias
