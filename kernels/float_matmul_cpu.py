"""Float32 matmul on CPU as one batched GEMV over row chunks of the weight.

For the few rows of x a decode step has, the CPU BLAS parallelizes x @ W.T poorly: one [N, K] weight read by
all threads runs at about the bandwidth of one core. Seen as C chunks of rows, [C, N / C, K], the same weight
is C independent products that torch.bmm hands one to each thread, each reading its rows start to end, which
reads it at close to the machine's bandwidth. Nothing is copied: the chunks are a view of the weight as the
checkpoint stores it (output-major). Up to 8 rows of x, each chunk multiplies x's columns (a GEMV per row of
the chunk, read once); up to 256, x multiplies each chunk transposed (a small GEMM per thread); beyond that,
and for bfloat16 and float16 weights, which gain nothing from chunks, F.linear.
"""
import torch
import torch.nn.functional as F

MAX_GEMV_ROWS = 8
MAX_CHUNKED_ROWS = 256


def row_chunks(weight: torch.Tensor, threads: int | None = None) -> int:
    """How many row chunks this weight is read in (0: plain F.linear): the largest count up to the number of
    threads that divides the rows, if it keeps at least half the threads busy, for a contiguous float32 weight
    on CPU and at least two threads."""
    threads = threads or torch.get_num_threads()
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or not weight.is_contiguous() or threads < 2:
        return 0
    return next((c for c in range(threads, max(2, threads // 2) - 1, -1) if weight.shape[0] % c == 0), 0)


def float_matmul(x: torch.Tensor, weight: torch.Tensor, chunks: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    # x: [..., K]; weight: [N, K]; returns x @ weight.T (+ bias): [..., N]
    if not chunks:
        return F.linear(x, weight, bias)
    N, K = weight.shape
    rows = x.reshape(-1, K)
    M = rows.shape[0]
    if M > MAX_CHUNKED_ROWS:
        return F.linear(x, weight, bias)
    w = weight.view(chunks, N // chunks, K)
    if M <= MAX_GEMV_ROWS:
        y = torch.bmm(w, rows.t().expand(chunks, K, M)).view(N, M).t().contiguous()          # [C, N / C, M]
    else:
        y = torch.bmm(rows.expand(chunks, M, K), w.transpose(1, 2)).transpose(0, 1).reshape(M, N)  # [C, M, N / C]
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], N)
