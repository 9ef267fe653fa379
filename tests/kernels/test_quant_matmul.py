import pytest
import torch
import triton

from kernels.quant_matmul import (GEMV_MAX_M, dequantize_gptq, gptq_matmul, gptq_reference, is_plain_grouping,
                                  pack, sort_act_order, unpack, w8a16_matmul, w8a16_reference)
from tests.kernels.conftest import DEVICE, DOT_DTYPES, close

# M = 1 takes the GEMV kernels, 5 the split-K tl.dot kernel with every row in one tile, 33 and 123 the tiled one.
M_VALUES = [1, 5, 33, 123]
assert min(M_VALUES[2:]) > GEMV_MAX_M >= max(M_VALUES[:2])


def random_gptq(K: int, N: int, bits: int, group_size: int, act_order: bool):
    pack_n = 32 // bits
    groups = -(-K // group_size)
    codes = torch.randint(0, 2**bits, (K, N))
    zeros = torch.randint(0, 2**bits, (groups, N))
    scales = torch.rand(groups, N) / (2**bits * 8) + 1e-3
    g_idx = torch.arange(K) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(K)]
    tensors = dict(qweight=pack(codes, bits, 0), qzeros=pack(zeros - 1, bits, 1), scales=scales.half(),
                   g_idx=g_idx.int())
    dense = scales.half().float()[g_idx] * (codes - zeros[g_idx]).float()   # [K, N], written out independently
    assert N % pack_n == 0 and K % pack_n == 0
    return {k: v.to(DEVICE) for k, v in tensors.items()}, dense.to(DEVICE)


def test_pack_round_trips_and_puts_the_first_value_in_the_lowest_bits():
    values = torch.randint(0, 16, (16, 24))
    assert torch.equal(unpack(pack(values, 4, 0), 4, 0), values)
    assert torch.equal(unpack(pack(values, 4, 1), 4, 1), values)
    word = pack(torch.tensor([[1], [2], [0], [0], [0], [0], [0], [15]]), 4, 0)
    assert word.item() == 1 + (2 << 4) - (1 << 28)  # 0xF0000021 as a signed int32


@pytest.mark.parametrize("bits,act_order", [(4, False), (4, True), (8, False), (8, True)])
def test_dequantize_gptq_matches_the_format(bits, act_order):
    tensors, dense = random_gptq(64, 40, bits, 16, act_order)
    assert torch.equal(dequantize_gptq(**tensors, bits=bits), dense)


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("M", M_VALUES)
@pytest.mark.parametrize("K,N", [(64, 40), (200, 96)])
@pytest.mark.parametrize("bits,group_size,act_order", [(4, 32, False), (4, 32, True), (4, 200, False), (8, 64, True)])
def test_gptq_matmul_matches_reference(M, K, N, bits, group_size, act_order, dtype):
    tensors, dense = random_gptq(K, N, bits, group_size, act_order)
    x = torch.randn(M, K, dtype=dtype, device=DEVICE)
    ref = gptq_reference(x, **tensors, bits=bits)
    close(ref, (x.float() @ dense).to(dtype), dtype, scale=4)
    close(gptq_matmul(x, **tensors, bits=bits), ref, dtype, scale=4)     # any g_idx: the general kernels
    if act_order:   # brought to plain grouping as the loader does: permute K in the weights and in x
        qweight, perm = sort_act_order(tensors["qweight"], tensors["g_idx"], bits)
        tensors = tensors | {"qweight": qweight, "g_idx": tensors["g_idx"][perm]}
        x = x[:, perm]
    assert is_plain_grouping(tensors["g_idx"], group_size)
    close(gptq_matmul(x, **tensors, bits=bits, group_size=group_size), ref, dtype, scale=4)


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("M", [1, 5, 40])
@pytest.mark.parametrize("K,N,group_size", [(512, 48, 128), (1024, 40, 512), (256, 64, -1), (96, 32, 32)])
def test_plain_grouping_over_deep_tiles(M, K, N, group_size, dtype):
    # Sizes where a kernel tile spans several groups, exactly one, or a part of one.
    tensors, dense = random_gptq(K, N, 4, K if group_size == -1 else group_size, False)
    x = torch.randn(M, K, dtype=dtype, device=DEVICE)
    close(gptq_matmul(x, **tensors, bits=4, group_size=group_size), (x.float() @ dense).to(dtype), dtype, scale=4)


def test_sort_act_order_permutes_k_so_groups_are_contiguous():
    tensors, dense = random_gptq(64, 16, 4, 16, act_order=True)
    assert not is_plain_grouping(tensors["g_idx"], 16)
    qweight, perm = sort_act_order(tensors["qweight"], tensors["g_idx"], 4)
    sorted_dense = dequantize_gptq(qweight, tensors["qzeros"], tensors["scales"], tensors["g_idx"][perm], 4)
    assert torch.equal(sorted_dense, dense[perm])


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("M", M_VALUES)
@pytest.mark.parametrize("K,N", [(64, 40), (123, 77)])
def test_w8a16_matmul_matches_reference(M, K, N, dtype):
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=DEVICE)
    scales = torch.rand(N, device=DEVICE) / 127 / 4
    x = torch.randn(M, K, dtype=dtype, device=DEVICE)
    ref = w8a16_reference(x, w, scales)
    close(ref, (x.float() @ (w.float() * scales[:, None]).t()).to(dtype), dtype, scale=4)
    close(w8a16_matmul(x, w, scales), ref, dtype, scale=4)


def test_quant_matmul_keeps_leading_dimensions():
    w = torch.randint(-127, 128, (16, 32), dtype=torch.int8, device=DEVICE)
    x = torch.randn(2, 3, 32, device=DEVICE)
    assert w8a16_matmul(x, w, torch.ones(16, device=DEVICE)).shape == (2, 3, 16)


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("M", [2, GEMV_MAX_M])
def test_small_batches_share_one_tile_and_split_k(M, dtype):
    # The rows of a small decode batch share each weight tile; K is split across programs that add into y.
    K, N = 256, 48
    tensors, dense = random_gptq(K, N, 4, 64, False)
    x = torch.randn(M, K, dtype=dtype, device=DEVICE)
    close(gptq_matmul(x, **tensors, bits=4, group_size=64), (x.float() @ dense).to(dtype), dtype, scale=4)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=DEVICE)
    scales = torch.rand(N, device=DEVICE) / 127 / 4
    close(w8a16_matmul(x, w, scales), w8a16_reference(x, w, scales), dtype, scale=4)


@pytest.mark.parametrize("unpack_words", [False, True])
@pytest.mark.parametrize("bits,group_size,block_k", [(4, 32, 128), (4, 128, 64), (4, 512, 256), (8, 64, 64),
                                                     (8, 256, 128)])
def test_both_gemv_unpackings_match(unpack_words, bits, group_size, block_k):
    # The autotuner picks either way of unpacking GPTQ words for M = 1, so both are checked here, over tiles
    # that span several groups, lie inside one, and split K; N = 40 leaves a partial column strip.
    from kernels.quant_matmul import _gemv_gptq_kernel
    K, N = 512, 40
    tensors, dense = random_gptq(K, N, bits, group_size, False)
    x = torch.randn(1, K, device=DEVICE)
    y = torch.zeros(1, N, device=DEVICE)
    _gemv_gptq_kernel.fn[(1, triton.cdiv(N, 16), 2)](
        x, y, tensors["qweight"], tensors["scales"], tensors["qzeros"], 1, N, K, 1, BITS=bits, ZERO_OFFSET=1,
        GROUP_SIZE=group_size, BLOCK_N=16, BLOCK_K=block_k, SPLIT_K=2, UNPACK_WORDS=unpack_words)
    close(y, x @ dense, torch.float32, scale=4)


@pytest.mark.parametrize("M", [1, 5])   # the GEMV, and the small-batch kernel (whose configs all split)
def test_output_is_zeroed_by_the_configs_that_split_k(monkeypatch, M):
    # y is allocated uninitialised (here: NaN) and zeroed only by split configs: nothing of it may show.
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))
    tensors, dense = random_gptq(256, 48, 4, 64, False)
    x = torch.randn(M, 256, device=DEVICE)
    for _ in range(2):   # the first call autotunes, the second runs the chosen config alone
        close(gptq_matmul(x, **tensors, bits=4, group_size=64), x @ dense, torch.float32, scale=4)


@pytest.mark.parametrize("unpack_words", [False, True])
@pytest.mark.parametrize("bits,group_size,block_k", [(4, 64, 128), (4, 256, 128), (4, 128, 256), (8, 64, 64)])
def test_both_small_batch_unpackings_match(unpack_words, bits, group_size, block_k):
    # The autotuner picks either way for GPTQ layers at 2 <= M <= 8: both are checked, K split in two,
    # with tiles over several groups and inside one; N = 40 leaves a partial strip.
    from kernels.quant_matmul import _skinny_kernel
    K, N, M = 512, 40, 5
    tensors, dense = random_gptq(K, N, bits, group_size, False)
    x = torch.randn(M, K, device=DEVICE, dtype=torch.float16)
    y = torch.zeros(M, N, device=DEVICE, dtype=torch.float16)
    _skinny_kernel.fn[(1, triton.cdiv(N, 16), 2)](
        x, y, tensors["qweight"], tensors["scales"], tensors["qzeros"], tensors["g_idx"], M, N, K, 8, True, bits, 1,
        group_size, BLOCK_M=16, BLOCK_N=16, BLOCK_K=block_k, SPLIT_K=2, UNPACK_WORDS=unpack_words)
    close(y, (x.float() @ dense).half(), torch.float16, scale=4)
