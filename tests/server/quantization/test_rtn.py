import torch

from kernels.quant_matmul import dequantize_gptq
from server.quantization.rtn import quantize_int8, quantize_rtn


def test_int8_is_within_half_a_step_per_channel():
    w = torch.randn(48, 80) * torch.rand(48, 1) * 3
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert ((q.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-6).all()


def test_rtn_codes_dequantize_within_half_a_step_of_their_group():
    w = torch.randn(40, 96)
    for bits, group_size, sym in [(4, 32, False), (4, -1, True), (8, 32, False)]:
        t = quantize_rtn(w, bits, group_size, sym)
        gs = 96 if group_size == -1 else group_size
        assert torch.equal(t["g_idx"], (torch.arange(96) // gs).int())
        deq = dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits).t()
        step = t["scales"].float()[t["g_idx"].long()].t()   # [N, K]
        # Half a step, plus the float16 rounding of the stored scale (2**-11 relative) times up to 2**bits steps.
        assert ((deq - w).abs() <= step * (0.5 + 2**bits * 2**-11) + 1e-5).all(), (bits, group_size, sym)


def test_symmetric_grid_keeps_the_zero_in_the_middle():
    t = quantize_rtn(torch.randn(8, 32), 4, 32, sym=True)
    zeros = ((t["qzeros"] & 0xF) + 1) & 0xF    # the first output channel, stored as zero - 1
    assert (zeros == 8).all()
