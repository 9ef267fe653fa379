import pytest
import torch

from kernels.rms_norm import rms_norm, rms_norm_reference
from tests.kernels.conftest import ALL_DTYPES, DEVICE, close


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("rows,dim", [(1, 64), (5, 123), (17, 256)])
def test_rms_norm_matches_reference(rows, dim, dtype):
    x = torch.randn(rows, dim, dtype=dtype, device=DEVICE)
    w = torch.randn(dim, dtype=dtype, device=DEVICE)
    close(rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5), dtype, scale=4)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_rms_norm_with_residual_returns_the_sum_too(dtype):
    x, r = (torch.randn(9, 123, dtype=dtype, device=DEVICE) for _ in range(2))
    w = torch.randn(123, dtype=dtype, device=DEVICE)
    out, summed = rms_norm(x, w, 1e-6, r)
    ref_out, ref_sum = rms_norm_reference(x, w, 1e-6, r)
    close(summed, ref_sum, dtype, scale=4)
    close(out, ref_out, dtype, scale=4)


def test_rms_norm_kernel_is_not_the_identity():
    x = torch.randn(3, 64, device=DEVICE) * 10
    w = torch.ones(64, device=DEVICE)
    out = rms_norm(x, w, 1e-6)
    assert torch.allclose(out.pow(2).mean(-1), torch.ones(3, device=DEVICE), atol=1e-4)
