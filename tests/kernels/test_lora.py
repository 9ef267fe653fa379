import pytest
import torch

from kernels.lora import add_lora, add_lora_reference
from tests.kernels.conftest import ALL_DTYPES, DEVICE, close


def random_pool(K: int, N: int, ranks: list[int], max_rank: int, dtype, padding: float):
    """A pool of adapters with the given ranks; rows and columns past each rank hold `padding`."""
    S = len(ranks)
    a = torch.full((S, max_rank, K), padding)
    b = torch.full((S, N, max_rank), padding)
    for s, r in enumerate(ranks):
        a[s, :r] = torch.randn(r, K) / K ** 0.5
        b[s, :, :r] = torch.randn(N, r) / r ** 0.5
    return a.to(DEVICE, dtype), b.to(DEVICE, dtype), torch.tensor(ranks, dtype=torch.int32, device=DEVICE)


def expected(y, x, a, b, ranks, token_slots):
    # One token at a time, each with its own adapter truncated to its rank: what every path must compute.
    out = y.float().clone()
    for t, s in enumerate(token_slots.tolist()):
        if s >= 0:
            r = int(ranks[s])
            out[t] += (x[t].float() @ a[s, :r].float().t()) @ b[s, :, :r].float().t()
    return out.to(y.dtype)


CASES = [  # (tokens, K, N, adapter ranks, max rank): decode and prefill sizes, odd features, ranks 4-64
    (1, 64, 96, [8], 8),
    (5, 72, 40, [4, 16, 64], 64),
    (17, 130, 33, [8, 4], 16),
    (40, 256, 200, [16, 32, 8, 4], 32)]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("T,K,N,ranks,max_rank", CASES)
def test_add_lora_matches_each_token_alone(T, K, N, ranks, max_rank, dtype):
    x = torch.randn(T, K, device=DEVICE).to(dtype)
    y = torch.randn(T, N, device=DEVICE).to(dtype)
    token_slots = torch.randint(-1, len(ranks), (T,), device=DEVICE)
    token_slots[0] = len(ranks) - 1    # at least one token under an adapter
    a, b, rank_t = random_pool(K, N, ranks, max_rank, dtype, padding=0.0)
    want = expected(y, x, a, b, rank_t, token_slots)
    close(add_lora_reference(y.clone(), x, a, b, rank_t, token_slots), want, dtype, scale=4)
    # The kernel must stop at each adapter's rank: padding full of garbage changes nothing.
    a_junk, b_junk, _ = random_pool(K, N, ranks, max_rank, dtype, padding=1e3)
    a_junk[:, :, :], b_junk[:, :, :] = torch.where(_padding_mask(a, ranks, 1), a_junk, a), \
        torch.where(_padding_mask(b, ranks, 2), b_junk, b)
    got = add_lora(y.clone(), x, a_junk, b_junk, rank_t, token_slots.int())
    close(got, want, dtype, scale=4)
    base = token_slots < 0
    assert torch.equal(got[base], y[base])     # base-model rows are untouched


def _padding_mask(t: torch.Tensor, ranks: list[int], rank_dim: int) -> torch.Tensor:
    mask = torch.zeros_like(t, dtype=torch.bool)
    for s, r in enumerate(ranks):
        index = [s, slice(None), slice(None)]
        index[rank_dim] = slice(r, None)
        mask[tuple(index)] = True
    return mask


def test_add_lora_adds_in_place_and_with_no_adapter_rows_changes_nothing():
    x, y = torch.randn(3, 32, device=DEVICE), torch.randn(3, 48, device=DEVICE)
    a, b, ranks = random_pool(32, 48, [8], 8, torch.float32, 0.0)
    before = y.clone()
    assert add_lora(y, x, a, b, ranks, torch.full((3,), -1, dtype=torch.int32, device=DEVICE)) is y
    assert torch.equal(y, before)
