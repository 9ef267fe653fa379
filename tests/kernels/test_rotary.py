import pytest
import torch

from kernels.rotary import rotary, rotary_reference
from server.layers.rotary import inverse_frequencies
from tests.kernels.conftest import ALL_DTYPES, DEVICE, close


def tables(head_dim: int, positions: int):
    freqs = torch.arange(positions, dtype=torch.float)[:, None] * inverse_frequencies(head_dim, 10000.0, None)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(DEVICE), emb.sin().to(DEVICE)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim", [(1, 4, 2, 16), (5, 6, 2, 64), (13, 7, 7, 128)])
def test_rotary_matches_reference_and_rotates_in_place(tokens, heads, kv_heads, head_dim, dtype):
    cos, sin = tables(head_dim, 300)
    positions = torch.randint(1, 300, (tokens,), device=DEVICE)
    positions[0] = 0  # position 0 is the identity rotation; every other one moves the vector
    q = torch.randn(tokens, heads, head_dim, dtype=dtype, device=DEVICE)
    k = torch.randn(tokens, kv_heads, head_dim, dtype=dtype, device=DEVICE)
    original_q = q.clone()
    ref_q, ref_k = rotary_reference(positions, q, k, cos, sin)
    out_q, out_k = rotary(positions, q, k, cos, sin)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()
    close(out_q, ref_q, dtype, scale=4)
    close(out_k, ref_k, dtype, scale=4)
    assert torch.equal(out_q[0], original_q[0])
    if tokens > 1:
        assert not torch.allclose(out_q[1:], original_q[1:])
