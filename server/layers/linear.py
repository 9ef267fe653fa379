"""Linear layers: full precision, int8, GPTQ (also int4 round-to-nearest), and bitsandbytes; one is chosen at load.

Parameters are filled by the loader, never initialised. A quantized layer built over a float checkpoint
takes each float weight through load_float_weight(), so only one float tensor is ever held at a time;
a GPTQ checkpoint fills qweight / qzeros / scales / g_idx by name. The loader then calls finish_loading(),
where an act-order GPTQ layer sorts its rows by group once, so the kernels' fast path serves it, and, with the
torch ops on CPU, quantized layers take PyTorch's packed kernels (kernels/quant_matmul_cpu.py): int8 keeps its
weight and stores its scales in the kernels' dtype; 4-bit GPTQ is repacked into the int4 layout, and a GPTQ
layer no kernel serves is dequantized to a float weight, once. Either way the GPTQ tensors are dropped.
"""
import torch
from torch import nn

from kernels import float_matmul_cpu
from kernels import quant_matmul_cpu as cpu
from kernels.quant_matmul import dequantize_gptq, is_plain_grouping, sort_act_order
from server.layers.ops import Ops
from server.quantization.config import QuantConfig
from server.quantization.rtn import quantize_int8, quantize_rtn


def _param(*shape, dtype=None) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


def _packed_kernels(ops: Ops, device: torch.device) -> bool:
    return ops.name == "torch" and device.type == "cpu"


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = _param(out_features, in_features)
        self.bias = _param(out_features) if bias else None
        self.cpu_chunks = None   # set at load on CPU: the weight as row chunks (kernels/float_matmul_cpu.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return float_matmul_cpu.float_matmul(x, self.weight, self.cpu_chunks, self.bias)

    def use_cpu_matmul(self):
        self.cpu_chunks = float_matmul_cpu.row_chunks(self.weight)


class Int8Linear(nn.Module):
    """Weight-only int8 with a float32 scale per output channel."""

    def __init__(self, in_features: int, out_features: int, bias: bool, ops: Ops):
        super().__init__()
        self.ops = ops
        self.in_features, self.out_features = in_features, out_features
        self.weight = _param(out_features, in_features, dtype=torch.int8)
        self.scales = _param(out_features, dtype=torch.float32)
        self.bias = _param(out_features) if bias else None
        self.cpu_kernel = False   # set at finish_loading: PyTorch's packed int8 kernel serves this layer

    def load_float_weight(self, w: torch.Tensor):
        q, scales = quantize_int8(w.to(self.weight.device))
        self.weight.data.copy_(q)
        self.scales.data.copy_(scales)

    def finish_loading(self):
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


class GPTQLinear(nn.Module):
    """4- or 8-bit group-wise weights in the GPTQ packed layout (kernels/quant_matmul.py), read as written."""

    def __init__(self, in_features: int, out_features: int, bias: bool, ops: Ops, quant: QuantConfig):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        pack = 32 // quant.bits
        if in_features % pack or out_features % pack:
            raise ValueError(f"{quant.bits}-bit GPTQ needs in and out features divisible by {pack}; "
                             f"got {in_features} x {out_features}")
        self.ops, self.quant = ops, quant
        groups = quant.num_groups(in_features)
        self.qweight = _param(in_features // pack, out_features, dtype=torch.int32)
        self.qzeros = _param(groups, out_features // pack, dtype=torch.int32)
        self.scales = _param(groups, out_features, dtype=torch.float16)  # float16, as GPTQ checkpoints store them
        gs = in_features if quant.group_size == -1 else quant.group_size
        # A checkpoint without g_idx uses the plain grouping.
        self.g_idx = nn.Parameter(torch.arange(in_features, dtype=torch.int32) // gs, requires_grad=False)
        self.bias = _param(out_features) if bias else None

        self.dtype = torch.get_default_dtype()     # the loader's serving dtype
        self.perm: torch.Tensor | None = None      # act-order: x's columns in the order qweight's rows now have
        self.plain_group_size: int | None = None   # set once g_idx is k // group_size: the kernels' fast path
        # Set on CPU by finish_loading instead of the GPTQ tensors: the int4 kernel's group size, packed
        # weight and scales_and_zeros, or (where it does not apply) the dequantized weight [N, K].
        self.int4_group_size: int | None = None
        self.int4_weight = self.int4_scales_and_zeros = self.weight = None
        self.cpu_chunks = None   # set at load for a dequantized weight, as Linear's

    def load_float_weight(self, w: torch.Tensor):
        q = self.quant
        for name, tensor in quantize_rtn(w.to(self.qweight.device), q.bits, q.group_size, q.sym).items():
            getattr(self, name).data.copy_(tensor)

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
        """Brings an act-order layer to plain grouping (qweight's rows sorted by group, x permuted to match),
        then, on CPU, to PyTorch's packed kernels."""
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

    def use_cpu_matmul(self):
        if self.weight is not None:
            self.cpu_chunks = float_matmul_cpu.row_chunks(self.weight)

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
            y = float_matmul_cpu.float_matmul(x, self.weight, self.cpu_chunks)
        else:
            y = self.ops.gptq_matmul(x, self.qweight, self.qzeros, self.scales, self.g_idx, self.quant.bits,
                                     self.quant.zero_offset, self.plain_group_size)
        return y if self.bias is None else y + self.bias


class BnbLinear(nn.Module):
    """bitsandbytes LLM.int8 (bnb-int8) or NF4, built when the float weight arrives."""

    def __init__(self, in_features: int, out_features: int, bias: bool, quant: QuantConfig):
        super().__init__()
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise RuntimeError(f"--quant {quant.method} needs bitsandbytes: pip install bitsandbytes") from e
        self.in_features, self.out_features, self.method = in_features, out_features, quant.method
        self.device, self.dtype = torch.empty(0).device, torch.get_default_dtype()  # the loader's device and dtype
        self.bias = _param(out_features) if bias else None
        self.inner = None

    def load_float_weight(self, w: torch.Tensor):
        import bitsandbytes as bnb
        w = w.to(torch.float16)
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


class FusedProjections:
    """Projections of one input run as one matmul on CPU: called with x, returns each projection's y."""

    def __init__(self, matmul, bias: torch.Tensor | None, sizes: list[int]):
        self.matmul, self.bias, self.sizes = matmul, bias, sizes

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self.matmul(x)
        return (y if self.bias is None else y + self.bias).split(self.sizes, dim=-1)


def fuse_for_cpu(linears: list[nn.Module]) -> FusedProjections | None:
    """Projections of one input (q/k/v, gate/up) as one matmul, so the CPU reads x once: float weights as one
    [N1 + N2 + ..., K] weight, int8 and int4 ones on the packed kernels as one packed weight with their scales.
    Each layer's weight becomes a view of the fused one, so nothing big is held twice. None for other kinds, or
    unless all have a bias or none has."""
    if len({type(m) for m in linears}) != 1 or len({m.bias is None for m in linears}) != 1:
        return None
    sizes = [m.out_features if hasattr(m, "out_features") else m.weight.shape[0] for m in linears]
    bias = None if linears[0].bias is None else _fuse_rows([m.bias for m in linears], sizes)
    if type(linears[0]) is Linear:
        fused = _fuse_rows([m.weight for m in linears], sizes)
        chunks = float_matmul_cpu.row_chunks(fused)
        return FusedProjections(lambda x: float_matmul_cpu.float_matmul(x, fused, chunks), bias, sizes)
    if type(linears[0]) is Int8Linear and all(m.cpu_kernel for m in linears):
        weight = _fuse_rows([m.weight for m in linears], sizes)
        scales = _fuse_rows([m.scales for m in linears], sizes)
        return FusedProjections(lambda x: cpu.int8_matmul(x, weight, scales), bias, sizes)
    if (type(linears[0]) is GPTQLinear and all(m.int4_weight is not None and m.perm is None for m in linears)
            and len({m.int4_group_size for m in linears}) == 1 and all(n % 64 == 0 for n in sizes[:-1])):
        # the kernel packs rows in blocks of 64, so packed parts of whole blocks, one after another, are the
        # packing of their rows together; the small scales are copied
        packed = _fuse_rows([m.int4_weight for m in linears], sizes)
        scales_and_zeros = torch.cat([m.int4_scales_and_zeros.data for m in linears], dim=1).contiguous()
        group_size = linears[0].int4_group_size
        return FusedProjections(lambda x: cpu.int4_matmul(x, packed, group_size, scales_and_zeros), bias, sizes)
    return None


def _fuse_rows(params: list[nn.Parameter], sizes: list[int]) -> torch.Tensor:
    fused = torch.cat([p.data for p in params])
    _as_views(params, fused, sizes)
    return fused


def _as_views(params: list[nn.Parameter], fused: torch.Tensor, sizes: list[int]):
    start = 0
    for p, n in zip(params, sizes):
        p.data = fused[start:start + n]
        start += n


def weight_bytes(module: nn.Module) -> int:
    """Bytes of a module's weights, including the scales bitsandbytes keeps beside its quantized tensors."""
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    for m in module.modules():
        weight = getattr(m, "weight", None)
        extras = [getattr(weight, "SCB", None), getattr(getattr(weight, "quant_state", None), "absmax", None)]
        total += sum(t.numel() * t.element_size() for t in extras if isinstance(t, torch.Tensor))
    return total


class LinearFactory:
    """Builds the projections of the decoder layers in the chosen quantization (lm_head stays float)."""

    def __init__(self, quant: QuantConfig | None, ops: Ops):
        self.quant, self.ops = quant, ops

    def __call__(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        q = self.quant
        if q is None:
            return Linear(in_features, out_features, bias)
        if q.method == "int8":
            return Int8Linear(in_features, out_features, bias, self.ops)
        if q.method == "gptq":
            return GPTQLinear(in_features, out_features, bias, self.ops, q)
        return BnbLinear(in_features, out_features, bias, q)
