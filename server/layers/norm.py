"""RMSNorm, computed in float32 as Hugging Face does, with an optional fused residual add."""
import torch
from torch import nn

from server.layers.ops import Ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: Ops):
        super().__init__()
        self.eps = eps
        self.ops = ops
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        # x: [T, D]. With a residual: returns (norm(x + residual), x + residual).
        return self.ops.rms_norm(x, self.weight, self.eps, residual)
