"""Rotary position embedding (RoPE) with the default, linear and llama3 frequency schemes."""
import math

import torch
from torch import nn

from server.layers.ops import Ops


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    # llama3: long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Holds cos/sin for every position up to max_positions; applies the rotate-half form to q and k."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None, ops: Ops):
        super().__init__()
        self.ops = ops
        inv_freq = inverse_frequencies(head_dim, theta, scaling)
        freqs = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, Dh]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        if ops.name == "torch":
            # sin with its first half negated: rotate_half(x) * sin is x.roll(Dh / 2) * signed_sin, to the bit
            half = head_dim // 2
            self.register_buffer("signed_sin", torch.cat((-self.sin[:, :half], self.sin[:, half:]), dim=-1),
                                 persistent=False)
        self._step: tuple | None = None   # (positions, cos, signed_sin) gathered for the forward being run

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        # positions: [T]; q: [T, Hq, Dh]; k: [T, Hkv, Dh]
        if self.ops.name != "torch":
            return self.ops.rotary(positions, q, k, self.cos, self.sin)
        # The torch ops (kernels/rotary.py's reference, in fewer ops): every layer of a forward rotates by the
        # same positions, so their rows are gathered once, by the first layer.
        if torch.compiler.is_compiling():   # a compiled graph gathers them where it uses them
            c, s = self._rows(positions, q.dtype)
            return q * c + _swap_halves(q) * s, k * c + _swap_halves(k) * s
        if self._step is None or self._step[0] is not positions or self._step[1].dtype != q.dtype:
            self._step = (positions, *self._rows(positions, q.dtype))
        _, c, s = self._step
        half = q.shape[-1] // 2
        return q * c + q.roll(half, -1) * s, k * c + k.roll(half, -1) * s

    def _rows(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # cos and signed_sin at the positions, [T, 1, Dh]: broadcast over the heads
        return self.cos[positions].to(dtype).unsqueeze(1), self.signed_sin[positions].to(dtype).unsqueeze(1)


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    # x.roll(Dh / 2, -1) as a cat, for a compiled graph: Inductor reads a roll element by element (a modulo index),
    # inside the attention's sums once per key. Eagerly roll is the faster of the two.
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], x[..., :half]), dim=-1)
