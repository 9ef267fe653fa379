"""Kernel tests: each Triton kernel against its torch reference, on CUDA when present, else in the interpreter."""
import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = DEVICE.type == "cpu"

# Triton's interpreter computes bfloat16 tl.dot wrongly (numpy has no bfloat16), so kernels built on tl.dot are
# checked in bfloat16 on a GPU only; elementwise kernels are checked in every dtype everywhere.
DOT_DTYPES = [torch.float32, torch.float16] + ([] if INTERPRETED else [torch.bfloat16])
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Tolerance per dtype: |actual - expected| <= TOL * scale * (1 + |expected|), a few units in the last place.
# On a GPU, tl.dot takes float32 operands as TF32 (a 10-bit mantissa, as torch does with allow_tf32), so float32
# is held to TF32's tolerance there.
TOL = {torch.float32: 1e-4 if INTERPRETED else 1e-3, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    err = (actual.float() - expected.float()).abs() / (1 + expected.float().abs())
    assert err.max().item() <= TOL[dtype] * scale, f"max error {err.max().item()} over {TOL[dtype] * scale} ({dtype})"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
