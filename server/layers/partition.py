"""Which part of a checkpoint's tensors a layer holds: fused projections and tensor-parallel shards.

A fused projection (q/k/v, gate/up) holds several checkpoint projections side by side along its output
features; under tensor parallelism each rank holds a slice of each (column-parallel) or a slice of the input
features (row-parallel). A layer's Partition says which, and load_part() copies a checkpoint tensor's share
into the layer's parameter, whatever the weight format, from the axes each format's tensors are laid out on.
"""
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Shard:
    """[start, start + size) of a dimension of `full` features; may run past full (a padded vocabulary shard:
    nothing is loaded there, and the logits of those rows are cut off after the gather)."""
    full: int
    start: int
    size: int

    @staticmethod
    def whole(n: int) -> "Shard":
        return Shard(n, 0, n)

    @property
    def present(self) -> int:
        """Features of the checkpoint inside the shard (less than size where it is padded)."""
        return max(0, min(self.size, self.full - self.start))


def even_shard(n: int, rank: int, world: int, what: str) -> Shard:
    if n % world:
        raise ValueError(f"{what} ({n}) must be divisible by the tensor-parallel size {world}")
    return Shard(n, rank * n // world, n // world)


@dataclass(frozen=True)
class Partition:
    outs: tuple[Shard, ...]   # one per checkpoint projection, laid side by side along the output features
    inp: Shard                # the input features held (a slice of them when row-parallel)

    @staticmethod
    def whole(in_features: int, out_features: int) -> "Partition":
        return Partition((Shard.whole(out_features),), Shard.whole(in_features))

    @property
    def in_features(self) -> int:
        return self.inp.size

    @property
    def out_features(self) -> int:
        return sum(s.size for s in self.outs)

    @property
    def out_sizes(self) -> list[int]:
        return [s.size for s in self.outs]

    @property
    def row_parallel(self) -> bool:
        return self.inp.size != self.inp.full

    def out_offset(self, part: int) -> int:
        return sum(s.size for s in self.outs[:part])


@dataclass(frozen=True)
class Axes:
    """Where a tensor's output and input features lie, and in what units (packed columns, groups)."""
    out: int | None = None
    out_unit: int = 1
    inp: int | None = None
    in_unit: int = 1


def full_shape(param: torch.Tensor, axes: Axes, partition: Partition, part: int) -> tuple[int, ...]:
    """The shape of the checkpoint tensor whose share param holds."""
    shape = list(param.shape)
    if axes.out is not None:
        shape[axes.out] = partition.outs[part].full // axes.out_unit
    if axes.inp is not None:
        shape[axes.inp] = -(-partition.inp.full // axes.in_unit)
    return tuple(shape)


def load_part(param: torch.Tensor, tensor: torch.Tensor, axes: Axes, partition: Partition, part: int, name: str):
    """Copies the share of checkpoint tensor `tensor` (projection `part` of the layer) into param."""
    expected = full_shape(param, axes, partition, part)
    if tuple(tensor.shape) != expected:
        raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {expected}")
    dst, src = param.data, tensor
    if axes.out is not None and partition.outs[part].present == 0:
        return   # a shard wholly past the checkpoint's rows (padding only)
    if axes.out is not None:
        shard, unit = partition.outs[part], axes.out_unit
        offset = partition.out_offset(part)
        dst = dst.narrow(axes.out, offset // unit, shard.present // unit)
        src = src.narrow(axes.out, shard.start // unit, shard.present // unit)
    if axes.inp is not None and partition.row_parallel:
        shard, unit = partition.inp, axes.in_unit
        src = src.narrow(axes.inp, shard.start // unit, shard.size // unit)
    dst.copy_(src)


class Partitioned(nn.Module):
    """A layer that holds a Partition of checkpoint tensors, loaded part by part. AXES names each checkpoint
    tensor the layer reads and where its features lie; QUANTIZED_LEAVES those a quantized checkpoint holds."""
    AXES: dict[str, Axes] = {"weight": Axes(out=0, inp=1), "bias": Axes(out=0)}
    QUANTIZED_LEAVES: tuple[str, ...] = ()

    def __init__(self, in_features: int, out_features: int, partition: Partition | None):
        super().__init__()
        self.partition = partition or Partition.whole(in_features, out_features)
        self.in_features, self.out_features = self.partition.in_features, self.partition.out_features

    def load(self, leaf: str, tensor: torch.Tensor, part: int = 0):
        load_part(getattr(self, leaf), tensor, self.AXES[leaf], self.partition, part, leaf)

    def load_float_weight(self, w: torch.Tensor, part: int = 0):
        self.load("weight", w, part)

    def full_weight_shape(self, part: int) -> tuple[int, int]:
        return self.partition.outs[part].full, self.partition.inp.full

    def finish_loading(self):
        # A row-parallel layer's outputs are summed over the ranks: one of them adds the bias.
        if self.partition.inp.start != 0 and getattr(self, "bias", None) is not None:
            self.bias = None
