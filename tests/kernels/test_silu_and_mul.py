import pytest
import torch

from kernels.silu_and_mul import silu_and_mul, silu_and_mul_reference
from tests.kernels.conftest import ALL_DTYPES, DEVICE, close


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", [(1, 128), (5, 123), (33, 1030)])
def test_silu_and_mul_matches_reference(shape, dtype):
    gate, up = (torch.randn(shape, dtype=dtype, device=DEVICE) * 3 for _ in range(2))
    close(silu_and_mul(gate, up), silu_and_mul_reference(gate, up), dtype, scale=8)
