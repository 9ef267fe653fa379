"""Fused projections and tensor-parallel shards (server/layers/partition.py) for every weight format: a fused
layer computes what its separate projections compute, and the ranks' shards put together compute the whole."""
import pytest
import torch

from kernels.quant_matmul import pack
from server.layers.linear import LinearFactory
from server.layers.ops import select_ops
from server.layers.partition import Partition, Shard, even_shard
from server.quantization.config import QuantConfig, resolve_quant

CPU = torch.device("cpu")
K, SIZES = 256, (128, 64, 64)   # a q/k/v-like fusion: 128 query features, 64 each for keys and values
FORMATS = ["float", "int8", "int4", "gptq-act-order", "gptq-8bit", "bnb-int8", "nf4"]
# bitsandbytes quantizes each shard by its own statistics, so its shards are not the whole layer's numbers
SHARDED_FORMATS = FORMATS[:5]


def quant_config(fmt: str) -> QuantConfig | None:
    if fmt == "gptq-act-order":
        return QuantConfig("gptq", bits=4, group_size=32, desc_act=True, sym=False)
    if fmt == "gptq-8bit":
        return QuantConfig("gptq", bits=8, group_size=64, sym=True)
    return resolve_quant("none" if fmt == "float" else fmt, 32, None)


def checkpoint_tensors(fmt: str, in_features: int, sizes, g_idx: torch.Tensor, seed=0) -> list[dict]:
    """Per projection, the tensors a checkpoint of that format holds for it (float: the weight)."""
    torch.manual_seed(seed)
    q = quant_config(fmt)
    if q is None or q.method != "gptq" or fmt == "int4":
        return [{"weight": torch.randn(n, in_features) * 0.05, "bias": torch.randn(n)} for n in sizes]
    groups = q.num_groups(in_features)
    return [{"qweight": pack(torch.randint(0, 2**q.bits, (in_features, n)), q.bits, 0),
             "qzeros": pack(torch.randint(0, 2**q.bits, (groups, n)) - 1, q.bits, 1),
             "scales": (torch.rand(groups, n) / 2**q.bits / 8 + 1e-3).half(),
             "g_idx": g_idx.int(), "bias": torch.randn(n)} for n in sizes]


def build(fmt: str, partition: Partition, tensors: list[dict]):
    if fmt in ("bnb-int8", "nf4"):
        pytest.importorskip("bitsandbytes")
    layer = LinearFactory(quant_config(fmt), select_ops(CPU))(partition, bias=True)
    for part, named in enumerate(tensors):
        for leaf, t in named.items():
            layer.load_float_weight(t, part) if leaf == "weight" else layer.load(leaf, t, part)
    layer.finish_loading()
    if hasattr(layer, "use_cpu_matmul"):
        layer.use_cpu_matmul(pack=True)
    return layer


def g_idx_for(fmt: str, in_features: int) -> torch.Tensor:
    torch.manual_seed(1)
    g_idx = torch.arange(in_features) // (64 if fmt == "gptq-8bit" else 32)
    return g_idx[torch.randperm(in_features)] if fmt == "gptq-act-order" else g_idx


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_fused_layer_computes_what_its_projections_compute(fmt):
    tensors = checkpoint_tensors(fmt, K, SIZES, g_idx_for(fmt, K))
    fused = build(fmt, Partition(tuple(Shard.whole(n) for n in SIZES), Shard.whole(K)), tensors)
    x = torch.randn(5, K)
    if fmt == "nf4":   # NF4 quantizes its block scales once more over the whole weight: compare with one layer
        whole = {leaf: torch.cat([t[leaf] for t in tensors]) for leaf in ("weight", "bias")}
        torch.testing.assert_close(fused(x), build(fmt, Partition.whole(K, sum(SIZES)), [whole])(x), rtol=0, atol=0)
        return
    separate = [build(fmt, Partition.whole(K, n), [t]) for n, t in zip(SIZES, tensors)]
    for y, layer in zip(fused(x).split(list(SIZES), dim=-1), separate):
        torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)


def assert_close_to_kernel_rounding(fmt: str, y: torch.Tensor, expected: torch.Tensor):
    """Float exactly; the quantized formats to the bfloat16 rounding of PyTorch's packed CPU kernels, whose
    partial sums (a row-parallel shard's output) are rounded before they are added."""
    atol = 1e-5 if fmt == "float" else 4 * 2.0 ** -8 * expected.abs().max().item()
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("fmt", SHARDED_FORMATS)
def test_column_shards_side_by_side_compute_the_whole_layer(fmt):
    tensors = checkpoint_tensors(fmt, K, SIZES, g_idx_for(fmt, K))
    whole = build(fmt, Partition(tuple(Shard.whole(n) for n in SIZES), Shard.whole(K)), tensors)
    ranks = [build(fmt, Partition(tuple(even_shard(n, r, 2, "n") for n in SIZES), Shard.whole(K)), tensors)
             for r in range(2)]
    x = torch.randn(3, K)
    shards = [layer(x).split([n // 2 for n in SIZES], dim=-1) for layer in ranks]
    expected = whole(x).split(list(SIZES), dim=-1)
    for i in range(len(SIZES)):
        assert_close_to_kernel_rounding(fmt, torch.cat([shards[0][i], shards[1][i]], dim=-1), expected[i])


@pytest.mark.parametrize("fmt", SHARDED_FORMATS)
def test_row_shards_summed_compute_the_whole_layer_with_the_bias_once(fmt):
    tensors = checkpoint_tensors(fmt, K, (96,), g_idx_for(fmt, K), seed=3)
    whole = build(fmt, Partition.whole(K, 96), tensors)
    ranks = [build(fmt, Partition((Shard.whole(96),), even_shard(K, r, 2, "k")), tensors) for r in range(2)]
    assert ranks[0].bias is not None and ranks[1].bias is None
    x = torch.randn(4, K)
    total = ranks[0](x[:, :K // 2]) + ranks[1](x[:, K // 2:])
    assert_close_to_kernel_rounding(fmt, total, whole(x))


def test_a_row_split_inside_a_gptq_group_is_refused():
    q = QuantConfig("gptq", bits=4, group_size=128)
    with pytest.raises(ValueError, match="group size 128 does not divide"):
        LinearFactory(q, select_ops(CPU))(Partition((Shard.whole(64),), even_shard(192, 0, 2, "k")))


def test_fused_projections_with_different_act_order_g_idx_are_refused():
    fmt = "gptq-act-order"
    tensors = checkpoint_tensors(fmt, K, SIZES[:2], g_idx_for(fmt, K))
    tensors[1]["g_idx"] = tensors[1]["g_idx"].flip(0)
    with pytest.raises(ValueError, match="different act-order g_idx"):
        build(fmt, Partition(tuple(Shard.whole(n) for n in SIZES[:2]), Shard.whole(K)), tensors)


def test_a_shape_that_is_not_the_checkpoints_names_the_tensor():
    layer = LinearFactory(None, select_ops(CPU))(Partition((Shard.whole(8), Shard.whole(4)), Shard.whole(16)))
    with pytest.raises(ValueError, match=r"'weight' has shape \(8, 16\), expected \(4, 16\)"):
        layer.load_float_weight(torch.zeros(8, 16), part=1)


def test_g_idx_for_only_some_fused_projections_is_refused():
    fmt = "gptq-act-order"
    tensors = checkpoint_tensors(fmt, K, SIZES[:2], g_idx_for(fmt, K))
    del tensors[1]["g_idx"]
    with pytest.raises(ValueError, match="g_idx is given for some of the projections"):
        build(fmt, Partition(tuple(Shard.whole(n) for n in SIZES[:2]), Shard.whole(K)), tensors)


def test_a_vocabulary_shard_past_the_last_row_loads_as_padding():
    layer = LinearFactory(None, select_ops(CPU))(Partition((Shard(5, 6, 3),), Shard.whole(4)))
    layer.weight.data.fill_(7)
    layer.load_float_weight(torch.ones(5, 4))
    assert torch.equal(layer.weight.data, torch.full((3, 4), 7.0))
