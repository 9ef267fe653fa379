"""Quantized layers on CPU through PyTorch's packed kernels (kernels/quant_matmul_cpu.py) against the torch
references they replace: the same weights exactly, and outputs within the kernels' bfloat16 rounding."""
import pytest
import torch

from kernels.quant_matmul import dequantize_gptq, gptq_reference, pack, w8a16_reference
from server.layers.linear import GPTQLinear, Int8Linear, weight_bytes
from server.layers.ops import select_ops
from server.quantization.config import QuantConfig

CPU = torch.device("cpu")
BF16_EPS = 2.0 ** -8


def gptq_layer(K: int, N: int, bits: int, group_size: int, sym: bool, act_order: bool, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    quant = QuantConfig("gptq", bits=bits, group_size=group_size, sym=sym, desc_act=act_order)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        layer = GPTQLinear(K, N, False, select_ops(CPU), quant)
    finally:
        torch.set_default_dtype(default)
    gs = K if group_size == -1 else group_size
    groups = quant.num_groups(K)
    zeros = torch.full((groups, N), 2 ** (bits - 1)) if sym else torch.randint(0, 2**bits, (groups, N))
    g_idx = torch.arange(K) // gs
    if act_order:
        g_idx = g_idx[torch.randperm(K)]
    layer.qweight.data.copy_(pack(torch.randint(0, 2**bits, (K, N)), bits, 0))
    layer.qzeros.data.copy_(pack(zeros - 1, bits, 1))
    layer.scales.data.copy_((torch.rand(groups, N) / 2**bits / 8 + 1e-3).half())
    layer.g_idx.data.copy_(g_idx)
    reference = dict(qweight=layer.qweight.data.clone(), qzeros=layer.qzeros.data.clone(),
                     scales=layer.scales.data.clone(), g_idx=layer.g_idx.data.clone(), bits=bits)
    layer.finish_loading()
    return layer, reference


def assert_bf16_close(y: torch.Tensor, expected: torch.Tensor):
    # The kernels round x and y to bfloat16 and accumulate in float32.
    err = (y.float() - expected.float()).abs().max()
    assert err <= 4 * BF16_EPS * expected.float().abs().max(), err.item()


@pytest.mark.parametrize("K,N,group_size", [(576, 48, 128), (96, 32, -1), (256, 112, 64), (320, 16, 32)])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_int4_gptq_takes_the_packed_kernel_and_computes_the_reference(K, N, group_size, sym, act_order):
    layer, ref = gptq_layer(K, N, 4, group_size, sym, act_order)
    assert layer.int4_weight is not None and layer.qweight is None and layer.weight is None
    # The packed weight is the GPTQ weight up to the scales' and zeros' bfloat16 rounding.
    w = layer.dequantized_weight()
    dense = dequantize_gptq(**ref).t()
    assert ((w - dense).abs() <= 2 * BF16_EPS * dense.abs().amax(dim=1, keepdim=True) + 1e-6).all()
    for M in (1, 5, 33):
        x = torch.randn(M, K)
        y = layer(x)
        assert y.dtype == torch.float32 and y.shape == (M, N)
        assert_bf16_close(y, x.to(torch.bfloat16).float() @ w.t())       # the weight it says it uses
        assert_bf16_close(y, gptq_reference(x, **ref))                    # the GPTQ reference


def test_the_int4_layer_holds_half_a_byte_per_weight():
    layer, _ = gptq_layer(576, 48, 4, 128, False, False)
    assert weight_bytes(layer) < 0.6 * 576 * 48


@pytest.mark.parametrize("K,N,bits,group_size,act_order", [
    (64, 40, 4, 32, False),     # N not a multiple of 16
    (72, 32, 4, 24, True),      # a group size no kernel group divides
    (128, 48, 8, 32, True),     # 8-bit GPTQ
])
def test_gptq_layers_no_kernel_serves_are_dequantized_once(K, N, bits, group_size, act_order):
    layer, ref = gptq_layer(K, N, bits, group_size, False, act_order)
    assert layer.int4_weight is None and layer.qweight is None and layer.weight.shape == (N, K)
    x = torch.randn(3, K)
    torch.testing.assert_close(layer(x), gptq_reference(x, **ref), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.dequantized_weight(), dequantize_gptq(**ref).t())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_layer_serves_half_precision_dtypes(dtype):
    layer, ref = gptq_layer(256, 64, 4, 128, False, True, dtype=dtype)
    x = torch.randn(4, 256, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    assert_bf16_close(y, gptq_reference(x.float(), **ref))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K,N", [(576, 48), (112, 5), (64, 1536)])
def test_int8_takes_the_packed_kernel_and_computes_the_reference(K, N, dtype):
    torch.manual_seed(0)
    layer = Int8Linear(K, N, False, select_ops(CPU))
    layer.load_float_weight(torch.randn(N, K) * 0.05)
    q, scales = layer.weight.data.clone(), layer.scales.data.clone()
    layer.finish_loading()
    assert layer.cpu_kernel and layer.scales.dtype == torch.bfloat16
    torch.testing.assert_close(layer.dequantized_weight(), q.float() * scales.to(torch.bfloat16).float()[:, None])
    for M in (1, 7):
        x = torch.randn(M, K, dtype=dtype)
        y = layer(x)
        assert y.dtype == dtype
        assert_bf16_close(y, x.to(torch.bfloat16).float() @ layer.dequantized_weight().t())
        assert_bf16_close(y, w8a16_reference(x.float(), q, scales))


def test_int8_with_k_the_kernel_refuses_keeps_the_reference():
    layer = Int8Linear(123, 8, False, select_ops(CPU))
    layer.load_float_weight(torch.randn(8, 123))
    layer.finish_loading()
    assert not layer.cpu_kernel
    x = torch.randn(2, 123)
    torch.testing.assert_close(layer(x), w8a16_reference(x, layer.weight, layer.scales))
