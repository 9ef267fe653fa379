import pytest
import torch
import torch.nn.functional as F

from kernels.float_matmul_cpu import MAX_CHUNKED_ROWS, MAX_GEMV_ROWS, float_matmul, row_chunks


@pytest.mark.parametrize("rows", [0, 1, 3, MAX_GEMV_ROWS, MAX_GEMV_ROWS + 1, 16, MAX_CHUNKED_ROWS + 1])
@pytest.mark.parametrize("chunks", [0, 2, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_float_matmul_is_linear(rows, chunks, bias):
    g = torch.Generator().manual_seed(rows * 7 + chunks)
    w = torch.randn(12, 5, generator=g)
    b = torch.randn(12, generator=g) if bias else None
    x = torch.randn(rows, 5, generator=g)
    y = float_matmul(x, w, chunks, b)
    assert y.shape == (rows, 12) and y.is_contiguous()
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_float_matmul_keeps_leading_dims():
    w, x = torch.randn(6, 4), torch.randn(2, 3, 4)
    torch.testing.assert_close(float_matmul(x, w, 2), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_row_chunks():
    assert row_chunks(torch.empty(12, 4), threads=4) == 4
    assert row_chunks(torch.empty(9, 4), threads=4) == 3      # the largest count up to the threads that divides N
    assert row_chunks(torch.empty(7, 4), threads=4) == 0      # a prime number of rows: plain F.linear
    assert row_chunks(torch.empty(12, 4), threads=1) == 0
    assert row_chunks(torch.empty(2 * 17, 4), threads=16) == 0   # 2 chunks would leave 14 of 16 threads idle
    assert row_chunks(torch.empty(12, 4, dtype=torch.bfloat16), threads=4) == 0
    assert row_chunks(torch.empty(4, 12).t(), threads=4) == 0  # not contiguous: the chunks would not be views
