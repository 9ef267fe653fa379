"""Linear layers: full precision, int8, GPTQ (also int4 round-to-nearest), and bitsandbytes; one is chosen at load.

Parameters are filled by the loader, never initialised. Each layer holds a Partition of the checkpoint's
tensors (server/layers/partition.py: fused projections side by side, a tensor-parallel rank's shard), and
loads them part by part: a quantized layer built over a float checkpoint takes each float weight through
load_float_weight(), quantizing the whole checkpoint tensor and keeping its share, so every tensor-parallel
size computes with the same numbers; a GPTQ checkpoint fills qweight / qzeros / scales / g_idx by name through
load(). The loader then calls finish_loading(), where an act-order GPTQ layer sorts its rows by group once, so
the kernels' fast path serves it, and, with the torch ops on CPU, quantized layers take PyTorch's packed
kernels (kernels/quant_matmul_cpu.py): int8 keeps its weight and stores its scales in the kernels' dtype;
4-bit GPTQ is repacked into the int4 layout, and a GPTQ layer no kernel serves is dequantized to a float
weight, once. Either way the GPTQ tensors are dropped. Float weights on CPU get their chunked view and
oneDNN-packed copy through use_cpu_matmul() (kernels/float_matmul_cpu.py).
"""
from dataclasses import dataclass

import torch
from torch import nn

from kernels import float_matmul_cpu
from kernels import quant_matmul_cpu as cpu
from kernels.quant_matmul import dequantize_gptq, is_plain_grouping, sort_act_order
from server.layers.ops import Ops
from server.layers.partition import Axes, Partition, Partitioned, load_part
from server.quantization.config import QuantConfig
from server.quantization.rtn import quantize_int8, quantize_rtn


def _param(*shape, dtype=None) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


def _packed_kernels(ops: Ops, device: torch.device) -> bool:
    return ops.name == "torch" and device.type == "cpu"


@dataclass
class Int8Rows:
    """A float weight rounded to int8 per row: codes * scales[:, None] (a 16-bit weight holds that product rounded
    to its dtype)."""
    codes: torch.Tensor    # [N, K] int8
    scales: torch.Tensor   # [N] float32


class Linear(Partitioned):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, partition: Partition | None = None):
        super().__init__(in_features, out_features, partition)
        self.weight = _param(self.out_features, self.in_features)
        self.bias = _param(self.out_features) if bias else None
        self.cpu_weight = None   # set at load on CPU: chunked and packed forms (kernels/float_matmul_cpu.py)
        self.int8_rows: Int8Rows | None = None   # set by round_to_int8()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return float_matmul_cpu.float_matmul(x, self.weight, self.cpu_weight, self.bias)

    def use_cpu_matmul(self, pack: bool):
        self.cpu_weight = float_matmul_cpu.cpu_float_weight(self.weight, pack=pack)

    def round_to_int8(self):
        """Rounds the weight to int8 per row (symmetric, as Int8Linear) in place, for the eager steps, and keeps
        the codes for a compiled CPU step to read instead (server/compiled_decode.py). Must come before
        use_cpu_matmul(); a table tied to this weight is rounded with it."""
        codes, scales = quantize_int8(self.weight.data)
        self.weight.data.copy_(codes.float() * scales[:, None])
        self.int8_rows = Int8Rows(codes, scales)


class Int8Linear(Partitioned):
    """Weight-only int8 with a float32 scale per output channel."""
    AXES = {"weight": Axes(out=0, inp=1), "scales": Axes(out=0), "bias": Axes(out=0)}

    def __init__(self, in_features: int, out_features: int, bias: bool, ops: Ops, partition: Partition | None = None):
        super().__init__(in_features, out_features, partition)
        self.ops = ops
        self.weight = _param(self.out_features, self.in_features, dtype=torch.int8)
        self.scales = _param(self.out_features, dtype=torch.float32)
        self.bias = _param(self.out_features) if bias else None
        self.cpu_kernel = False   # set at finish_loading: PyTorch's packed int8 kernel serves this layer

    def load_float_weight(self, w: torch.Tensor, part: int = 0):
        # quantized whole, then sharded: a row-parallel shard keeps the scales of the whole rows
        q, scales = quantize_int8(w.to(self.weight.device))
        self.load("weight", q, part)
        self.load("scales", scales, part)

    def finish_loading(self):
        super().finish_loading()
        self.cpu_kernel = _packed_kernels(self.ops, self.weight.device) and cpu.int8_kernel_serves(self.in_features)
        if self.cpu_kernel:
            self.scales.data = self.scales.data.to(cpu.COMPUTE_DTYPE)

    def dequantized_weight(self) -> torch.Tensor:
        """[N, K] float32: the weight this layer computes with."""
        return self.weight.float() * self.scales.float()[:, None]

    def forward(self, x):
        if self.cpu_kernel:
            y = cpu.int8_matmul(x, self.weight, self.scales)
        else:
            y = self.ops.w8a16_matmul(x, self.weight, self.scales)
        return y if self.bias is None else y + self.bias


class GPTQLinear(Partitioned):
    """4- or 8-bit group-wise weights in the GPTQ packed layout (kernels/quant_matmul.py), read as written."""
    QUANTIZED_LEAVES = ("qweight", "qzeros", "scales")

    def __init__(self, in_features: int, out_features: int, bias: bool, ops: Ops, quant: QuantConfig,
                 partition: Partition | None = None):
        super().__init__(in_features, out_features, partition)
        p = self.partition
        in_features, out_features = self.in_features, self.out_features
        pack = 32 // quant.bits
        if in_features % pack or p.inp.start % pack or any(s.start % pack or s.size % pack for s in p.outs):
            raise ValueError(f"{quant.bits}-bit GPTQ needs in and out features divisible by {pack}; "
                             f"got {in_features} x {'+'.join(map(str, p.out_sizes))}")
        gs = quant.group_size
        # A row-parallel shard holds its own groups, unless act-order scatters them (or one group spans the
        # row): then it holds every group, and its g_idx slice picks from them.
        split_groups = p.row_parallel and not quant.desc_act and gs != -1
        if split_groups and (p.inp.start % gs or in_features % gs):
            raise ValueError(f"the GPTQ group size {gs} does not divide this rank's {in_features} of {p.inp.full} "
                             f"input features; choose a tensor-parallel size that splits at group boundaries")
        self.ops, self.quant = ops, quant
        groups = in_features // gs if split_groups else quant.num_groups(p.inp.full)
        group_axis = 0 if split_groups else None
        self.AXES = {"qweight": Axes(out=1, inp=0, in_unit=pack), "qzeros": Axes(out=1, out_unit=pack, inp=group_axis, in_unit=gs),
                     "scales": Axes(out=1, inp=group_axis, in_unit=gs), "g_idx": Axes(inp=0), "bias": Axes(out=0)}
        self.group_offset = p.inp.start // gs if split_groups else 0   # subtracted from a shard's g_idx
        self.qweight = _param(in_features // pack, out_features, dtype=torch.int32)
        self.qzeros = _param(groups, out_features // pack, dtype=torch.int32)
        self.scales = _param(groups, out_features, dtype=torch.float16)  # float16, as GPTQ checkpoints store them
        # A checkpoint without g_idx uses the plain grouping.
        self.g_idx = nn.Parameter((torch.arange(in_features, dtype=torch.int32) + p.inp.start) // (p.inp.full if gs == -1 else gs)
                                  - self.group_offset, requires_grad=False)
        self.bias = _param(out_features) if bias else None
        self._g_idx_parts: list[int] = []   # the projections whose g_idx was read (the first one's is kept; the
                                            # others must equal it)

        self.dtype = torch.get_default_dtype()     # the loader's serving dtype
        self.perm: torch.Tensor | None = None      # act-order: x's columns in the order qweight's rows now have
        self.plain_group_size: int | None = None   # set once g_idx is k // group_size: the kernels' fast path
        # Set on CPU by finish_loading instead of the GPTQ tensors: the int4 kernel's group size, packed
        # weight and scales_and_zeros, or (where it does not apply) the dequantized weight [N, K].
        self.int4_group_size: int | None = None
        self.int4_weight = self.int4_scales_and_zeros = self.weight = None
        self.cpu_weight = None   # set at load for a dequantized weight, as Linear's

    def load(self, leaf: str, tensor: torch.Tensor, part: int = 0):
        if leaf != "g_idx":
            return super().load(leaf, tensor, part)
        if not self._g_idx_parts or self._g_idx_parts == [part]:
            super().load(leaf, tensor - self.group_offset, part)
            self._g_idx_parts = [part]
            return
        self._g_idx_parts.append(part)
        shard = self.partition.inp
        if tensor.shape == (shard.full,) and torch.equal(tensor[shard.start:shard.start + shard.size].to(self.g_idx.dtype) - self.group_offset, self.g_idx.data):
            return
        raise ValueError("the projections fused into one layer (q/k/v, gate/up) have different act-order g_idx; "
                         "lmserve serves GPTQ checkpoints whose fused projections share their input ordering")

    def load_float_weight(self, w: torch.Tensor, part: int = 0):
        # quantized whole, then sharded, so every tensor-parallel size computes with the same numbers
        q = self.quant
        for name, tensor in quantize_rtn(w.to(self.qweight.device), q.bits, q.group_size, q.sym).items():
            self.load(name, tensor, part)

    def _sort_act_order(self):
        gs = self.quant.group_size
        if not is_plain_grouping(self.g_idx, gs):
            qweight, perm = sort_act_order(self.qweight.data, self.g_idx.data, self.quant.bits)
            if not is_plain_grouping(self.g_idx.data[perm], gs):
                return  # groups of uneven sizes: the general kernels read g_idx as it is
            self.qweight.data.copy_(qweight)
            self.g_idx.data.copy_(self.g_idx.data[perm])
            self.perm = perm.to(self.qweight.device)
        self.plain_group_size = gs

    def finish_loading(self):
        """Checks g_idx, brings an act-order layer to plain grouping (qweight's rows sorted by group, x permuted
        to match), then, on CPU, to PyTorch's packed kernels."""
        super().finish_loading()
        if self._g_idx_parts and len(set(self._g_idx_parts)) != len(self.partition.outs):
            raise ValueError("g_idx is given for some of the projections fused into one layer (q/k/v, gate/up) "
                             "and not for the others")
        groups = self.scales.shape[0]
        if int(self.g_idx.min()) < 0 or int(self.g_idx.max()) >= groups:
            raise ValueError(f"g_idx names groups outside 0..{groups - 1} (the checkpoint's scales have {groups})")
        self._sort_act_order()
        if _packed_kernels(self.ops, self.qweight.device):
            self._convert_for_cpu()

    def _convert_for_cpu(self):
        q = self.quant
        kernel_gs = (cpu.int4_group_size(self.in_features, self.out_features, q.group_size)
                     if q.bits == 4 and self.plain_group_size is not None else None)
        if kernel_gs is not None:
            packed, scales_and_zeros = cpu.gptq_to_int4pack(self.qweight, self.qzeros, self.scales, q.zero_offset,
                                                            q.group_size, kernel_gs)
            self.int4_group_size = kernel_gs
            self.int4_weight = nn.Parameter(packed, requires_grad=False)
            self.int4_scales_and_zeros = nn.Parameter(scales_and_zeros, requires_grad=False)
        else:
            w = dequantize_gptq(self.qweight, self.qzeros, self.scales, self.g_idx, q.bits, q.zero_offset)
            self.weight = nn.Parameter(w.t().to(self.dtype).contiguous(), requires_grad=False)
        self.qweight = self.qzeros = self.scales = self.g_idx = None

    def use_cpu_matmul(self, pack: bool):
        if self.weight is not None:
            self.cpu_weight = float_matmul_cpu.cpu_float_weight(self.weight, pack=pack)

    def dequantized_weight(self) -> torch.Tensor:
        """[N, K] float32 in x's original column order: the weight this layer computes with."""
        if self.int4_weight is not None:
            w = cpu.int4pack_weight(self.int4_weight, self.int4_group_size, self.int4_scales_and_zeros)
        elif self.weight is not None:
            w = self.weight.float()
        else:
            q = self.quant
            w = dequantize_gptq(self.qweight, self.qzeros, self.scales, self.g_idx, q.bits, q.zero_offset).t()
        if self.perm is None:
            return w
        unsorted = torch.empty_like(w)
        unsorted[:, self.perm] = w
        return unsorted

    def forward(self, x):
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        if self.int4_weight is not None:
            y = cpu.int4_matmul(x, self.int4_weight, self.int4_group_size, self.int4_scales_and_zeros)
        elif self.weight is not None:
            y = float_matmul_cpu.float_matmul(x, self.weight, self.cpu_weight)
        else:
            y = self.ops.gptq_matmul(x, self.qweight, self.qzeros, self.scales, self.g_idx, self.quant.bits,
                                     self.quant.zero_offset, self.plain_group_size)
        return y if self.bias is None else y + self.bias


class BnbLinear(Partitioned):
    """bitsandbytes LLM.int8 (bnb-int8) or NF4, built once the float weights of all its parts have arrived."""

    def __init__(self, in_features: int, out_features: int, bias: bool, quant: QuantConfig,
                 partition: Partition | None = None):
        super().__init__(in_features, out_features, partition)
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise RuntimeError(f"--quant {quant.method} needs bitsandbytes: pip install bitsandbytes") from e
        self.method = quant.method
        self.device, self.dtype = torch.empty(0).device, torch.get_default_dtype()  # the loader's device and dtype
        self.bias = _param(self.out_features) if bias else None
        self.staged: torch.Tensor | None = None   # float16 [N, K] while the parts arrive; one layer's at a time
        self._staged_parts: set[int] = set()
        self.inner = None

    def load_float_weight(self, w: torch.Tensor, part: int = 0):
        if self.staged is None:
            self.staged = torch.empty(self.out_features, self.in_features, dtype=torch.float16, device=self.device)
        load_part(self.staged, w.to(torch.float16), self.AXES["weight"], self.partition, part, "weight")
        self._staged_parts.add(part)
        if len(self._staged_parts) == len(self.partition.outs):
            self._build()

    def _build(self):
        import bitsandbytes as bnb
        w, self.staged = self.staged, None
        if self.method == "bnb-int8":
            inner = bnb.nn.Linear8bitLt(self.in_features, self.out_features, bias=False, has_fp16_weights=False,
                                        threshold=6.0, device="meta")
            inner.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        else:
            inner = bnb.nn.Linear4bit(self.in_features, self.out_features, bias=False, quant_type="nf4",
                                      compute_dtype=self.dtype, device="meta")
            inner.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
        self.inner = inner.to(self.device)

    def forward(self, x):
        # LLM.int8 computes in float16 (it casts, with a warning per call, otherwise); NF4 in the serving dtype.
        y = self.inner(x.to(torch.float16) if self.method == "bnb-int8" else x).to(x.dtype)
        return y if self.bias is None else y + self.bias


def weight_bytes(module: nn.Module) -> int:
    """Bytes of a module's weights, including the scales bitsandbytes keeps beside its quantized tensors and the
    int8 codes of a weight rounded by round_to_int8()."""
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    for m in module.modules():
        weight, rows = getattr(m, "weight", None), getattr(m, "int8_rows", None)
        extras = [getattr(weight, "SCB", None), getattr(getattr(weight, "quant_state", None), "absmax", None)]
        extras += [rows.codes, rows.scales] if rows is not None else []
        total += sum(t.numel() * t.element_size() for t in extras if isinstance(t, torch.Tensor))
    return total


class LinearFactory:
    """Builds the projections of the decoder layers in the chosen quantization (lm_head stays a float Linear)."""

    def __init__(self, quant: QuantConfig | None, ops: Ops):
        self.quant, self.ops = quant, ops

    def __call__(self, partition: Partition, bias: bool = False) -> Partitioned:
        q, n, k = self.quant, partition.out_features, partition.in_features
        if q is None:
            return Linear(k, n, bias, partition)
        if q.method == "int8":
            return Int8Linear(k, n, bias, self.ops, partition)
        if q.method == "gptq":
            return GPTQLinear(k, n, bias, self.ops, q, partition)
        return BnbLinear(k, n, bias, q, partition)
