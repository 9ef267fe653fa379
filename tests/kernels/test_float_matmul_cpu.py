import pytest
import torch
import torch.nn.functional as F

from kernels.float_matmul_cpu import MAX_CHUNKED_ROWS, MAX_GEMV_ROWS, float_matmul, row_chunks


@pytest.mark.parametrize("rows", [0, 1, 3, MAX_GEMV_ROWS, MAX_GEMV_ROWS + 1, 16, MAX_CHUNKED_ROWS + 1])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_float_matmul_is_linear(rows, threads, bias):
    g = torch.Generator().manual_seed(rows * 7 + threads)
    w = torch.randn(12, 5, generator=g)
    b = torch.randn(12, generator=g) if bias else None
    x = torch.randn(rows, 5, generator=g)
    y = float_matmul(x, w, row_chunks(w, threads), b)
    assert y.shape == (rows, 12) and y.is_contiguous()
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_float_matmul_keeps_leading_dims_and_takes_strided_rows():
    w = torch.randn(6, 4)
    for x in (torch.randn(2, 3, 4), torch.randn(1, 1, 4), torch.randn(4, 1).t(), torch.randn(3, 8)[:, ::2]):
        torch.testing.assert_close(float_matmul(x, w, row_chunks(w, 2)), F.linear(x, w), rtol=1e-5, atol=1e-5)


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
