"""Float32 matmul on CPU as one batched GEMV over row chunks of the weight.

For the few rows of x a decode step has, the CPU BLAS parallelizes x @ W.T poorly: one [N, K] weight read by
all threads runs at about the bandwidth of one core. Seen as C chunks of rows, [C, N / C, K], the same weight
is C independent products that torch.bmm hands one to each thread, each reading its rows start to end, which
reads it at close to the machine's bandwidth. Nothing is copied: the chunks are a view of the weight as the
checkpoint stores it (output-major). Up to 8 rows of x, each chunk multiplies x's columns (a GEMV per row of
the chunk, read once); up to 256, x multiplies each chunk transposed (a small GEMM per thread); beyond that,
and for bfloat16 and float16 weights, which gain nothing from chunks, F.linear. A decode step runs ~120 of
these, so the one-row case takes as few ops as it can.
"""
import torch
import torch.nn.functional as F

MAX_GEMV_ROWS = 8
MAX_CHUNKED_ROWS = 256


def row_chunks(weight: torch.Tensor, threads: int | None = None) -> torch.Tensor | None:
    """The weight as [C, N / C, K], a view, C the largest count up to the number of threads that divides the rows
    if it keeps at least half the threads busy; None (plain F.linear) unless the weight is a contiguous float32
    one on CPU and there are two threads or more. Take it after the weight's storage is final: it is a view."""
    threads = threads or torch.get_num_threads()
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or not weight.is_contiguous() or threads < 2:
        return None
    c = next((c for c in range(threads, max(2, threads // 2) - 1, -1) if weight.shape[0] % c == 0), 0)
    return weight.view(c, weight.shape[0] // c, weight.shape[1]) if c else None


def float_matmul(x: torch.Tensor, weight: torch.Tensor, chunks: torch.Tensor | None,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    # x: [..., K]; weight: [N, K]; chunks: row_chunks(weight); returns x @ weight.T (+ bias): [..., N]
    if chunks is None or torch.compiler.is_compiling():   # compiled: Inductor picks its own GEMM
        return F.linear(x, weight, bias)
    C, n, K = chunks.shape
    if x.dim() == 2 and x.shape[0] == 1:   # one row: [C, n, K] @ [C, K, 1]
        # (x.t() keeps stride K on its last, size-1 dim: the BLAS reads strides (0, 1, 1) as another layout and
        # takes a path 5x slower)
        y = torch.bmm(chunks, x.t().expand(C, K, 1)).view(1, C * n)
    else:
        rows = x.reshape(-1, K)
        M = rows.shape[0]
        if M > MAX_CHUNKED_ROWS:
            return F.linear(x, weight, bias)
        if M <= MAX_GEMV_ROWS:
            y = torch.bmm(chunks, rows.t().expand(C, K, M)).view(C * n, M).t().contiguous()     # [C, n, M]
        else:
            y = torch.bmm(rows.expand(C, M, K), chunks.transpose(1, 2)).transpose(0, 1).reshape(M, C * n)  # [C, M, n]
        y = y.view(*x.shape[:-1], C * n)
    return y if bias is None else y + bias
