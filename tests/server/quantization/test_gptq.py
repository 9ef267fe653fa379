import torch

from kernels.quant_matmul import dequantize_gptq
from server.quantization.gptq import GPTQ
from server.quantization.rtn import quantize_rtn


def correlated_inputs(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5
    energy = torch.logspace(0, 1.5, k)[torch.randperm(k, generator=g)]   # some channels matter far more
    return (torch.randn(n, k, generator=g) @ mix) * energy


def output_error(w, deq, x):
    return ((x @ (w - deq).t()).norm() / (x @ w.t()).norm()).item()


def run_gptq(w, x, **kw):
    gptq = GPTQ(w)
    for chunk in x.split(64):
        gptq.add_batch(chunk)
    return gptq.quantize(**kw)


def test_gptq_has_lower_output_error_than_rtn_on_the_same_calibration_data():
    w, x = torch.randn(64, 128), correlated_inputs(512, 128)
    rtn = quantize_rtn(w, 4, 32)
    rtn_deq = dequantize_gptq(rtn["qweight"], rtn["qzeros"], rtn["scales"], rtn["g_idx"], 4).t()
    _, gptq_deq = run_gptq(w, x, bits=4, group_size=32, act_order=False)
    _, act_deq = run_gptq(w, x, bits=4, group_size=32, act_order=True)
    rtn_err, gptq_err, act_err = (output_error(w, d, x) for d in (rtn_deq, gptq_deq, act_deq))
    assert gptq_err < 0.8 * rtn_err
    assert act_err < 0.8 * rtn_err


def test_act_order_g_idx_follows_the_hessian_and_the_tensors_decode_to_the_returned_weights():
    w, x = torch.randn(32, 64), correlated_inputs(256, 64, seed=3)
    tensors, deq = run_gptq(w, x, bits=4, group_size=16, act_order=True)
    g_idx = tensors["g_idx"].long()
    assert sorted(g_idx.bincount().tolist()) == [16, 16, 16, 16]
    assert not torch.equal(g_idx, torch.arange(64) // 16)                 # permuted
    # The 16 highest-energy input channels are quantized first, in group 0.
    top = torch.argsort((x * x).sum(0), descending=True)[:16]
    assert (g_idx[top] == 0).all()
    stored = dequantize_gptq(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], 4).t()
    assert torch.allclose(stored, deq, atol=1e-6)


def test_eight_bit_gptq_is_nearly_lossless():
    w, x = torch.randn(16, 64), correlated_inputs(128, 64)
    _, deq = run_gptq(w, x, bits=8, group_size=-1, act_order=False)
    assert output_error(w, deq, x) < 0.01
