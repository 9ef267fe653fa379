import pytest
import torch

from kernels.rotary import rotary_reference
from server.layers.ops import select_ops
from server.layers.rotary import RotaryEmbedding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaling", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
def test_the_torch_path_is_the_reference_to_the_bit_and_gathers_once_per_forward(dtype, scaling):
    rope = RotaryEmbedding(64, 512, 10000.0, scaling, select_ops(torch.device("cpu"), "torch"))
    g = torch.Generator().manual_seed(0)
    positions = torch.tensor([0, 5, 77, 511])
    steps = []
    for _ in range(2):   # two layers of one forward
        q, k = torch.randn(4, 9, 64, generator=g).to(dtype), torch.randn(4, 3, 64, generator=g).to(dtype)
        expected = rotary_reference(positions, q, k, rope.cos, rope.sin)
        got = rope(positions, q, k)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        steps.append(rope._step)
    assert steps[0] is steps[1] and steps[0][0] is positions   # gathered by the first layer only
    later = torch.tensor([1, 2, 3, 4])
    q, k = torch.randn(4, 9, 64).to(dtype), torch.randn(4, 3, 64).to(dtype)
    expected = rotary_reference(later, q, k, rope.cos, rope.sin)
    got = rope(later, q, k)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]) and rope._step[0] is later
