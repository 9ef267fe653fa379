import pytest
import torch
import torch.nn.functional as F

from kernels.float_matmul_cpu import MAX_GEMV_ROWS, cpu_float_weight, float_matmul, row_chunks


@pytest.mark.parametrize("rows", [0, 1, MAX_GEMV_ROWS, MAX_GEMV_ROWS + 1, 16, 300])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_matmul_is_linear(rows, threads, bias, dtype):
    g = torch.Generator().manual_seed(rows * 7 + threads)
    w = torch.randn(12, 5, generator=g).to(dtype)
    b = torch.randn(12, generator=g).to(dtype) if bias else None
    x = torch.randn(rows, 5, generator=g).to(dtype)
    y = float_matmul(x, w, cpu_float_weight(w, threads), b)
    assert y.shape == (rows, 12) and y.is_contiguous() and y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=tol, atol=tol)


def test_float_matmul_keeps_leading_dims_and_takes_strided_rows():
    w = torch.randn(6, 4)
    for x in (torch.randn(2, 3, 4), torch.randn(1, 1, 4), torch.randn(1, 2, 4), torch.randn(4, 1).t(),
              torch.randn(3, 8)[:, ::2], torch.randn(4, 9)[:, ::2].t()):
        torch.testing.assert_close(float_matmul(x, w, cpu_float_weight(w, 2)), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_cpu_float_weight_forms():
    w = torch.randn(12, 4)
    cpu = cpu_float_weight(w, threads=4)
    assert cpu.chunks.shape == (4, 3, 4) and (cpu.packed is not None) == torch.backends.mkldnn.is_available()
    assert cpu_float_weight(w, threads=1).chunks is None    # one thread: no chunks, the packed GEMM at every row count
    assert cpu_float_weight(w.half(), threads=4) is None    # float16: plain F.linear


def test_row_chunks():
    def count(weight, threads):
        chunks = row_chunks(weight, threads)
        if chunks is not None:
            assert chunks.data_ptr() == weight.data_ptr()   # a view: nothing copied
        return 0 if chunks is None else chunks.shape[0]
    assert count(torch.empty(12, 4), threads=4) == 4
    assert count(torch.empty(9, 4), threads=4) == 3      # the largest count up to the threads that divides N
    assert count(torch.empty(7, 4), threads=4) == 0      # a prime number of rows: plain F.linear
    assert count(torch.empty(12, 4), threads=1) == 0
    assert count(torch.empty(2 * 17, 4), threads=16) == 0   # 2 chunks would leave 14 of 16 threads idle
    assert count(torch.empty(12, 4, dtype=torch.bfloat16), threads=4) == 0
    assert count(torch.empty(4, 12).t(), threads=4) == 0  # not contiguous: the chunks would not be views
